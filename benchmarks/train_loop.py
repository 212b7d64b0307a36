"""Training throughput of a generated project's loop against a bare PyTorch loop.

Same model, data, batch size, optimiser and epochs; the two alternate in one process and the
median of several repetitions is reported (samples/s, higher is better). Run it from a rendered
project whose pipeline has prepared the data, with that project's environment:

    make demo                      # or: copier copy + nox -s install train
    cd build/demo && .venv/bin/python ../../benchmarks/train_loop.py --epochs 60 --reps 5
    .venv/bin/python ../../benchmarks/train_loop.py --scale 20   # 20x the rows

``fit`` is measured with a checkpoint every epoch, every 10 epochs, and none.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import statistics
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _package() -> str:
    """The generated project's import name, from its pyproject.toml."""
    wheel = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["hatch"]["build"]
    return Path(wheel["targets"]["wheel"]["packages"][0]).name


# The project's modules this benchmark calls, by role (their place in the package's layout).
MODULES = {
    "config": "core.config",
    "data": "data.prepare",
    "loop": "training.loop",
    "model": "model.network",
    "distributed": "training.distributed",
}


def _modules() -> dict[str, object]:
    pkg = _package()
    return {role: importlib.import_module(f"{pkg}.{path}") for role, path in MODULES.items()}


def use_threads(params: object) -> None:
    """The CPU threads the train stage uses (train.cpu_threads), so both sides run alike."""
    if params.train.cpu_threads:
        torch.set_num_threads(params.train.cpu_threads)


def bare_loop(data: object, params: object, epochs: int) -> float:
    """Samples/s of the plainest PyTorch loop over the same model, data and batch size."""
    model_mod = _modules()["model"]
    cfg = params.train
    use_threads(params)
    torch.manual_seed(0)
    model = model_mod.build_model(data.schema, params.model, data.x_train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return len(y) * epochs / (time.perf_counter() - start)


def bare_loop_samples_per_s() -> float:
    """The bare loop on the project's prepared data and params (used by pipeline.py)."""
    mods = _modules()
    params = mods["config"].load_params()
    return bare_loop(mods["data"].load_train_data(), params, params.train.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="repeat the training rows N times")
    args = parser.parse_args()

    mods = _modules()
    params = mods["config"].load_params()
    data = mods["data"].load_train_data()
    if args.scale > 1:
        data = dataclasses.replace(
            data,
            x_train=np.tile(data.x_train, (args.scale, 1)),
            y_train=np.tile(data.y_train, args.scale),
        )
    cfg = params.train.model_copy(update={"epochs": args.epochs, "patience": 0})
    use_threads(params)
    ctx = mods["distributed"].DistContext(0, 1, 0, torch.device("cpu"))
    samples = len(data.y_train) * args.epochs

    def ours(checkpoint: Path | None, every: int = 1) -> Callable[[], float]:
        def go() -> float:
            torch.manual_seed(42)
            model = mods["model"].build_model(data.schema, params.model, data.x_train)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                mods["loop"].fit(
                    model,
                    data,
                    cfg.model_copy(update={"checkpoint_every": every}),
                    ctx=ctx,
                    seed=42,
                    checkpoint=checkpoint,
                )
            return samples / (time.perf_counter() - start)

        return go

    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "bare PyTorch loop": lambda: bare_loop(data, params, args.epochs),
            "fit, checkpoint every epoch": ours(Path(tmp) / "last.pt"),
            "fit, checkpoint every 10": ours(Path(tmp) / "last.pt", 10),
            "fit, no checkpoint": ours(None),
        }
        results: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                results[name].append(fn())

    base = statistics.median(results["bare PyTorch loop"])
    print(
        f"rows={len(data.y_train)} epochs={args.epochs} batch={cfg.batch_size} "
        f"threads={torch.get_num_threads()} reps={args.reps}"
        " (fit validates every epoch; the bare loop does not)"
    )
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:30s} {median:>10,.0f} samples/s  ratio {median / base:.2f}")


if __name__ == "__main__":
    main()
