"""Rank 0's record of a training run: the MLflow run, its tags, the stage outputs, registration.

``mlflow`` is imported only when a run is opened (it costs seconds); the registry's API
(:mod:`.registry`) does the logging of the model and the registration. Both are idempotent per
run: epochs are logged once each, and a run registers one model version however often the
stage is retried after a crash.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.config import Params
from ..core.fileio import atomic_write_text
from ..core.paths import HISTORY_FILE, MODEL_FILE, RUN_FILE, SEEN_ROWS_ARTIFACT, TRAIN_METRICS
from ..data.prepare import TrainData
from ..model.network import save_model

if TYPE_CHECKING:
    from .distributed import DistContext
    from .loop import FitResult

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
    if experiment := os.environ.get("DVC_EXP_NAME"):  # `dvc exp run`: never promoted
        env["dvc.experiment"] = experiment
    return {**data_tags(data), **git_info(), **env}


class Tracker:
    """Rank 0's MLflow run: created, or reopened when a checkpoint is resumed."""

    def __init__(
        self,
        params: Params,
        run_id: str | None,
        history: list[dict[str, float]],
        tags: dict[str, str],
    ) -> None:
        from ..registry import store as registry

        self.uri = registry.configure(params.mlflow)
        self.run_id, self.experiment_id, logged = registry.open_run(
            run_id, params.flat(), tags, params.mlflow.experiment
        )
        # A resumed checkpoint's epochs that the run lacks: a new run (the old one is gone), or
        # a crash between the checkpoint and its logging.
        self.log_epochs([row for row in history if int(row["epoch"]) not in logged])

    def log_epochs(self, rows: list[dict[str, float]]) -> None:
        """Log the history rows of epochs a checkpoint holds, in one request."""
        from ..registry import store as registry

        registry.log_epochs(self.run_id, rows)

    def end(self, status: str) -> None:
        from ..registry import store as registry

        registry.end_run(status)


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
        "loop_samples_per_s": round(result.loop_samples_per_s, 1),
        "world_size": ctx.world_size,
    }
    atomic_write_text(TRAIN_METRICS, json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    atomic_write_text(HISTORY_FILE, buffer.getvalue())
    return metrics


def publish(
    tracker: Tracker,
    result: FitResult,
    data: TrainData,
    params: Params,
    ctx: DistContext,
    amp: str,
) -> dict[str, Any]:
    """Rank 0 after training: save, log and register the model; write the stage's outputs.

    A retry after a crash that came after the registration finds this run's version and
    registers no second one.
    """
    from ..registry import store as registry

    model = result.model.to("cpu").eval()
    save_model(model, MODEL_FILE)
    metrics = write_outputs(result, ctx)
    with tempfile.TemporaryDirectory(prefix="seen-rows-") as tmp:
        seen = Path(tmp) / SEEN_ROWS_ARTIFACT
        pd.DataFrame({"key": data.seen_keys}).to_parquet(seen, index=False)
        tags = {registry.SEEN_ROWS_TAG: str(len(data.seen_keys))}
        registry.log_run_outputs(tracker.run_id, metrics, HISTORY_FILE, seen, tags=tags)
    name = params.mlflow.model_name
    version = registry.version_of_run(name, tracker.run_id)
    if version is None:
        info = registry.log_model(model, data.example)
        tags = {"run_id": tracker.run_id, **data_tags(data), **git_info()}
        version = registry.register(info.model_uri, name, tags=tags)
    else:
        print(f"note: run {tracker.run_id} already registered {name} v{version}; reusing it")
    run = {
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": registry.portable_uri(tracker.uri),
        "model_name": name,
        "model_version": version,
        "model_uri": f"models:/{name}/{version}",
        "device": str(ctx.device),
        "amp": amp,
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "data_md5": data.md5,
    }
    atomic_write_text(RUN_FILE, json.dumps(run, indent=2) + "\n")
    print(
        f"trained {result.epochs_run} epochs (best {result.best_epoch}: val_loss "
        f"{result.best_val_loss:.4f}, val_accuracy {result.best_val_accuracy:.4f}; "
        f"{result.samples_per_s:,.0f} samples/s) -> {MODEL_FILE}, registered {name} v{version}"
    )
    return run
