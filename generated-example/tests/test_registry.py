"""MLflow tracking and registry, against a real SQLite store (one per test module: ~1.5 s)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core import layout
from my_ml_project.core.config import MlflowParams, ModelParams, ProjectError, load_params
from my_ml_project.data.prepare import load_split
from my_ml_project.model.network import TabularClassifier, build_model
from my_ml_project.registry import store as registry


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An initialised SQLite store shared by the module's tests (creating one costs seconds)."""
    uri = "sqlite:///" + (tmp_path_factory.mktemp("mlflow") / "mlflow.db").as_posix()
    registry.init_store(uri)
    return uri


@pytest.fixture
def tracking(project_dir: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


def test_environment_overrides_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    params = MlflowParams(tracking_uri="sqlite:///x.db", experiment="e", model_name="m")
    assert registry.tracking_uri(params) == "http://mlflow.example:5000"


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:///stores/m.db", "sqlite:///{cwd}/stores/m.db"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_relative_sqlite_is_made_absolute(
    project_dir: Path, configured: str, expected: str
) -> None:
    params = MlflowParams(tracking_uri=configured, experiment="e", model_name="m")
    assert registry.tracking_uri(params) == expected.format(cwd=project_dir.as_posix())


@pytest.mark.parametrize(
    ("uri", "portable"),
    [
        ("sqlite:///{cwd}/mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:////elsewhere/m.db", "sqlite:////elsewhere/m.db"),
        # A made-up credential, which the test checks is dropped (for the secret scan:)
        # pragma: allowlist nextline secret
        ("https://user:secret@mlflow.example/api", "https://mlflow.example/api"),
        ("databricks", "databricks"),
    ],
)
def test_portable_uri_has_no_machine_path_or_credentials(
    project_dir: Path, uri: str, portable: str
) -> None:
    assert registry.portable_uri(uri.format(cwd=project_dir.as_posix())) == portable


