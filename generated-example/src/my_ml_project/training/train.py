"""DVC stage ``train``: fit the model, checkpoint it, log it to MLflow and register it.

``python -m <package>.train [--resume | --no-resume] [--device D] [--params FILE]`` from the
project root; ``torchrun --nproc_per_node N -m <package>.train`` for several GPUs, processes or
nodes. Reads the ``seed``, ``model``, ``train`` and ``mlflow`` sections of params.yaml. The loop
itself is :mod:`.loop`; the MLflow run and the registration are :mod:`.tracking`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import Params, ProjectError, cli_errors, load_params
from ..core.paths import CHECKPOINT_FILE, module
from ..data.prepare import TrainData, load_train_data
from ..model.network import build_model
from .checkpoint import Checkpoint, fingerprint, mark_finished, read_checkpoint
from .distributed import DistContext, amp_dtype, amp_name, broadcast, init_distributed, shutdown
from .loop import EpochHook, fit
from .tracking import Tracker, ending, publish, run_tags


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed every generator; on CUDA also ask PyTorch for deterministic kernels.

    The CPU kernels this model uses are deterministic already, and the switch costs ~4 s of
    imports (torch._inductor), so it is only thrown where GPU kernels (atomics) need it.
    """
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (libraries draw from the legacy global generator)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        # cuBLAS reads this when it starts; deterministic mode needs it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)


def _start(
    params: Params,
    ckpt_path: Path,
    fp: str,
    mode: str,
    data: TrainData,
    ctx: DistContext,
    amp: str,
) -> tuple[Tracker | None, Checkpoint | None]:
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
    params: Params,
    *,
    resume: str | None = None,
    device: str | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
    """The train stage: returns models/run.json's content (rank 0; ``{}`` on other ranks).

    ``resume`` (auto/always/never) overrides train.resume; ``device`` overrides train.device
    and the TRAIN_DEVICE variable.
    """
    cfg = params.train
    ctx = init_distributed(
        device or cfg.device,
        source="--device" if device else "train.device",
        env_override=device is None,
    )
    try:
        if ctx.device.type == "cpu" and cfg.cpu_threads:
            # A small tabular model's ops take microseconds: handing them to other threads costs
            # more than it saves (measured: 1 thread trained 1.5-10x faster than 2 here), and
            # torchrun gives each process 1 thread for the same reason.
            torch.set_num_threads(cfg.cpu_threads)
        seed_everything(params.seed, ctx.device)
        data = load_train_data()
        amp = amp_name(amp_dtype(ctx.device, cfg.amp))
        fp = fingerprint(params, data, world_size=ctx.world_size, device=ctx.device.type, amp=amp)
        model = build_model(data.schema, params.model, data.x_train)
        torch.manual_seed(params.seed + ctx.rank)  # same init everywhere, own dropout per rank
        ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE
        tracker, start = _start(params, ckpt_path, fp, resume or cfg.resume, data, ctx, amp)
        with ending(tracker):
            result = fit(
                model,
                data,
                cfg,
                ctx=ctx,
                seed=params.seed,
                fp=fp,
                start=start,
                checkpoint=ckpt_path if ctx.is_main else None,
                run_id=tracker.run_id if tracker else None,
                log_epochs=tracker.log_epochs if tracker else None,
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
        prog=f"python -m {module('training.train')}",
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
