"""The train stage: devices, the loop, checkpoints and resume, MLflow logging and registration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from my_ml_project.checkpoint import fingerprint, read_checkpoint
from my_ml_project.config import ProjectError, load_params
from my_ml_project.data import file_md5
from my_ml_project.distributed import DistContext, amp_dtype, resolve_device
from my_ml_project.model import build_model, load_model
from my_ml_project.train import (
    FitResult,
    TrainConfig,
    epoch_indices,
    fit,
    load_data,
    main,
    run,
    seed_everything,
)

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Interrupt(Exception):
    """Stands for a crash or Ctrl-C after an epoch's checkpoint was written."""


def stop_after(epochs: int) -> Callable[[int, dict[str, float]], None]:
    def hook(epoch: int, row: dict[str, float]) -> None:
        if epoch == epochs:
            raise Interrupt

    return hook


@pytest.fixture(scope="session")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the whole session: creating one costs seconds."""
    from my_ml_project.registry import init_store

    uri = f"sqlite:///{(tmp_path_factory.mktemp('mlflow') / 'mlflow.db').as_posix()}"
    init_store(uri)
    return uri


@pytest.fixture
def mlflow_project(
    prepared_project: Path,
    tracking_db: str,
    monkeypatch: pytest.MonkeyPatch,
    update_params: Callable[[dict[str, Any]], dict[str, Any]],
    request: pytest.FixtureRequest,
) -> dict[str, Any]:
    """A prepared project logging to the session's store, under a model name of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    return update_params({"mlflow": {"model_name": request.node.name.replace("_", "-")}})


def train_in_process(params: dict[str, Any], **kwargs: Any) -> FitResult:
    """The stage's loop without MLflow: fit() on the prepared data."""
    seed_everything(params["seed"])
    data = load_data()
    model = build_model(data.schema, params["model"], data.x_train)
    cfg = TrainConfig.from_params(params)
    fp = fingerprint(params, data)
    return fit(model, data, cfg, ctx=CPU, seed=params["seed"], fp=fp, **kwargs)


# --- devices -------------------------------------------------------------------------------


