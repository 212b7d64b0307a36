"""Rank 0's record of a training run: the MLflow run, its tags, the stage outputs, registration.

``mlflow`` is imported only when a run is opened (it costs seconds); the registry's API
(:mod:`.registry`) does the logging of the model and the registration.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import get_param
from .data import atomic_write
from .model import save_model

if TYPE_CHECKING:
    from .distributed import DistContext
    from .train import FitResult, TrainData

MODEL_PATH = Path("models/model.pt")
RUN_PATH = Path("models/run.json")
METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/history.csv")
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy")


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the project's git checkout; empty outside one."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=20)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


def data_tags(data: TrainData) -> dict[str, str]:
    """The md5 of each input file, as ``data.<name>_md5`` tags."""
    return {f"data.{k}_md5": v for k, v in data.md5.items()}


def run_tags(data: TrainData, ctx: DistContext, amp: str) -> dict[str, str]:
    """Tags of the MLflow run: data hashes, git commit, and the software and hardware used."""
    env = {
        "env.torch": torch.__version__,
        "env.python": sys.version.split()[0],
        "env.device": str(ctx.device),
        "env.amp": amp,
        "env.world_size": str(ctx.world_size),
    }
    if ctx.device.type == "cuda":
        env["env.gpu"] = torch.cuda.get_device_name(ctx.device)
        env["env.cuda"] = str(torch.version.cuda)
    return {**data_tags(data), **git_info(), **env}


class Tracker:
    """Rank 0's MLflow run: created, or reopened when a checkpoint is resumed."""

    def __init__(
        self,
        params: dict[str, Any],
        run_id: str | None,
        history: list[dict[str, float]],
        tags: dict[str, str],
    ) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        from . import registry

        self.mlflow = mlflow
        self.uri = registry.configure(params)
        run = None
        if run_id:
            try:
                run = mlflow.start_run(run_id=run_id)
            except MlflowException:
                print(f"note: MLflow run {run_id} is not in {self.uri}; logging to a new run")
        if run is None:
            run = mlflow.start_run()
            mlflow.log_params(flatten(params))
            for row in history:  # a resumed run's earlier epochs, so the new run is complete
                self.log_epoch(int(row["epoch"]), row)
        mlflow.set_tags(tags)  # again on resume: the device or the commit may have changed
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def end(self, status: str) -> None:
        self.mlflow.end_run(status=status)


@contextlib.contextmanager
def ending(tracker: Tracker | None) -> Iterator[None]:
    """End the MLflow run as the block ends: finished, failed or killed (no-op without a run)."""
    try:
        yield
    except BaseException as exc:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.end("FINISHED")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_outputs(result: FitResult, ctx: DistContext) -> dict[str, float]:
    """metrics/train.json (numbers only) and metrics/history.csv; returns the metrics."""
    metrics = {
        "best_val_loss": result.best_val_loss,
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": int(result.stopped_early),
        "final_train_loss": result.history[-1]["train_loss"] if result.history else math.nan,
        "train_samples_per_s": round(result.samples_per_s, 1),
        "train_seconds": round(result.seconds, 3),
        "world_size": ctx.world_size,
    }
    _write_text(METRICS_PATH, json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    _write_text(HISTORY_PATH, buffer.getvalue())
    return metrics


def publish(
    tracker: Tracker,
    result: FitResult,
    data: TrainData,
    params: dict[str, Any],
    ctx: DistContext,
    amp: str,
) -> dict[str, Any]:
    """Rank 0 after training: save, log and register the model; write the stage's outputs."""
    import pandas as pd

    from . import registry

    model = result.model.to("cpu").eval()
    save_model(model, MODEL_PATH)
    metrics = write_outputs(result, ctx)
    tracker.mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.mlflow.log_artifact(str(HISTORY_PATH))
    example = pd.DataFrame(data.x_val[:5], columns=data.schema.features)
    info = registry.log_model(model, example)
    name = str(get_param(params, "mlflow.model_name"))
    version = registry.register(
        info.model_uri, name, tags={"run_id": tracker.run_id, **data_tags(data), **git_info()}
    )
    run = {
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.uri,
        "model_name": name,
        "model_version": version,
        "model_uri": f"models:/{name}/{version}",
        "logged_model_uri": info.model_uri,
        "device": str(ctx.device),
        "amp": amp,
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "data_md5": data.md5,
    }
    _write_text(RUN_PATH, json.dumps(run, indent=2) + "\n")
    print(
        f"trained {result.epochs_run} epochs (best {result.best_epoch}: val_loss "
        f"{result.best_val_loss:.4f}, val_accuracy {result.best_val_accuracy:.4f}; "
        f"{result.samples_per_s:,.0f} samples/s) -> {MODEL_PATH}, registered {name} v{version}"
    )
    return run
