"""The train stage: devices, the loop, checkpoints and resume, MLflow logging and registration."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from my_ml_project.core.config import Params, ProjectError
from my_ml_project.core.fileio import file_md5
from my_ml_project.data.prepare import load_train_data
from my_ml_project.model.network import build_model, load_model
from my_ml_project.training import checkpoint, loop, train
from my_ml_project.training.checkpoint import fingerprint, read_checkpoint
from my_ml_project.training.distributed import DistContext, amp_dtype, resolve_device
from my_ml_project.training.loop import FitResult, epoch_indices, fit
from my_ml_project.training.train import main, run, seed_everything

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
    from my_ml_project.registry.store import init_store

    uri = f"sqlite:///{(tmp_path_factory.mktemp('mlflow') / 'mlflow.db').as_posix()}"
    init_store(uri)
    return uri


@pytest.fixture
def mlflow_project(
    prepared_project: Path,
    tracking_db: str,
    monkeypatch: pytest.MonkeyPatch,
    update_params: Callable[[dict[str, Any]], Params],
    request: pytest.FixtureRequest,
) -> Params:
    """A prepared project logging to the session's store, under a model name of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    return update_params({"mlflow": {"model_name": request.node.name.replace("_", "-")}})


def train_in_process(params: Params, **kwargs: Any) -> FitResult:
    """The stage's loop without MLflow: fit() on the prepared data."""
    seed_everything(params.seed)
    data = load_train_data()
    model = build_model(data.schema, params.model, data.x_train)
    return fit(model, data, params.train, ctx=CPU, seed=params.seed, fp="fp", **kwargs)


def logged_steps(run_id: str, key: str = "val_loss") -> list[int]:
    from mlflow import MlflowClient

    return [m.step for m in MlflowClient().get_metric_history(run_id, key)]


@contextlib.contextmanager
def forced_fp16() -> Iterator[None]:
    """Mixed precision as on a GPU without bf16 (fp16 + a gradient scaler), forced on the CPU."""

    def fp16(device: torch.device, mode: str = "auto") -> torch.dtype:
        return torch.float16

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "amp_dtype", fp16)
        patch.setattr(train, "amp_dtype", fp16)
        yield


# --- devices -------------------------------------------------------------------------------


def test_resolve_device_auto_prefers_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRAIN_DEVICE", raising=False)
    available = {"cuda": False, "mps": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available["cuda"])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available["mps"])
    assert resolve_device("auto") == torch.device("cpu")
    available["mps"] = True
    assert resolve_device("auto") == torch.device("mps")
    available["cuda"] = True
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
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


def test_bad_device_and_amp_are_clear_errors() -> None:
    with pytest.raises(ProjectError, match="choose one of"):
        resolve_device("tpu")
    with pytest.raises(ProjectError, match=r"train\.amp"):
        amp_dtype(torch.device("cpu"), "fp8")


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
    prepared_project: Path, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    params = update_params({"train": {"epochs": 5}})
    first, second = train_in_process(params), train_in_process(params)
    losses = [row["train_loss"] for row in first.history]
    assert losses[-1] < losses[0]
    assert first.history == second.history
    assert first.epochs_run == 5
    assert first.best_val_loss == min(row["val_loss"] for row in first.history)


