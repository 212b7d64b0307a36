"""DVC stage ``train``: fit the model, checkpoint every epoch, log to MLflow and register it.

``python -m <package>.train [--resume | --no-resume] [--device D] [--params FILE]`` from the
project root; ``torchrun --nproc_per_node N -m <package>.train`` for several GPUs, processes or
nodes. Reads the ``seed``, ``model``, ``train`` and ``mlflow`` sections of params.yaml.

Early stopping watches the validation *loss*: on small validation sets accuracy moves in coarse
steps and ties often, while the loss still ranks models. The weights of the best epoch are kept.
The whole dataset lives on the device as tensors; mini-batches are slices of a per-epoch seeded
permutation, so a run is reproducible and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import inspect
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .config import ProjectError, cli_errors, get_param, load_params
from .data import SCHEMA_FILE, Schema, file_md5, load_split
from .distributed import (
    DistContext,
    all_reduce_sum,
    amp_dtype,
    amp_name,
    broadcast,
    gather,
    init_distributed,
    shutdown,
)
from .model import TabularClassifier, atomic_save, build_model, save_model

MODEL_PATH = Path("models/model.pt")
RUN_PATH = Path("models/run.json")
METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/history.csv")
CHECKPOINT_FILE = "last.pt"
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy")
CHECKPOINT_FORMAT = 1
# train.* knobs that do not change what is computed: a checkpoint stays resumable across them.
NOT_FINGERPRINTED = ("resume", "device", "checkpoint_dir")
RESUME_MODES = ("auto", "always", "never")

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section of params.yaml, checked."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    amp: str = "auto"
    device: str = "auto"
    resume: str = "auto"
    checkpoint_dir: Path = Path("checkpoints")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        section = get_param(params, "train")
        if not isinstance(section, dict):
            raise ProjectError("params.yaml: `train` must be a mapping (see the template's)")

        def number(
            key: str, kind: type, low: float, default: Any = None, strict: bool = False
        ) -> Any:
            value = section.get(key, default)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (kind is float or value % 1 == 0)
            if not ok or value < low or (strict and value == low):
                want = "an integer" if kind is int else "a number"
                bound = f"> {low}" if strict else f">= {low}"
                raise ProjectError(
                    f"train.{key} must be {want} {bound}, not {value!r} (params.yaml)"
                )
            return kind(value)

        resume = section.get("resume", "auto")
        if isinstance(resume, bool):  # YAML's true/false
            resume = "always" if resume else "never"
        if resume not in RESUME_MODES:
            modes = ", ".join(RESUME_MODES)
            raise ProjectError(f"train.resume must be one of {modes}, not {resume!r} (params.yaml)")
        return cls(
            epochs=number("epochs", int, 1),
            batch_size=number("batch_size", int, 1),
            lr=number("lr", float, 0, strict=True),
            weight_decay=number("weight_decay", float, 0, 0.0),
            patience=number("patience", int, 0, 0),
            amp=str(section.get("amp", "auto")),
            device=str(section.get("device", "auto")),
            resume=resume,
            checkpoint_dir=Path(section.get("checkpoint_dir", "checkpoints")),
        )


@dataclass
class TrainData:
    """Prepared train/val arrays, their schema, and the md5 of each file (as DVC computes it)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    schema: Schema
    md5: dict[str, str]


def load_data(processed_dir: str | Path = "data/processed") -> TrainData:
    """Load the train and val splits written by the prepare stage."""
    folder = Path(processed_dir)
    x_train, y_train, schema = load_split("train", folder)
    x_val, y_val, _ = load_split("val", folder)
    if len(x_train) == 0 or len(x_val) == 0:
        raise ProjectError(f"{folder}: the train or val split is empty: use more data")
    md5 = {name: file_md5(folder / f"{name}.parquet") for name in ("train", "val")}
    md5["schema"] = file_md5(folder / SCHEMA_FILE)
    raw = json.loads((folder / SCHEMA_FILE).read_text(encoding="utf-8")).get("raw")
    if isinstance(raw, dict) and raw.get("md5"):
        md5["raw"] = str(raw["md5"])
    return TrainData(x_train, y_train, x_val, y_val, schema, md5)