def test_resolve_device_cpu_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAIN_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    monkeypatch.setenv("TRAIN_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert amp_dtype(torch.device("cpu"), "auto") is None  # mixed precision is CUDA-only


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAIN_DEVICE", raising=False)
    with pytest.raises(ProjectError, match=r"train\.device is 'cuda' but") as info:
        resolve_device("cuda")
    assert "TRAIN_DEVICE=cpu" in str(info.value)
    monkeypatch.setenv("TRAIN_DEVICE", "cuda")
    with pytest.raises(ProjectError, match="TRAIN_DEVICE is 'cuda'"):
        resolve_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_reports_cuda_without_traceback(
    project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device is 'cuda'")
    assert "Traceback" not in err


def test_bad_values_are_clear_errors(project_dir: Path) -> None:
    with pytest.raises(ProjectError, match="choose one of"):
        resolve_device("tpu")
    with pytest.raises(ProjectError, match=r"train\.amp"):
        amp_dtype(torch.device("cpu"), "fp8")
    params = load_params()
    params["train"]["batch_size"] = 0
    with pytest.raises(ProjectError, match=r"train\.batch_size"):
        TrainConfig.from_params(params)


# --- the loop ----------------------------------------------------------------------------------


def test_epoch_shards_cover_the_permutation_evenly() -> None:
    shards = [
        epoch_indices(7, seed=1, epoch=3, ctx=DistContext(r, 3, r, torch.device("cpu")))
        for r in range(3)
    ]
    assert [len(s) for s in shards] == [3, 3, 3]  # padded: every rank runs the same steps
    assert set(torch.cat(shards).tolist()) == set(range(7))
    assert torch.equal(epoch_indices(7, 1, 3, CPU), epoch_indices(7, 1, 3, CPU))
    assert not torch.equal(epoch_indices(50, 1, 3, CPU), epoch_indices(50, 1, 4, CPU))


def test_training_learns_and_is_deterministic(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    params = update_params({"train": {"epochs": 5}})
    first, second = train_in_process(params), train_in_process(params)
    losses = [row["train_loss"] for row in first.history]
    assert losses[-1] < losses[0]
    assert first.history == second.history
    assert first.epochs_run == 5
    assert first.best_val_loss == min(row["val_loss"] for row in first.history)


def test_early_stopping_keeps_the_best_weights(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    # A huge learning rate makes the validation loss jump around, so patience 1 triggers.
    params = update_params({"train": {"epochs": 30, "patience": 1, "lr": 1.0}})
    result = train_in_process(params)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 1 < 30
    data = load_data()
    logits = result.model(torch.from_numpy(data.x_val))
    val_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.y_val)).item()
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_resumed_run_equals_uninterrupted_run(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    params = update_params({"train": {"epochs": 6}})
    ckpt = prepared_project / "checkpoints" / "last.pt"
    whole = train_in_process(params, checkpoint=ckpt)
    ckpt.unlink()

    with pytest.raises(Interrupt):
        train_in_process(params, checkpoint=ckpt, on_epoch_end=stop_after(2))
    fp = fingerprint(params, load_data())
    start, note = read_checkpoint(ckpt, fp, "auto")
    assert start is not None
    assert start["epoch"] == 2
    assert "resuming" in note
    resumed = train_in_process(params, checkpoint=ckpt, start=start)

    assert resumed.history == whole.history
    assert resumed.epochs_run == 6
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_checkpoint_resume_modes(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    params = update_params({"train": {"epochs": 2}})
    ckpt = prepared_project / "checkpoints" / "last.pt"
    with pytest.raises(ProjectError, match="no checkpoint"):
        read_checkpoint(ckpt, "fp", "always")
    with pytest.raises(Interrupt):
        train_in_process(params, checkpoint=ckpt, on_epoch_end=stop_after(1))
    fp = fingerprint(params, load_data())

    assert read_checkpoint(ckpt, fp, "always")[0] is not None
    assert read_checkpoint(ckpt, fp, "never")[0] is None
    other = fingerprint({**params, "seed": params["seed"] + 1}, load_data())
    start, note = read_checkpoint(ckpt, other, "auto")
    assert start is None
    assert "other params or data" in note
    with pytest.raises(ProjectError, match="--no-resume"):
        read_checkpoint(ckpt, other, "always")


def test_resume_flag_without_checkpoint_is_an_error(
    prepared_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--resume"]) == 2
    assert "error: --resume: no checkpoint" in capsys.readouterr().err


# --- the stage, with MLflow -----------------------------------------------------------------


def test_train_stage_writes_outputs_and_registers(mlflow_project: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    assert main([]) == 0

    run_info = json.loads(Path("models/run.json").read_text())
    assert run_info["model_name"] == mlflow_project["mlflow"]["model_name"]
    assert run_info["model_version"] == "1"
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["epochs_run"] == mlflow_project["train"]["epochs"]
    assert metrics["train_samples_per_s"] > 0
    history = Path("metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_accuracy"
    assert len(history) == 1 + metrics["epochs_run"]
    assert torch.load("checkpoints/last.pt", weights_only=True)["finished"]
    assert load_model("models/model.pt").feature_names == load_data().schema.features

    client = MlflowClient()
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data.train_md5"] == file_md5("data/processed/train.parquet")
    assert run.data.tags["env.device"] == "cpu"
    assert run.data.params["train.batch_size"] == str(mlflow_project["train"]["batch_size"])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == list(range(1, metrics["epochs_run"] + 1))
    version = client.get_model_version(run_info["model_name"], run_info["model_version"])
    assert version.run_id == run_info["run_id"]


def test_interrupted_stage_resumes_into_the_same_mlflow_run(
    mlflow_project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    with pytest.raises(Interrupt):
        run(mlflow_project, on_epoch_end=stop_after(2))
    interrupted = torch.load("checkpoints/last.pt", weights_only=True)
    assert not interrupted["finished"]
    assert MlflowClient().get_run(interrupted["run_id"]).info.status == "FAILED"

    resumed = run(mlflow_project)
    assert "resuming from checkpoints/last.pt: 2 epoch(s) done" in capsys.readouterr().out
    assert resumed["run_id"] == interrupted["run_id"]
    resumed_metrics = json.loads(Path("metrics/train.json").read_text())
    val_steps = MlflowClient().get_metric_history(resumed["run_id"], "val_loss")
    assert [m.step for m in val_steps] == [1, 2, 3]

    # The checkpoint is finished now: the next run starts fresh and gets the same numbers.
    fresh = run(mlflow_project)
    assert fresh["run_id"] != resumed["run_id"]
    assert fresh["model_version"] == "2"
    fresh_metrics = json.loads(Path("metrics/train.json").read_text())
    for key in ("best_val_loss", "best_val_accuracy", "best_epoch", "final_train_loss"):
        assert fresh_metrics[key] == resumed_metrics[key], key
