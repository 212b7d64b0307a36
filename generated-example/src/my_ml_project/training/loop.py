"""The training loop: mini-batches on the device, validation, early stopping, checkpoints.

Early stopping watches the validation *loss*: on small validation sets accuracy moves in coarse
steps and ties often, while the loss still ranks models. The weights of the best epoch are kept.
The whole dataset lives on the device as tensors; mini-batches are slices of a per-epoch seeded
permutation, so a run is reproducible and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..core.config import ProjectError, TrainParams
from ..data.prepare import TrainData
from ..model.network import TabularClassifier
from .checkpoint import Checkpoint, cpu_state, new_state, restore, rng_state, save
from .distributed import DistContext, all_reduce_sum, amp_dtype, broadcast, gather

EpochHook = Callable[[int, dict[str, float]], None]
# Receives the history rows of the epochs a checkpoint has just made durable.
LogHook = Callable[[list[dict[str, float]]], None]


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
    cfg: TrainParams
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
    no_sync: dict[str, Any] = (
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
    seconds: float  # in the training steps only
    loop_seconds: float  # the whole loop: steps, validation, checkpoints, logging
    checkpoint: Checkpoint = field(repr=False)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def loop_samples_per_s(self) -> float:
        return self.samples / self.loop_seconds if self.loop_seconds > 0 else 0.0


def _setup(
    model: TabularClassifier,
    data: TrainData,
    cfg: TrainParams,
    ctx: DistContext,
    seed: int,
    state: Checkpoint,
    start: Checkpoint | None,
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


def _epoch(loop: _Loop, state: Checkpoint, epoch: int) -> dict[str, float]:
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


def _early_stopping(loop: _Loop, state: Checkpoint, row: dict[str, float]) -> None:
    """Record the epoch: keep the best weights, count epochs without progress, decide to stop."""
    state["history"].append(row)
    best = state["best"]
    if row["val_loss"] < best["val_loss"]:
        best["epoch"] = int(row["epoch"])
        best["val_loss"] = row["val_loss"]
        best["val_accuracy"] = row["val_accuracy"]
        best["state"] = cpu_state(loop.model)
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
    # Rank 0 decides, so ranks can never disagree about stopping (and then hang).
    stop = loop.cfg.patience > 0 and state["bad_epochs"] >= loop.cfg.patience
    state["stopped_early"] = bool(broadcast(stop, loop.ctx))
    state["epoch"] = int(row["epoch"])


def _result(model: TabularClassifier, state: Checkpoint) -> FitResult:
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
        loop_seconds=state["stats"]["loop_seconds"],
        checkpoint=state,
    )


def fit(
    model: TabularClassifier,
    data: TrainData,
    cfg: TrainParams,
    *,
    ctx: DistContext,
    seed: int,
    fp: str = "",
    start: Checkpoint | None = None,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    log_epochs: LogHook | None = None,
    on_epoch_end: EpochHook | None = None,
) -> FitResult:
    """Train ``model`` (from ``start``, a checkpoint, if given) with early stopping on val loss.

    Rank 0 writes ``checkpoint`` every ``cfg.checkpoint_every`` epochs and after the last one,
    and only then hands those epochs to ``log_epochs``: a crash never leaves an epoch logged that
    a resumed run will train (and log) again. ``on_epoch_end`` runs on every rank after each
    epoch (an exception there interrupts the run exactly like a crash).
    """
    state = new_state(fp, run_id)
    loop = _setup(model, data, cfg, ctx, seed, state, start)
    progress = _Progress(cfg.epochs, state["epoch"], enabled=ctx.is_main)
    pending: list[dict[str, float]] = []  # epochs done but not yet in a checkpoint
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if state["stopped_early"]:
                break
            began = time.perf_counter()
            row = _epoch(loop, state, epoch)
            _early_stopping(loop, state, row)
            pending.append(row)
            last = epoch == cfg.epochs or state["stopped_early"]
            if last or epoch % cfg.checkpoint_every == 0:
                rngs = gather(rng_state(ctx.device), ctx)  # collective: every rank takes part
                if ctx.is_main and checkpoint is not None:
                    save(state, checkpoint, model, loop.optimizer, loop.scaler, rngs)
                if ctx.is_main and log_epochs is not None:
                    log_epochs(pending)
                pending = []
            # The epoch's whole cost, its checkpoint and logging included (a checkpoint holds
            # the time up to the epoch before it: its own write is not known yet).
            state["stats"]["loop_seconds"] += time.perf_counter() - began
            if ctx.is_main:
                progress.update(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    finally:
        progress.close()
    return _result(model, state)
