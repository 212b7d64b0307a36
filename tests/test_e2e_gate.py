"""End to end: the promotion gate fails closed, two racing evaluations decide one after the
other, and every DVC stage declares what it really imports and reads.

Real copier, uv, nox, DVC, PyTorch (CPU), MLflow (SQLite and a real ``mlflow server``).
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

import pytest
import yaml
from e2e import PACKAGE, Project, mlflow_server
from file_watch import files_read

EVALUATE = f"{PACKAGE}.evaluation.evaluate"  # the module, as `python -m` takes it

pytestmark = pytest.mark.e2e

UNDECIDED_EXIT = 4  # the evaluate stage's documented exit code for "cannot decide"
# Read by a stage but deliberately not a DVC dependency: the parameters (declared by key), the
# tracking store and resume state (state, not inputs), and tools' own files.
NOT_DEPENDENCIES = ("params.yaml", "mlflow.db", "mlflow.db-journal")
UNWATCHED = (".git", ".dvc", ".venv", ".nox", "mlartifacts", "checkpoints", ".pytest_cache")


def test_deleted_artefacts_and_a_worse_model_keep_the_champion(
    pristine: Project, tmp_path: Path
) -> None:
    """The fault that once swapped the production model: the artefact store lost its files."""
    project = pristine.copy(tmp_path / "fault")
    project.nox("train")
    assert project.registry()["champion"] == 1
    # The shipped slices, on the sample data: each column's slices hold every test row.
    slices = project.json("metrics/slices.json")["by_column"]
    n_test = project.json("metrics/evaluate.json")["n_test"]
    assert set(slices) == {"mean_radius", "mean_texture"}
    assert all(sum(s["rows"] for s in c["slices"].values()) == n_test for c in slices.values())
    shutil.rmtree(project.path / "mlartifacts")
    project.set_params(train={"epochs": 1, "lr": 1e-6})

    result = project.nox("train", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "GATE UNDECIDED: champion v1 cannot be loaded" in output
    assert "Traceback" not in output
    registry = project.registry()
    assert registry["versions"] == [1, 2]
    assert registry["champion"] == 1
    assert project.json("metrics/gate.json")["decision"] == "undecided"
    direct = project.py("-m", EVALUATE, check=False)
    assert direct.returncode == UNDECIDED_EXIT
    assert len(direct.stderr.strip().splitlines()) == 1, direct.stderr

    # Replacing an unloadable champion is possible, on purpose.
    project.nox("evaluate", "--", "--replace-unloadable-champion")
    assert project.registry()["champion"] == 2


def _candidate(pristine: Project, path: Path, server: str, **train: object) -> Project:
    """A copy of the project with a trained, registered, not yet evaluated model."""
    project = pristine.copy(path)
    project.set_params(train=train)
    project.py("-m", f"{PACKAGE}.data.prepare")
    project.py("-m", f"{PACKAGE}.training.train", MLFLOW_TRACKING_URI=server)
    return project


def test_racing_evaluations_decide_one_after_the_other(pristine: Project, tmp_path: Path) -> None:
    with mlflow_server(pristine, tmp_path / "server") as server:
        first = pristine.copy(tmp_path / "first")
        first.set_params(train={"epochs": 3})  # weak: both candidates beat it
        first.nox("train", MLFLOW_TRACKING_URI=server)
        assert first.registry(server)["champion"] == 1
        a = _candidate(pristine, tmp_path / "a", server, epochs=40)
        b = _candidate(pristine, tmp_path / "b", server, epochs=60)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(p.py, "-m", EVALUATE, MLFLOW_TRACKING_URI=server) for p in (a, b)]
            for run in runs:
                run.result()
        gates = [p.json("metrics/gate.json") for p in (a, b)]
        champion = str(first.registry(server)["champion"])

    # Without the promotion lock both would compare with v1 and both would win.
    assert not all(g["champion_version"] == "1" and g["decision"] == "promoted" for g in gates)
    # As in some serial order: one compared with v1, the other with what the first left.
    after_first = {"1", *(g["candidate_version"] for g in gates)}
    assert {g["champion_version"] for g in gates} <= after_first, gates
    assert any(g["champion_version"] == "1" for g in gates), gates
    # All three scored on the same test split: the best one is champion.
    scores = {g["candidate_version"]: g["candidate_score"] for g in gates}
    scores["1"] = first.json("metrics/gate.json")["candidate_score"]
    assert scores[champion] == max(scores.values()), (gates, champion)


def _declared(stage: dict, params: dict) -> set[str]:
    deps = set()
    for dep in stage.get("deps", []):
        deps.add(dep.replace("${data.raw_path}", params["data"]["raw_path"]))
    return deps


def _source(path: str) -> str:
    """``src/pkg/__pycache__/mod.cpython-311.pyc`` -> ``src/pkg/mod.py``."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-2] == "__pycache__":
        return "/".join([*parts[:-2], parts[-1].split(".")[0] + ".py"])
    return path


def test_every_stage_declares_what_it_imports_and_reads(pristine: Project, tmp_path: Path):
    project = pristine.copy(tmp_path / "deps")
    project.set_params(train={"epochs": 3})
    pipeline = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    project.py("-m", f"{PACKAGE}.registry.store", "init")
    undeclared = {}
    for name in ("prepare", "train", "evaluate"):
        stage = pipeline[name]
        program, *args = stage["cmd"].split()
        assert program == "python", stage["cmd"]
        # The train stage asks git for the commit and dirty flag: with a fresh index git only
        # stats files, otherwise it reads them all (a copied tree looks changed to it). Files
        # changed in the second the index is written are re-read ("racy git"): wait that out.
        time.sleep(1.1)
        project.run("git", "update-index", "--refresh", check=False)
        time.sleep(1.1)
        with files_read(project.path, skip=UNWATCHED) as read:
            project.py(*args)
        # What the stage writes (outs, metrics, plots) it may read back (to log it).
        written = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
        outs = {next(iter(o)) if isinstance(o, dict) else o for o in written}
        used = {_source(p) for p in read.paths} - outs - set(NOT_DEPENDENCIES)
        missing = sorted(used - _declared(stage, params))
        if missing:
            undeclared[name] = missing
    assert not undeclared, f"stages read files their deps in dvc.yaml do not list: {undeclared}"
