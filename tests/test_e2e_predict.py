"""End to end: the trained project's champion answers alike through every door.

`nox -s predict` (chunked batch scoring, rejects), the registered MLflow pyfunc (in process,
``mlflow models predict``, ``mlflow models serve``) and Spark (``mlflow.pyfunc.spark_udf`` in a
local session, the project's examples/spark_predict.py) give the model's own answers on the test
split. The ``trained`` project is only read: outputs go to temporary folders.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from e2e import MODEL_NAME, PACKAGE, Project, free_port, wait_until_healthy

pytestmark = pytest.mark.e2e

TEST_SPLIT = "data/processed/test.parquet"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
# Not a project dependency (a Spark cluster brings its own): installed beside the project's
# environment for the one Spark test.
PYSPARK = "pyspark>=4,<5"
ATOL = 1e-5

# Files are read, and test rows made, by the project's Python (pandas is not a dependency of
# these tests); the comparisons are made here, on plain JSON. Parquet is read unthreaded, as
# the project reads it (core/fileio.py): a threaded read can abort a short process at exit.
READ = """
import sys
from pathlib import Path
import pandas as pd
import pyarrow.parquet as pq
path = Path(sys.argv[1])
if path.suffix == ".csv":
    frame = pd.read_csv(path)
else:
    frame = pq.read_table(path, use_threads=False).to_pandas()
if "row_id" in frame.columns:
    frame = frame.sort_values("row_id", ignore_index=True)
print(frame.to_json(orient="split", index=False))
"""
TEST_ROWS = """
import sys
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1], use_threads=False).to_pandas()
rows.insert(0, "row_id", np.arange(len(rows)))  # joins that do not depend on row order
rows.to_parquet(sys.argv[2] + "/rows.parquet", index=False)
rows.to_csv(sys.argv[2] + "/rows.csv", index=False)
"""


def read(project: Project, path: Path) -> dict[str, list]:
    """A CSV or Parquet file (or Parquet folder) as ``{column: values}``, by row_id if any."""
    split = json.loads(project.py("-c", READ, str(path)).stdout)
    return {name: [row[i] for row in split["data"]] for i, name in enumerate(split["columns"])}


def _store(project: Project) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{project.path / 'mlflow.db'}"}


def _schema(project: Project) -> dict:
    return project.json("data/processed/schema.json")


def _classes(project: Project) -> list[str]:
    return [str(c) for c in _schema(project)["classes"]]


def assert_same_answers(got: dict[str, list], expected: dict[str, list], classes) -> None:
    assert [str(v) for v in got["label"]] == [str(v) for v in expected["label"]]
    for name in classes:
        pairs = zip(got[name], expected[name], strict=True)
        assert all(math.isclose(a, b, abs_tol=ATOL) for a, b in pairs), name


@pytest.fixture(scope="module")
def batch(trained: Project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`nox -s predict` on the test split: (folder with rows.*, output Parquet)."""
    folder = tmp_path_factory.mktemp("batch")
    trained.py("-c", TEST_ROWS, str(trained.path / TEST_SPLIT), str(folder))
    output = folder / "scored.parquet"
    result = trained.nox("predict", "--", "--input", str(folder / "rows.parquet"),
                         "--output", str(output), "--no-progress")  # fmt: skip
    assert "none rejected" in result.stdout
    assert not output.with_name(f"{output.name}.rejects.csv").exists(), "an empty rejects file"
    return folder, output


def test_predict_session_reproduces_the_champion_s_test_accuracy(trained: Project, batch):
    folder, output = batch
    scored, rows = read(trained, output), read(trained, folder / "rows.parquet")
    assert list(scored) == [*rows, "label", *_classes(trained), "model_version"]
    registry = trained.registry()
    assert set(scored["model_version"]) == {str(registry["champion"])}
    truth = [str(v) for v in scored[_schema(trained)["target"]]]
    accuracy = sum(a == b for a, b in zip(scored["label"], truth, strict=True)) / len(truth)
    assert accuracy == pytest.approx(registry["metrics"]["test_accuracy"], abs=1e-6)


def test_chunked_scoring_writes_what_one_chunk_writes(trained: Project, batch, tmp_path):
    folder, output = batch
    chunked = tmp_path / "chunked.parquet"
    trained.py("-m", f"{PACKAGE}.serving.batch", "--input", str(folder / "rows.parquet"),
               "--output", str(chunked), "--chunk-rows", "7", "--no-progress")  # fmt: skip
    got, expected = read(trained, chunked), read(trained, output)
    classes = _classes(trained)
    # The same rows, labels and versions; probabilities to rounding (BLAS sums a batch of 7
    # rows in another order than one of all rows).
    assert {k: v for k, v in got.items() if k not in classes} == {
        k: v for k, v in expected.items() if k not in classes
    }
    assert_same_answers(got, expected, classes)


BAD_ROWS = """
import sys
import pandas as pd
rows = pd.read_csv(sys.argv[1])
first = rows.columns[1]  # a numeric feature
rows[first] = rows[first].astype(object)
rows.loc[2, first] = "n/a?"
rows.loc[5, first] = None
rows.to_csv(sys.argv[2], index=False)
print(first, len(rows))
"""


