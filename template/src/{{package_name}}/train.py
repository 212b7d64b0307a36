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
import inspect
import json
import math
import os
import random
import signal
import sys
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

from .checkpoint import (
    CHECKPOINT_FILE,
    RESUME_MODES,
    cpu_state,
    fingerprint,
    mark_finished,
    new_state,
    read_checkpoint,
    restore,
    rng_state,
    save,
)
from .config import ProjectError, cli_errors, get_param, load_params
from .data import PROCESSED_DIR, SCHEMA_FILE, Schema, file_md5, load_split
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
from .model import TabularClassifier, build_model
from .tracking import Tracker, ending, publish, run_tags

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


def load_data(processed_dir: str | Path = PROCESSED_DIR) -> TrainData:
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


@dataclass
class _Loop:
    """What every epoch works with: the data on the device, the model and its optimizer."""

    model: TabularClassifier
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor  # this rank's part of the validation set
    y_val: torch.Tensor
    cfg: TrainConfig
    ctx: DistContext
    seed: int


def _train_epoch(loop: _Loop, order: torch.Tensor) -> torch.Tensor:
    """One pass over ``order`` in mini-batches; returns ``[sum of sample losses, samples]``."""
    loop.net.train()
    size = loop.cfg.batch_size
    losses = []  # kept on the device: reading a loss every step would sync the GPU
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        with loop.autocast():
            logits = loop.net(loop.x_train.index_select(0, idx))
            loss = F.cross_entropy(logits, loop.y_train.index_select(0, idx))
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.scaler.is_enabled():
            loop.scaler.scale(loss).backward()
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            loss.backward()
            loop.optimizer.step()
        losses.append(loss.detach())
    sizes = torch.full((len(losses),), float(size), device=order.device)
    sizes[-1] = len(order) - size * (len(losses) - 1)
    return torch.stack([torch.stack(losses).float() @ sizes, sizes.sum()])


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


def _setup(
    model: TabularClassifier,
    data: TrainData,
    cfg: TrainConfig,
    ctx: DistContext,
    seed: int,
    state: dict[str, Any],
    start: dict[str, Any] | None,
) -> _Loop:
    """Move data and model to the device, build the optimizer, and resume from ``start``."""
    device = ctx.device
    amp = amp_dtype(device, cfg.amp)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 range, tensor-core speed
    val_part = np.array_split(np.arange(len(data.y_val)), ctx.world_size)[ctx.rank]
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
    if start is not None:
        restore(state, start, model, optimizer, scaler, ctx.rank, device)
    return _Loop(
        model=model,
        net=_wrap_ddp(model, device) if ctx.distributed else model,
        optimizer=optimizer,
        scaler=scaler,
        autocast=(lambda: torch.autocast(device.type, dtype=amp))
        if amp
        else contextlib.nullcontext,
        x_train=_to_device(data.x_train, device),
        y_train=_to_device(data.y_train, device),
        x_val=_to_device(data.x_val[val_part], device),
        y_val=_to_device(data.y_val[val_part], device),
        cfg=cfg,
        ctx=ctx,
        seed=seed,
    )


def _epoch(loop: _Loop, state: dict[str, Any], epoch: int) -> dict[str, float]:
    """Train one epoch and validate; returns the epoch's row of the history."""
    began = time.perf_counter()
    order = _to_device(
        epoch_indices(len(loop.y_train), loop.seed, epoch, loop.ctx), loop.ctx.device
    )
    loss_total, seen = all_reduce_sum(_train_epoch(loop, order), loop.ctx).tolist()
    state["stats"]["seconds"] += time.perf_counter() - began
    state["stats"]["samples"] += seen
    train_loss = loss_total / seen
    if not math.isfinite(train_loss):
        raise ProjectError(
            f"training diverged (loss {train_loss}) at epoch {epoch}: lower train.lr, "
            "or check the data for extreme values"
        )
    val_loss, val_accuracy = _evaluate(loop.model, loop.x_val, loop.y_val, loop.ctx)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
    }


def _early_stopping(loop: _Loop, state: dict[str, Any], row: dict[str, float]) -> None:
    """Record the epoch: keep the best weights, count epochs without progress, decide to stop."""
    state["history"].append(row)
    best = state["best"]
    if row["val_loss"] < best["val_loss"]:
        best.update(epoch=row["epoch"], val_loss=row["val_loss"], val_accuracy=row["val_accuracy"])
        best["state"] = cpu_state(loop.model)
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
    # Rank 0 decides, so ranks can never disagree about stopping (and then hang).
    stop = loop.cfg.patience > 0 and state["bad_epochs"] >= loop.cfg.patience
    state["stopped_early"] = bool(broadcast(stop, loop.ctx))
    state["epoch"] = row["epoch"]


def _result(model: TabularClassifier, state: dict[str, Any]) -> FitResult:
    """The best epoch's model (in eval mode) and the run's numbers."""
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
    state = new_state(fp, run_id)
    loop = _setup(model, data, cfg, ctx, seed, state, start)
    progress = _Progress(cfg.epochs, state["epoch"], enabled=ctx.is_main)
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if state["stopped_early"]:
                break
            row = _epoch(loop, state, epoch)
            _early_stopping(loop, state, row)
            rngs = gather(rng_state(ctx.device), ctx)
            if ctx.is_main:
                if log_epoch is not None:
                    log_epoch(epoch, row)
                if checkpoint is not None:
                    save(state, checkpoint, model, loop.optimizer, loop.scaler, rngs)
                progress.update(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    finally:
        progress.close()
    return _result(model, state)


def _start(
    params: dict[str, Any],
    ckpt_path: Path,
    fp: str,
    mode: str,
    data: TrainData,
    ctx: DistContext,
    amp: str,
) -> tuple[Tracker | None, dict[str, Any] | None]:
    """Rank 0 picks the checkpoint and opens the MLflow run; the other ranks hear its choice."""
    if not ctx.is_main:
        status, start = broadcast(None, ctx)
        if status == "error":
            raise start
        return None, start
    try:
        start, note = read_checkpoint(ckpt_path, fp, mode)
        if note:
            print(note)
        history = start["history"] if start else []
        run_id = start["run_id"] if start else None
        tracker = Tracker(params, run_id, history, run_tags(data, ctx, amp))
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
    seed = get_param(params, "seed")
    ctx = init_distributed(
        device or cfg.device,
        source="--device" if device else "train.device",
        env_override=device is None,
    )
    try:
        seed_everything(seed, ctx.device)
        data = load_data()
        fp = fingerprint(params, data, ctx.world_size)
        model = build_model(data.schema, params.get("model") or {}, data.x_train)
        torch.manual_seed(seed + ctx.rank)  # same init everywhere, own dropout masks per rank
        ckpt_path = cfg.checkpoint_dir / CHECKPOINT_FILE
        amp = amp_name(amp_dtype(ctx.device, cfg.amp))
        tracker, start = _start(params, ckpt_path, fp, resume or cfg.resume, data, ctx, amp)
        with ending(tracker):
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
            if tracker is None:
                return {}
            summary = publish(tracker, result, data, params, ctx, amp)
            mark_finished(result.checkpoint, ckpt_path)
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