def test_early_stopping_keeps_the_best_weights(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    # A huge learning rate makes the validation loss jump around, so patience 1 triggers.
    params = update_params({"train": {"epochs": 30, "patience": 1, "lr": 1.0}})
    result = train_in_process(params)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 1 < 30
    data = load_train_data()
    logits = result.model(torch.from_numpy(data.x_val))
    val_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.y_val)).item()
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_resumed_run_equals_uninterrupted_run(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], Params], every: int
) -> None:
    params = update_params({"train": {"epochs": 6, "checkpoint_every": every}})
    ckpt = prepared_project / "checkpoints" / "last.pt"
    whole = train_in_process(params, checkpoint=ckpt)
    ckpt.unlink()

    with pytest.raises(Interrupt):
        train_in_process(params, checkpoint=ckpt, on_epoch_end=stop_after(3))
    start, note = read_checkpoint(ckpt, "fp", "auto")
    assert start is not None
    assert start["epoch"] == (3 if every == 1 else 2)  # the last checkpointed epoch
    assert "resuming" in note
    resumed = train_in_process(params, checkpoint=ckpt, start=start)

    assert resumed.history == whole.history
    assert resumed.epochs_run == 6
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_fp16_scaler_state_is_checkpointed_and_resumed(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    params = update_params({"train": {"epochs": 4}})
    ckpt = prepared_project / "checkpoints" / "last.pt"
    with forced_fp16():
        whole = train_in_process(params, checkpoint=ckpt)
        saved = torch.load(ckpt, weights_only=True)["scaler"]
        assert saved["scale"] > 0  # an enabled scaler's state, not a disabled one's (empty)
        ckpt.unlink()
        with pytest.raises(Interrupt):
            train_in_process(params, checkpoint=ckpt, on_epoch_end=stop_after(2))
        start, _ = read_checkpoint(ckpt, "fp", "always")
        resumed = train_in_process(params, checkpoint=ckpt, start=start)
    assert resumed.history == whole.history


def test_fingerprint_covers_device_precision_and_source(
    prepared_project: Path,
    update_params: Callable[[dict[str, Any]], Params],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params, data = update_params({}), load_train_data()
    base = fingerprint(params, data)
    assert fingerprint(params, data, device="cuda") != base
    assert fingerprint(params, data, amp="fp16") != base
    assert fingerprint(params, data, world_size=2) != base
    assert fingerprint(update_params({"seed": params.seed + 1}), data) != base
    # Knobs that do not change the result keep the checkpoint resumable.
    same = update_params({"seed": params.seed, "train": {"resume": "never", "checkpoint_every": 3}})
    assert fingerprint(same, data) == base
    monkeypatch.setattr(checkpoint, "source_digest", lambda: "edited")
    assert fingerprint(same, data) != base


def test_checkpoint_resume_modes(
    prepared_project: Path, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    params = update_params({"train": {"epochs": 2}})
    ckpt = prepared_project / "checkpoints" / "last.pt"
    with pytest.raises(ProjectError, match="no checkpoint"):
        read_checkpoint(ckpt, "fp", "always")
    with pytest.raises(Interrupt):
        train_in_process(params, checkpoint=ckpt, on_epoch_end=stop_after(1))

    assert read_checkpoint(ckpt, "fp", "always")[0] is not None
    assert read_checkpoint(ckpt, "fp", "never")[0] is None
    start, note = read_checkpoint(ckpt, "other", "auto")
    assert start is None
    assert "starting a fresh run" in note
    with pytest.raises(ProjectError, match="--no-resume"):
        read_checkpoint(ckpt, "other", "always")

    ckpt.write_bytes(b"not a checkpoint")
    start, note = read_checkpoint(ckpt, "fp", "auto")
    assert start is None
    assert "not a readable checkpoint; starting a fresh run" in note
    with pytest.raises(ProjectError, match="not a readable checkpoint"):
        read_checkpoint(ckpt, "fp", "always")


def test_resume_flag_without_checkpoint_is_an_error(
    prepared_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--resume"]) == 2
    assert "error: --resume: no checkpoint" in capsys.readouterr().err


# --- the stage, with MLflow -----------------------------------------------------------------


def test_train_stage_writes_outputs_and_registers(mlflow_project: Params) -> None:
    from mlflow import MlflowClient

    assert main([]) == 0

    run_info = json.loads(Path("models/run.json").read_text())
    assert run_info["model_name"] == mlflow_project.mlflow.model_name
    assert run_info["model_version"] == "1"
    assert not Path(run_info["tracking_uri"].removeprefix("sqlite:///")).is_relative_to(Path.cwd())
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["epochs_run"] == mlflow_project.train.epochs
    assert metrics["train_samples_per_s"] > 0
    history = Path("metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,val_accuracy"
    assert len(history) == 1 + metrics["epochs_run"]
    assert torch.load("checkpoints/last.pt", weights_only=True)["finished"]
    assert load_model("models/model.pt").feature_names == load_train_data().schema.features

    client = MlflowClient()
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data.train_md5"] == file_md5("data/processed/train.parquet")
    assert run.data.tags["env.device"] == "cpu"
    assert run.data.params["train.batch_size"] == str(mlflow_project.train.batch_size)
    assert logged_steps(run.info.run_id) == list(range(1, metrics["epochs_run"] + 1))
    version = client.get_model_version(run_info["model_name"], run_info["model_version"])
    assert version.run_id == run_info["run_id"]


def test_interrupted_stage_resumes_into_the_same_mlflow_run(
    mlflow_project: Params, capsys: pytest.CaptureFixture[str]
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
    assert logged_steps(resumed["run_id"]) == [1, 2, 3]

    # The checkpoint is finished now: the next run starts fresh and gets the same numbers.
    fresh = run(mlflow_project)
    assert fresh["run_id"] != resumed["run_id"]
    assert fresh["model_version"] == "2"
    fresh_metrics = json.loads(Path("metrics/train.json").read_text())
    for key in ("best_val_loss", "best_val_accuracy", "best_epoch", "final_train_loss"):
        assert fresh_metrics[key] == resumed_metrics[key], key


@pytest.mark.parametrize("every", [1, 2])
def test_crash_while_checkpointing_logs_each_epoch_once(
    mlflow_project: Params,
    update_params: Callable[[dict[str, Any]], Params],
    monkeypatch: pytest.MonkeyPatch,
    every: int,
) -> None:
    params = update_params({"train": {"epochs": 4, "checkpoint_every": every}})
    real_save = loop.save

    def crash_at_epoch_4(state: dict[str, Any], *args: Any) -> None:
        if state["epoch"] == 4:
            raise Interrupt  # killed while writing epoch 4's checkpoint
        real_save(state, *args)

    monkeypatch.setattr(loop, "save", crash_at_epoch_4)
    with pytest.raises(Interrupt):
        run(params)
    run_id = torch.load("checkpoints/last.pt", weights_only=True)["run_id"]
    checkpointed = [1, 2, 3] if every == 1 else [1, 2]
    assert logged_steps(run_id) == checkpointed  # epoch 4 never reached a checkpoint
    monkeypatch.setattr(loop, "save", real_save)
    resumed = run(params)
    assert resumed["run_id"] == run_id
    assert logged_steps(run_id) == [1, 2, 3, 4]
    assert logged_steps(run_id, "train_loss") == [1, 2, 3, 4]


def test_crash_after_registration_registers_no_second_version(
    mlflow_project: Params, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    def crash(*args: Any) -> None:
        raise Interrupt  # killed after registering, before the run was marked finished

    real = train.mark_finished
    monkeypatch.setattr(train, "mark_finished", crash)
    with pytest.raises(Interrupt):
        run(mlflow_project)
    monkeypatch.setattr(train, "mark_finished", real)
    again = run(mlflow_project)
    assert "already registered" in capsys.readouterr().out
    name = mlflow_project.mlflow.model_name
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert again["model_version"] == "1"


def test_fp16_checkpoint_is_not_resumed_without_fp16(
    mlflow_project: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    with forced_fp16(), pytest.raises(Interrupt):
        run(mlflow_project, on_epoch_end=stop_after(1))
    assert torch.load("checkpoints/last.pt", weights_only=True)["scaler"]["scale"] > 0
    # Back in full precision: loading that scaler state would fail, so it is not resumed.
    with pytest.raises(ProjectError, match="device type or mixed precision"):
        run(mlflow_project, resume="always")
    result = run(mlflow_project)
    assert "starting a fresh run" in capsys.readouterr().out
    assert result["amp"] == "off"