def test_bad_rows_are_rejected_with_number_and_reason(trained: Project, batch, tmp_path):
    folder, _ = batch
    source, output = tmp_path / "bad.csv", tmp_path / "scored.csv"
    first, n = trained.py("-c", BAD_ROWS, str(folder / "rows.csv"), str(source)).stdout.split()
    args = ("--input", str(source), "--output", str(output), "--no-progress")

    result = trained.nox("predict", "--", *args, check=False)
    assert result.returncode != 0
    printed = result.stdout + result.stderr  # nox passes both on as one
    assert f"{int(n) - 2} rows scored" in printed
    assert "error: 2 rows rejected" in printed
    rejects = read(trained, tmp_path / "scored.csv.rejects.csv")
    assert rejects["row"] == [3, 6]  # 1 = the first data row
    assert rejects["row_id"] == [2, 5]
    assert rejects["reason"] == [f"{first}: 'n/a?' is not numeric", f"{first}: missing value"]
    assert read(trained, output)["row_id"] == [i for i in range(int(n)) if i not in (2, 5)]
    scorer = ("-m", f"{PACKAGE}.serving.batch")
    assert trained.py(*scorer, *args, "--allow-rejects").returncode == 0

    absent = tmp_path / "absent.parquet"
    missing = trained.py(*scorer, "--input", str(absent), "--output", str(output), check=False)
    assert missing.returncode == 2
    assert missing.stderr == f"error: input file {absent} not found\n"


PYFUNC = """
import sys
# The project's source off the path: what loading imports must travel with the model.
sys.path = [p for p in sys.path if not p.endswith("/src")]
import mlflow.pyfunc
import pyarrow.parquet as pq
served = mlflow.pyfunc.load_model(sys.argv[1])
package = sys.modules[sys.argv[3]]
assert "/code/" in package.__file__, package.__file__
served.predict(pq.read_table(sys.argv[2], use_threads=False).to_pandas()).to_parquet(sys.argv[4])
"""


def test_pyfunc_answers_as_the_model_without_the_source_tree(trained: Project, batch, tmp_path):
    folder, output = batch
    answers = tmp_path / "pyfunc.parquet"
    trained.py("-c", PYFUNC, CHAMPION_URI, str(folder / "rows.parquet"), PACKAGE, str(answers),
               **_store(trained))  # fmt: skip
    got = read(trained, answers)
    assert list(got) == ["label", *_classes(trained)]
    assert_same_answers(got, read(trained, output), _classes(trained))


def test_mlflow_models_predict_and_serve_answer_alike(trained: Project, batch, tmp_path):
    folder, output = batch
    expected = read(trained, output)
    mlflow = str(trained.venv / "bin" / "mlflow")
    predicted = tmp_path / "predicted.json"
    trained.run(mlflow, "models", "predict", "-m", CHAMPION_URI, "-i", str(folder / "rows.csv"),
                "-t", "csv", "-o", str(predicted), "--env-manager", "local",
                **_store(trained))  # fmt: skip
    assert_same_answers(columns(json.loads(predicted.read_text())), expected, _classes(trained))

    port = free_port()
    server = subprocess.Popen(
        [mlflow, "models", "serve", "-m", CHAMPION_URI, "-p", str(port), "-h", "127.0.0.1",
         "--env-manager", "local"],
        # the environment's bin/ first, as `uv run` or an activated venv has it: MLflow starts
        # `uvicorn` from PATH
        cwd=trained.path, env={**trained.env, **_store(trained), "PATH": _path(trained)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server)
        split = json.loads(trained.py("-c", READ, str(folder / "rows.csv")).stdout)
        body = {"dataframe_split": split}
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = columns(json.load(answer))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert_same_answers(served, expected, _classes(trained))


def _path(project: Project) -> str:
    return os.pathsep.join([str(project.venv / "bin"), project.env.get("PATH", "")])


def columns(answer: dict) -> dict[str, list]:
    """MLflow's ``{"predictions": [{column: value}, ...]}`` as ``{column: values}``."""
    records = answer["predictions"]
    return {name: [record[name] for record in records] for name in records[0]}


@pytest.fixture(scope="module")
def spark_python(trained: Project, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python with pyspark that also sees the project's environment (a .pth file): the
    project's locked environment stays as `uv sync` leaves it."""
    venv = tmp_path_factory.mktemp("spark") / "venv"
    trained.run("uv", "venv", "--quiet", "--python", trained.python, str(venv))
    python = str(venv / "bin" / "python")
    trained.run("uv", "pip", "install", "--quiet", "--python", python, PYSPARK)
    project_site = trained.py("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    line = f"import site; site.addsitedir({project_site.stdout.strip()!r})\n"
    (Path(site) / "project-env.pth").write_text(line)
    return python


def test_spark_udf_answers_as_the_predict_session(trained: Project, batch, spark_python, tmp_path):
    folder, output = batch
    spark_out = tmp_path / "spark"
    trained.run(spark_python, "examples/spark_predict.py", "--input", str(folder / "rows.parquet"),
                "--output", str(spark_out), "--master", "local[2]")  # fmt: skip
    got, expected = read(trained, spark_out), read(trained, output)
    assert list(got) == list(expected)
    assert got["row_id"] == expected["row_id"]
    assert got["model_version"] == expected["model_version"]
    assert_same_answers(got, expected, _classes(trained))