def test_uri_defaults_to_params_yaml(project_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.main(["uri"]) == 0
    assert capsys.readouterr().out.strip() == f"sqlite:///{project_dir.as_posix()}/mlflow.db"
    assert not (project_dir / "mlflow.db").exists(), "`uri` must not create the store"


def test_init_is_idempotent(tracking: str, capsys: pytest.CaptureFixture[str]) -> None:
    params = load_params().mlflow
    registry.configure(params)
    assert registry.main(["init"]) == 0
    assert registry.main(["init"]) == 0
    assert capsys.readouterr().out.split() == [tracking, tracking]
    experiment = mlflow.MlflowClient(tracking).get_experiment_by_name(params.experiment)
    assert experiment is not None, "init must keep what the store holds"
    # Local store: artifacts next to the database, not in the caller's cwd.
    assert experiment.artifact_location.startswith(
        Path(tracking.removeprefix("sqlite:///")).parent.as_uri()
    )


def test_deleted_experiment_is_a_clear_error(tracking: str) -> None:
    params = load_params().mlflow.model_copy(update={"experiment": "deleted-experiment"})
    registry.configure(params)
    client = mlflow.MlflowClient(tracking)
    client.delete_experiment(client.get_experiment_by_name("deleted-experiment").experiment_id)
    with pytest.raises(ProjectError, match="restore it"):
        registry.configure(params)


def _model() -> tuple[TabularClassifier, pd.DataFrame]:
    x, _, schema = load_split("train")
    torch.manual_seed(0)
    model = build_model(schema, ModelParams(hidden_sizes=[8], dropout=0.0), x).eval()
    return model, pd.DataFrame(x[:3], columns=schema.features)


def test_log_model_needs_two_example_rows(prepared_project: Path) -> None:
    model, example = _model()
    with pytest.raises(ValueError, match="at least 2 rows"):
        registry.log_model(model, example.head(1))


def test_log_register_alias_load_round_trip(prepared_project: Path, tracking: str) -> None:
    model, example = _model()
    registry.configure(load_params().mlflow)
    with mlflow.start_run():
        info = registry.log_model(model, example)
    name = "round-trip"
    version = registry.register(info.model_uri, name, tags={"source": "test"})
    assert version == "1"
    assert registry.get_alias_version(name, registry.CHAMPION) is None
    assert registry.get_alias_version("no-such-model", registry.CHAMPION) is None

    registry.set_alias(name, registry.CHAMPION, version)
    assert registry.get_alias_version(name, registry.CHAMPION) == "1"
    loaded = registry.load_version(name, version)
    assert isinstance(loaded, TabularClassifier)
    assert not loaded.training
    assert loaded.feature_names == model.feature_names
    assert loaded.class_names == model.class_names
    x = torch.from_numpy(example.to_numpy(np.float32))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    registry.delete_alias(name, registry.CHAMPION)
    registry.delete_alias(name, registry.CHAMPION)  # absent: no error
    assert registry.get_alias_version(name, registry.CHAMPION) is None


def test_logged_model_is_a_pyfunc_that_answers_in_labels(
    prepared_project: Path, tracking: str
) -> None:
    model, example = _model()
    registry.configure(load_params().mlflow)
    with mlflow.start_run():
        info = registry.log_model(model, example)
    files = {Path(p).name for p in _artifact_files(info.model_uri)}
    assert "model.pt" in files, "the project's own weights file, read without pickle"
    assert "model.pth" not in files
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    pins = dict(line.split("==") for line in requirements.split())
    assert {"mlflow", "torch", "numpy", "pandas", "cloudpickle"} <= pins.keys()
    assert "+" not in pins["torch"], "a local tag such as +cpu does not resolve on PyPI"
    shipped = {f.split("/code/", 1)[1] for f in _artifact_files(info.model_uri) if "/code/" in f}
    package = layout.ROOT.name
    files = layout.source_files("model.pyfunc")
    wanted = {f"{package}/{p.relative_to(layout.ROOT).as_posix()}" for p in files}
    assert shipped == wanted, "only what loading the model imports: the package's core/ and model/"
    assert info.signature.inputs.input_names() == model.feature_names
    assert info.signature.outputs.input_names() == ["label", *model.class_names]
    assert info.metadata["class_names"] == model.class_names
    # Served data arrive as float64 (JSON): the signature must accept them, and float32 too;
    # columns are taken by name, in any order, extra ones ignored.
    served = mlflow.pyfunc.load_model(info.model_uri)
    expected = model.predict_proba(torch.from_numpy(example.to_numpy(np.float32))).numpy()
    shuffled = example[example.columns[::-1]].assign(extra="ignored")
    for frame in (example.astype(np.float64), example.astype(np.float32), shuffled):
        answer = served.predict(frame)
        assert list(answer.columns) == ["label", *model.class_names]
        np.testing.assert_allclose(answer[model.class_names].to_numpy(), expected, atol=1e-6)
        labels = [model.class_names[i] for i in expected.argmax(axis=1)]
        assert answer["label"].tolist() == labels


def _artifact_files(model_uri: str) -> list[str]:
    root = Path(mlflow.artifacts.download_artifacts(model_uri))
    return [str(p) for p in root.rglob("*") if p.is_file()]


def test_version_of_run_finds_the_run_s_version(prepared_project: Path, tracking: str) -> None:
    model, example = _model()
    registry.configure(load_params().mlflow)
    with mlflow.start_run() as run:
        info = registry.log_model(model, example)
    assert registry.version_of_run("by-run", run.info.run_id) is None
    version = registry.register(info.model_uri, "by-run")
    assert registry.version_of_run("by-run", run.info.run_id) == version
    assert registry.version_of_run("by-run", "0" * 32) is None


def test_promotion_lock_admits_one_holder(tracking: str, capsys: pytest.CaptureFixture) -> None:
    registry.configure(load_params().mlflow)
    with registry.promotion_lock("locked-model"):
        with (
            pytest.raises(registry.RegistryError, match=r"held by .* unlock"),
            registry.promotion_lock("locked-model", wait_s=0.5),
        ):
            pass
        # A lock older than the stale age is reported at once, with the way out.
        with (
            pytest.raises(registry.RegistryError, match="no evaluation is running"),
            registry.promotion_lock("locked-model", wait_s=60, stale_s=0),
        ):
            pass
    with registry.promotion_lock("locked-model", wait_s=0.5):  # released: free again
        pass


def _dead_pid() -> int:
    """A process id that no process has: a child that already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_left_by_a_dead_process_is_taken_over_and_a_live_one_is_exit_5(
    tracking: str, capsys: pytest.CaptureFixture
) -> None:
    registry.configure(load_params().mlflow)
    owner = f"{socket.gethostname()}:{_dead_pid()}"
    lock = "orphan-lock" + registry.LOCK_SUFFIX
    mlflow.MlflowClient().create_registered_model(lock, tags={"owner": owner, "since": "0"})
    with registry.promotion_lock("orphan-lock", wait_s=5):
        pass
    assert f"took over the promotion lock of 'orphan-lock' left by {owner}" in (
        capsys.readouterr().out
    )
    alive = f"{socket.gethostname()}:{os.getpid()}"
    client = mlflow.MlflowClient()
    client.create_registered_model(lock, tags={"owner": alive, "since": f"{time.time()}"})
    with (
        pytest.raises(registry.LockBusyError, match=f"held by {alive}") as busy,
        registry.promotion_lock("orphan-lock", wait_s=0.5),
    ):
        pass
    assert busy.value.exit_code == 5
    client.delete_registered_model(lock)


def test_a_run_left_running_by_a_killed_training_is_marked_failed(
    tracking: str, capsys: pytest.CaptureFixture
) -> None:
    params = load_params().mlflow
    registry.configure(params)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.experiment).experiment_id
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    orphan = client.create_run(experiment, tags={registry.PROCESS_TAG: dead}).info.run_id
    elsewhere = client.create_run(experiment, tags={registry.PROCESS_TAG: "other-host:1"})
    run_id, _, _ = registry.open_run(None, {}, {}, params.experiment)
    registry.end_run("FINISHED")
    assert client.get_run(orphan).info.status == "FAILED"
    assert f"MLflow run {orphan} was left RUNNING by {dead}" in capsys.readouterr().out
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot tell: kept
    assert client.get_run(run_id).data.tags[registry.PROCESS_TAG].endswith(f":{os.getpid()}")


def test_an_unreachable_server_is_given_up_on_in_seconds(
    project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):
        # Set, then removed: the test's end restores the variable's state, whatever configure sets.
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", "unset")
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    params = load_params().mlflow
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        registry.configure(params)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(params.request_timeout)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(params.request_retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting wins
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        registry.configure(params)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_unlock_removes_a_leftover_lock(
    tracking: str, update_params, capsys: pytest.CaptureFixture
) -> None:
    params = update_params({"mlflow": {"model_name": "left-locked"}})
    registry.configure(params.mlflow)
    mlflow.MlflowClient().create_registered_model("left-locked" + registry.LOCK_SUFFIX)
    assert registry.main(["unlock"]) == 0
    assert "removed" in capsys.readouterr().out
    with registry.promotion_lock("left-locked", wait_s=0.5):
        pass
    assert registry.main(["unlock"]) == 0
    assert "not held" in capsys.readouterr().out


def test_versions_of_the_pytorch_flavour_still_load(prepared_project: Path, tracking: str) -> None:
    """Champions registered by earlier template releases (MLflow's pytorch flavour, pickle)."""
    model, example = _model()
    registry.configure(load_params().mlflow)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    version = registry.register(info.model_uri, "old-flavour")
    loaded = registry.load_version("old-flavour", version)
    x = torch.from_numpy(example.to_numpy(np.float32))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _register(name: str, count: int) -> list[str]:
    model, example = _model()
    registry.configure(load_params().mlflow)
    versions = []
    for _ in range(count):
        with mlflow.start_run():
            info = registry.log_model(model, example)
        versions.append(registry.register(info.model_uri, name))
    return versions


def test_rollback_walks_the_champion_history_back(prepared_project: Path, tracking: str) -> None:
    name = "rollback"
    v1, v2, v3 = _register(name, 3)
    registry.set_alias(name, registry.CHAMPION, v1)  # a champion from before the history
    registry.promote(name, v2)
    registry.promote(name, v3)
    assert registry.champion_history(name) == [v1, v2, v3]
    assert registry.rollback(name) == (v3, v2)
    assert registry.get_alias_version(name, registry.CHAMPION) == v2
    assert registry.rollback(name) == (v2, v1)
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(name)
    assert registry.get_alias_version(name, registry.CHAMPION) == v1


def test_rollback_to_an_unloadable_version_moves_nothing(
    prepared_project: Path, tracking: str
) -> None:
    name = "rollback-broken"
    v1, v2 = _register(name, 2)
    registry.promote(name, v1)
    registry.promote(name, v2)
    mlflow.MlflowClient().delete_model_version(name, v1)  # its artefacts gone with it
    with pytest.raises(registry.RegistryError, match=f"v{v1}, the previous champion, cannot be"):
        registry.rollback(name)
    assert registry.get_alias_version(name, registry.CHAMPION) == v2