def fingerprint(params: dict[str, Any], data: TrainData, world_size: int = 1) -> str:
    """Hash of everything that decides the training result; a checkpoint resumes only if equal."""
    train = {k: v for k, v in params.get("train", {}).items() if k not in NOT_FINGERPRINTED}
    content = {
        "seed": params.get("seed"),
        "model": params.get("model"),
        "train": train,
        "world_size": world_size,
        "data": {k: data.md5[k] for k in ("train", "val", "schema")},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed every generator; on CUDA also ask PyTorch for deterministic kernels.

    The CPU kernels this model uses are deterministic already, and the switch costs ~4 s of
    imports (torch._inductor), so it is only thrown where GPU kernels (atomics) need it.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ProjectError(f"seed must be an integer in [0, 2**32), not {seed!r}: fix params.yaml")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (libraries draw from the legacy global generator)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        # cuBLAS reads this when it starts; deterministic mode needs it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # Only this process's GPU: asking for every GPU's state would open a context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def read_checkpoint(path: Path, fp: str, mode: str) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint to resume from (None: start fresh) and a line that says why.

    ``mode``: auto resumes an unfinished run with the same fingerprint; always must resume
    (else a ProjectError); never ignores the checkpoint.
    """
    fresh = "use --no-resume (or train.resume: auto) to start a fresh run"
    if mode == "never":
        return None, "starting fresh (resume disabled)" if path.exists() else ""
    if not path.is_file():
        if mode == "always":
            raise ProjectError(f"--resume: no checkpoint at {path} to resume from; {fresh}")
        return None, ""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
    except Exception as exc:  # a truncated or foreign file can fail in many ways
        ok, ckpt = False, repr(exc)
    if not ok:
        if mode == "always":
            raise ProjectError(f"--resume: {path} is not a readable checkpoint; {fresh}")
        return None, f"note: {path} is not a readable checkpoint; starting fresh"
    if ckpt["fingerprint"] != fp:
        if mode == "always":
            raise ProjectError(
                f"--resume: {path} was made with other params (seed/model/train) or data; "
                f"restore those, or {fresh}"
            )
        return None, f"note: {path} is from a run with other params or data; starting fresh"
    if ckpt["finished"]:
        if mode == "always":
            raise ProjectError(f"--resume: the run in {path} already finished; {fresh}")
        return None, ""
    return ckpt, f"resuming from {path}: {ckpt['epoch']} epoch(s) done"


def epoch_indices(n: int, seed: int, epoch: int, ctx: DistContext) -> torch.Tensor:
    """This rank's sample order for ``epoch``: the same permutation on every rank, sharded.

    The permutation is padded by repetition (like DistributedSampler) so that every rank runs
    the same number of steps; DDP would hang if one rank stopped early.
    """
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mixed))
    total = math.ceil(n / ctx.world_size) * ctx.world_size
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]
    return perm[ctx.rank :: ctx.world_size]


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def _evaluate(
    model: TabularClassifier, x: torch.Tensor, y: torch.Tensor, ctx: DistContext
) -> tuple[float, float]:
    """Validation loss and accuracy over every rank's shard (fp32: the stopping rule reads it)."""
    model.eval()
    logits = model(x).float()
    sums = torch.stack(
        [
            F.cross_entropy(logits, y, reduction="sum"),
            (logits.argmax(dim=1) == y).sum().float(),
            torch.tensor(float(len(y)), device=x.device),
        ]
    )
    loss, correct, count = all_reduce_sum(sums, ctx).tolist()
    return loss / count, correct / count


def _train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    cfg: TrainConfig,
) -> torch.Tensor:
    """One pass over ``order`` in mini-batches; returns ``[sum of sample losses, samples]``."""
    net.train()
    losses = []  # kept on the device: reading a loss every step would sync the GPU
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        with autocast():
            loss = F.cross_entropy(net(x.index_select(0, idx)), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(loss.detach())
    sizes = torch.full((len(losses),), float(cfg.batch_size), device=order.device)
    sizes[-1] = len(order) - cfg.batch_size * (len(losses) - 1)
    return torch.stack([torch.stack(losses).float() @ sizes, sizes.sum()])


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Progress:
    """tqdm on a terminal; otherwise (CI, DVC logs) one line every few epochs."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.bar = tqdm(total=total, initial=initial, unit="epoch", disable=not self.tty)

    def update(self, row: dict[str, float]) -> None:
        if self.tty:
            self.bar.set_postfix(
                loss=f"{row['train_loss']:.4f}",
                val_loss=f"{row['val_loss']:.4f}",
                val_acc=f"{row['val_accuracy']:.3f}",
            )
            self.bar.update(1)
        elif self.enabled and (row["epoch"] % self.every == 0 or row["epoch"] == self.total):
            print(
                f"epoch {row['epoch']:>4}/{self.total}  train_loss {row['train_loss']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def _wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP without re-syncing buffers each step: mean/std never change after the first sync."""
    no_sync = (
        {"forward_sync_buffers": False}  # newer PyTorch; broadcast_buffers is deprecated
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)


@dataclass
class FitResult:
    """What :func:`fit` leaves: the best model and the numbers of the whole run."""

    model: TabularClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    stopped_early: bool
    samples: float
    seconds: float
    checkpoint: dict[str, Any] = field(repr=False)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def fit(
    model: TabularClassifier,
    data: TrainData,
    cfg: TrainConfig,
    *,
    ctx: DistContext,
    seed: int,
    fp: str = "",
    start: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    log_epoch: EpochHook | None = None,
    on_epoch_end: EpochHook | None = None,
) -> FitResult:
    """Train ``model`` (from ``start``, a checkpoint, if given) with early stopping on val loss.

    Rank 0 writes ``checkpoint`` after every epoch; ``on_epoch_end`` runs on every rank after it
    (an exception there interrupts the run exactly like a crash).
    """
    device = ctx.device
    amp = amp_dtype(device, cfg.amp)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 range, tensor-core speed
    x_train, y_train = _to_device(data.x_train, device), _to_device(data.y_train, device)
    val_part = np.array_split(np.arange(len(data.y_val)), ctx.world_size)[ctx.rank]
    x_val, y_val = (
        _to_device(data.x_val[val_part], device),
        _to_device(data.y_val[val_part], device),
    )
    model.to(device)
    # fused: one kernel for the whole update instead of several per parameter (CUDA only here)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=True if device.type == "cuda" else None,
    )
    # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fp,
        "finished": False,
        "epoch": 0,
        "best": {"epoch": 0, "val_loss": math.inf, "val_accuracy": 0.0, "state": None},
        "bad_epochs": 0,
        "stopped_early": False,
        "history": [],
        "stats": {"samples": 0.0, "seconds": 0.0},
        "run_id": run_id,
    }
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scaler.load_state_dict(start["scaler"])
        set_rng_state(start["rng"][ctx.rank], device)
        state.update({k: v for k, v in start.items() if k != "run_id"})
        # copies: the loop updates these in place
        state.update(
            best=dict(start["best"]), history=list(start["history"]), stats=dict(start["stats"])
        )
    net = _wrap_ddp(model, device) if ctx.distributed else model
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    progress = _Progress(cfg.epochs, state["epoch"], enabled=ctx.is_main)
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if state["stopped_early"]:
                break
            began = time.perf_counter()
            order = _to_device(epoch_indices(len(y_train), seed, epoch, ctx), device)
            sums = _train_epoch(net, optimizer, scaler, autocast, x_train, y_train, order, cfg)
            loss_total, seen = all_reduce_sum(sums, ctx).tolist()
            state["stats"]["seconds"] += time.perf_counter() - began
            state["stats"]["samples"] += seen
            train_loss = loss_total / seen
            if not math.isfinite(train_loss):
                raise ProjectError(
                    f"training diverged (loss {train_loss}) at epoch {epoch}: lower train.lr, "
                    "or check the data for extreme values"
                )
            val_loss, val_accuracy = _evaluate(model, x_val, y_val, ctx)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            state["history"].append(row)
            best = state["best"]
            if val_loss < best["val_loss"]:
                best.update(epoch=epoch, val_loss=val_loss, val_accuracy=val_accuracy)
                best["state"] = _cpu_state(model)
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
            # Rank 0 decides, so ranks can never disagree about stopping (and then hang).
            stop = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
            state["stopped_early"] = bool(broadcast(stop, ctx))
            state["epoch"] = epoch
            rngs = gather(rng_state(device), ctx)
            if ctx.is_main:
                if log_epoch is not None:
                    log_epoch(epoch, row)
                if checkpoint is not None:
                    state.update(
                        model=_cpu_state(model),
                        optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict(),
                        rng=rngs,
                    )
                    atomic_save(state, checkpoint)
                progress.update(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    finally:
        progress.close()
    best = state["best"]
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return FitResult(
        model=model,
        history=state["history"],
        best_epoch=best["epoch"],
        best_val_loss=best["val_loss"],
        best_val_accuracy=best["val_accuracy"],
        stopped_early=state["stopped_early"],
        samples=state["stats"]["samples"],
        seconds=state["stats"]["seconds"],
        checkpoint=state,
    )


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


class _Tracker:
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


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    _atomic_text(METRICS_PATH, json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    _atomic_text(HISTORY_PATH, buffer.getvalue())
    return metrics


def _publish(
    tracker: _Tracker,
    result: FitResult,
    data: TrainData,
    params: dict[str, Any],
    ctx: DistContext,
    amp: str,
) -> dict[str, Any]:
    """Rank 0 after training: save, log and register the model; write the stage's outputs."""
    import pandas as pd

    from . import registry

    mlflow = tracker.mlflow
    model = result.model.to("cpu").eval()
    save_model(model, MODEL_PATH)
    metrics = write_outputs(result, ctx)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_artifact(str(HISTORY_PATH))
    example = pd.DataFrame(data.x_val[:5], columns=data.schema.features)
    info = registry.log_model(model, example)
    name = str(get_param(params, "mlflow.model_name"))
    version = registry.register(
        info.model_uri, name, tags={"run_id": tracker.run_id, **_data_tags(data), **git_info()}
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
    _atomic_text(RUN_PATH, json.dumps(run, indent=2) + "\n")
    print(
        f"trained {result.epochs_run} epochs (best {result.best_epoch}: val_loss "
        f"{result.best_val_loss:.4f}, val_accuracy {result.best_val_accuracy:.4f}; "
        f"{result.samples_per_s:,.0f} samples/s) -> {MODEL_PATH}, registered {name} v{version}"
    )
    return run


def _data_tags(data: TrainData) -> dict[str, str]:
    return {f"data.{k}_md5": v for k, v in data.md5.items()}


def _run_tags(data: TrainData, ctx: DistContext, amp: str) -> dict[str, str]:
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
    return {**_data_tags(data), **git_info(), **env}


def _start_on_main(
    params: dict[str, Any],
    ckpt_path: Path,
    fp: str,
    mode: str,
    tags: dict[str, str],
    ctx: DistContext,
) -> tuple[_Tracker, dict[str, Any] | None]:
    """Rank 0: pick the checkpoint, open the MLflow run, and tell the other ranks."""
    try:
        start, note = read_checkpoint(ckpt_path, fp, mode)
        if note:
            print(note)
        history = start["history"] if start else []
        tracker = _Tracker(params, start["run_id"] if start else None, history, tags)
    except Exception as exc:
        # Every rank must hear of it, or the others would wait forever in broadcast().
        failure = exc if isinstance(exc, ProjectError) else ProjectError(f"rank 0: {exc!r}")
        broadcast(("error", failure), ctx)
        raise
    broadcast(("ok", start), ctx)
    return tracker, start


def run(
    params: dict[str, Any],
    *,
    resume: str | None = None,
    device: str | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
    """The train stage: returns models/run.json's content (rank 0; ``{}`` on other ranks).

    ``resume`` (auto/always/never) overrides train.resume; ``device`` overrides train.device
    and the TRAIN_DEVICE variable.
    """
    cfg = TrainConfig.from_params(params)
    mode = resume or cfg.resume
    seed = get_param(params, "seed")
    ctx = init_distributed(
        device or cfg.device,
        source="--device" if device else "train.device",
        env_override=device is None,
    )
    try:
        seed_everything(seed, ctx.device)
        data = load_data(get_param(params, "data.processed_dir", "data/processed"))
        fp = fingerprint(params, data, ctx.world_size)
        model = build_model(data.schema, params.get("model") or {}, data.x_train)
        torch.manual_seed(seed + ctx.rank)  # same init everywhere, own dropout masks per rank
        ckpt_path = cfg.checkpoint_dir / CHECKPOINT_FILE
        amp = amp_name(amp_dtype(ctx.device, cfg.amp))
        tracker, start = None, None
        if ctx.is_main:
            tracker, start = _start_on_main(
                params, ckpt_path, fp, mode, _run_tags(data, ctx, amp), ctx
            )
        else:
            status, start = broadcast(None, ctx)
            if status == "error":
                raise start
        try:
            result = fit(
                model,
                data,
                cfg,
                ctx=ctx,
                seed=seed,
                fp=fp,
                start=start,
                checkpoint=ckpt_path if ctx.is_main else None,
                run_id=tracker.run_id if tracker else None,
                log_epoch=tracker.log_epoch if tracker else None,
                on_epoch_end=on_epoch_end,
            )
            summary: dict[str, Any] = {}
            if tracker is not None:
                summary = _publish(tracker, result, data, params, ctx, amp)
                atomic_save({**result.checkpoint, "finished": True}, ckpt_path)
        except BaseException as exc:
            if tracker is not None:
                tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if tracker is not None:
            tracker.end("FINISHED")
        return summary
    finally:
        shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.train",
        description="Train the model, log it to MLflow and register it (DVC stage `train`).",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const="always",
        help="continue the unfinished run in the checkpoint (error if there is none)",
    )
    group.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const="never",
        help="start fresh even if an unfinished checkpoint matches",
    )
    parser.add_argument(
        "--device", help="auto, cpu, cuda, cuda:N or mps (overrides train.device and TRAIN_DEVICE)"
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``train`` stage."""
    args = parse_args(argv)
    params = load_params(args.params)
    # Schedulers and torchrun stop a job with SIGTERM: end it like Ctrl-C, MLflow run included.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        run(params, resume=args.resume, device=args.device)
    except KeyboardInterrupt:
        print(
            "interrupted: finished epochs are saved in the checkpoint; run again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
