"""Training checkpoints: their format, the fingerprint that guards resume, and the RNG state.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` accepts, typed here as
:class:`TrainState` (what the loop updates) and :class:`Checkpoint` (that, plus the weights,
optimizer, scaler and every rank's generator state, as saved). Rank 0 rewrites it
atomically every ``train.checkpoint_every`` epochs and after the last, so a crash leaves the last
checkpointed epoch; a resumed run repeats an uninterrupted one exactly because every rank's
generator state is saved with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import numpy as np
import torch

from ..core import layout
from ..core.config import Params, ProjectError
from ..core.fileio import atomic_write
from ..data.prepare import TrainData

CHECKPOINT_FORMAT = 2
# train.* knobs that do not change what is computed: a checkpoint stays resumable across them.
NOT_FINGERPRINTED = ("resume", "device", "checkpoint_dir", "checkpoint_every")


def source_digest() -> str:
    """Hash of the code training runs (the subpackages ``training.train`` imports, as ``dvc.yaml``
    lists them): a checkpoint of other code is not resumed; an edit elsewhere does not matter."""
    return layout.source_digest("training.train")


def fingerprint(
    params: Params, data: TrainData, *, world_size: int = 1, device: str = "cpu", amp: str = "off"
) -> str:
    """Hash of everything a checkpoint must match to be resumed.

    The params and data that decide the result, the number of processes (the shards), the device
    type and mixed-precision mode (an fp16 scaler state cannot go into a disabled scaler; CUDA
    and CPU kernels differ), and the package's source.
    """
    content = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED)),
        "world_size": world_size,
        "device": torch.device(device).type,
        "amp": amp,
        "source": source_digest(),
        "data": {k: data.md5[k] for k in ("train", "val", "schema")},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Best(TypedDict):
    """The best epoch so far (lowest validation loss) and its weights."""

    epoch: int
    val_loss: float
    val_accuracy: float
    state: dict[str, torch.Tensor] | None


class Stats(TypedDict):
    """Throughput counters, summed over resumed runs."""

    samples: float
    seconds: float  # in the training steps only
    loop_seconds: float  # the whole loop: steps, validation, checkpoints, logging


class RngState(TypedDict):
    """One process's generator states."""

    python: tuple[Any, ...]
    numpy: tuple[str, list[int], int, int, float]
    torch: torch.Tensor
    cuda: torch.Tensor | None


class TrainState(TypedDict):
    """What the loop carries from epoch to epoch, and a resumed run starts from."""

    format: int
    fingerprint: str
    finished: bool
    epoch: int
    best: Best
    bad_epochs: int
    stopped_early: bool
    history: list[dict[str, float]]
    stats: Stats
    run_id: str | None


class Checkpoint(TrainState):
    """A saved checkpoint: the state, and what resuming needs to continue exactly."""

    model: NotRequired[dict[str, torch.Tensor]]
    optimizer: NotRequired[dict[str, Any]]
    scaler: NotRequired[dict[str, Any]]
    rng: NotRequired[list[RngState]]


def rng_state(device: torch.device) -> RngState:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # Only this process's GPU: asking for every GPU's state would open a context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: RngState, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU (the loop keeps training the original)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def new_state(fp: str, run_id: str | None) -> Checkpoint:
    """The checkpoint of a run before its first epoch."""
    return {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fp,
        "finished": False,
        "epoch": 0,
        "best": {"epoch": 0, "val_loss": math.inf, "val_accuracy": 0.0, "state": None},
        "bad_epochs": 0,
        "stopped_early": False,
        "history": [],
        "stats": {"samples": 0.0, "seconds": 0.0, "loop_seconds": 0.0},
        "run_id": run_id,
    }


def restore(
    state: Checkpoint,
    start: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rank: int,
    device: torch.device,
) -> None:
    """Load checkpoint ``start`` into the model, optimizer, scaler, RNGs and ``state``."""
    model.load_state_dict(start["model"])
    optimizer.load_state_dict(start["optimizer"])
    scaler.load_state_dict(start["scaler"])
    set_rng_state(start["rng"][rank], device)
    run_id = state["run_id"]
    state.update(start)
    # copies: the loop updates these in place
    state["run_id"] = run_id
    state["best"] = Best(**start["best"])
    state["history"] = list(start["history"])
    state["stats"] = Stats(**start["stats"])


def save(
    state: Checkpoint,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rngs: list[RngState],
) -> None:
    """Write the checkpoint of the epoch just done (rank 0; ``rngs``: every rank's state)."""
    state["model"] = cpu_state(model)
    state["optimizer"] = optimizer.state_dict()
    state["scaler"] = scaler.state_dict()
    state["rng"] = rngs
    atomic_write(path, lambda fh: torch.save(state, fh))


def mark_finished(state: Checkpoint, path: Path) -> None:
    """Rewrite the checkpoint as finished: ``resume: auto`` then starts the next run fresh."""
    finished: Checkpoint = {**state, "finished": True}
    atomic_write(path, lambda fh: torch.save(finished, fh))


def read_checkpoint(path: Path, fp: str, mode: str) -> tuple[Checkpoint | None, str]:
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
    ckpt = _load(path)
    if ckpt is None:
        if mode == "always":
            raise ProjectError(f"--resume: {path} is not a readable checkpoint; {fresh}")
        return None, f"note: {path} is not a readable checkpoint; starting a fresh run"
    if ckpt["fingerprint"] != fp:
        if mode == "always":
            raise ProjectError(
                f"--resume: {path} was made with other params (seed/model/train), data, code, "
                f"device type or mixed precision; restore those, or {fresh}"
            )
        return None, (
            f"note: {path} is from a run with other params, data, code, device or precision; "
            "starting a fresh run"
        )
    if ckpt["finished"]:
        if mode == "always":
            raise ProjectError(f"--resume: the run in {path} already finished; {fresh}")
        return None, ""
    return ckpt, f"resuming from {path}: {ckpt['epoch']} epoch(s) done"


def _load(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path``, or None if it is not one of ours."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file can fail in many ways
        return None
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        return cast(Checkpoint, ckpt)
    return None
