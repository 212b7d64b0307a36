"""Where training runs: device choice, mixed precision, and torchrun's process group.

One process: ``python -m <package>.train``. Several (GPUs, nodes, or CPU processes):
``torchrun --nproc_per_node N -m <package>.train``; torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and every process runs the same code on its own shard of each epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core.config import ProjectError

DEVICE_ENV = "TRAIN_DEVICE"
DEVICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
CUDA_FIX = (
    "install a CUDA build of PyTorch (`TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 "
    "nox -s install`, see README) on a machine with an NVIDIA GPU and driver, "
    f"or train elsewhere: set train.device: auto (or cpu) in params.yaml, or {DEVICE_ENV}=cpu"
)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world_size == 1`` without torchrun."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # True under torchrun (a process group exists), even with a single process.
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, checkpoints and writes outputs."""
        return self.rank == 0


def _cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build"
    return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def resolve_device(
    requested: str = "auto", *, source: str = "train.device", env_override: bool = True
) -> torch.device:
    """The device to train on; ``TRAIN_DEVICE`` overrides ``requested`` if ``env_override``.

    auto picks cuda, then mps, then cpu. An explicit device that is not there is an error,
    never a silent fallback: a run meant for a GPU should not take hours on a CPU unnoticed.
    """
    env_value = os.environ.get(DEVICE_ENV, "").strip() if env_override else ""
    if env_value:
        requested, source = env_value, DEVICE_ENV
    name = str(requested).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ProjectError(
                f"{source} is 'mps' but the Apple-silicon GPU is not available here: "
                f"use auto or cpu ({DEVICE_ENV}=cpu)"
            )
        return torch.device("mps")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ProjectError(f"{source} is {requested!r} but {_cuda_reason()}. Fix: {CUDA_FIX}")
        device = torch.device(name)
        # From the name: torch's stubs type device.index as int, though it is None for cuda.
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise ProjectError(
                f"{source} is {requested!r} but only {torch.cuda.device_count()} GPU(s) are "
                "visible: use a smaller index, or cuda"
            )
        return device
    raise ProjectError(f"{source} is {requested!r}: choose one of {', '.join(DEVICES)}")


def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """Autocast dtype for ``device``: bf16 where the GPU has it, else fp16; None = full fp32.

    Only CUDA gets mixed precision: on CPU and MPS it is slower or less tested than fp32.
    fp16 needs a gradient scaler (the training loop makes one); bf16 does not.
    """
    mode = str(mode).strip().lower()
    if mode not in AMP_MODES:
        raise ProjectError(f"train.amp is {mode!r}: choose one of {', '.join(AMP_MODES)}")
    if mode == "off" or device.type != "cuda":
        return None
    # Native bf16 only (Ampere and newer): emulated bf16 on older GPUs is slower than fp16.
    bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
    if mode == "bf16" and not bf16_ok:
        raise ProjectError("train.amp is 'bf16' but this GPU has no bf16: use auto or fp16")
    if mode == "fp16" or not bf16_ok:
        return torch.float16
    return torch.bfloat16


def amp_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``off``: how runs are tagged."""
    if dtype is None:
        return "off"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ProjectError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    requested: str = "auto", *, source: str = "train.device", env_override: bool = True
) -> DistContext:
    """Join torchrun's process group if there is one (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(requested, source=source, env_override=env_override)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not started by torchrun
        return DistContext(0, 1, 0, device)
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "mps":
        raise ProjectError("multi-process training does not support mps: use cpu or cuda")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ProjectError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "set torchrun --nproc_per_node to at most the number of GPUs"
            )
        # One GPU per process; NCCL needs the device bound before the group forms.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return DistContext(rank, world_size, local_rank, device, distributed=True)


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable, small)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable, small)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place) and return it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
