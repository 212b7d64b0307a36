"""Iteration speed of a generated project's pipeline, each figure beside a bare reference.

Run it from a rendered project whose environment is installed, with that environment's Python:

    make demo                                   # renders and installs build/demo
    cd build/demo && .venv/bin/python ../../benchmarks/pipeline.py --reps 3 --json out.json

Three rows, medians of ``--reps`` runs, the two sides of each pair alternating in one run:
1. the first ``nox -s train`` (prepare + train + evaluate from a clean state: no dvc.lock,
   outputs or MLflow store), in seconds, with the time each stage's own process took;
2. a no-op ``nox -s train`` against a bare no-op ``dvc repro`` (the floor DVC sets);
3. training samples/s of the loop inside the stage (``loop_samples_per_s`` in
   metrics/train.json: steps, validation, checkpoints and MLflow logging) against a bare PyTorch
   loop of the same model, data, batch size and epochs (see train_loop.py), in this process.
It deletes the project's pipeline outputs and MLflow store: run it in a scratch project.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_loop import _package, bare_loop_samples_per_s

CLEAN = (
    "dvc.lock", "data/processed", "models", "metrics", "plots", "checkpoints",
    "mlflow.db", "mlartifacts",
)  # fmt: skip
STAGE_LINE = re.compile(r"Running stage '(\w+)'")


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def _timed(*command: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


def _clean() -> None:
    for name in CLEAN:
        path = Path(name)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _stage_seconds() -> dict[str, float]:
    """Each stage's process alone, run again by hand (the pipeline's order, its commands)."""
    import yaml

    seconds = {}
    for name, stage in yaml.safe_load(Path("dvc.yaml").read_text())["stages"].items():
        program, *args = stage["cmd"].split()
        seconds[name] = _timed(sys.executable if program == "python" else program, *args)[0]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    nox = (sys.executable, "-m", "nox", "-s", "train")
    dvc = (str(Path(sys.executable).parent / "dvc"), "repro")

    first, stages, noop, bare_noop, loop, bare = [], [], [], [], [], []
    for _ in range(args.reps):
        _clean()
        first.append(_timed(*nox)[0])
        # Projects from before the template recorded the loop's wall time lack this row.
        if "loop_samples_per_s" in (stage := json.loads(Path("metrics/train.json").read_text())):
            loop.append(stage["loop_samples_per_s"])
            bare.append(bare_loop_samples_per_s())
        for _ in range(3):
            noop.append(_timed(*nox)[0])
            bare_noop.append(_timed(*dvc)[0])
    _clean()
    _timed(sys.executable, "-m", f"{_package()}.registry.store", "init")  # the stages need it
    for _ in range(args.reps):
        stages.append(_stage_seconds())

    med = statistics.median
    figures = {
        "first_train_s": med(first),
        "stage_s": {k: med(s[k] for s in stages) for k in stages[0]},
        "noop_train_s": med(noop),
        "noop_dvc_repro_s": med(bare_noop),
        "noop_ratio": med(noop) / med(bare_noop),
        "loop_samples_per_s": med(loop) if loop else None,
        "bare_loop_samples_per_s": med(bare) if bare else None,
        "loop_ratio": med(loop) / med(bare) if loop else None,
        "reps": args.reps,
        "cpus": os.cpu_count(),
    }
    stage_text = ", ".join(f"{k} {v:.1f} s" for k, v in figures["stage_s"].items())
    print(f"first `nox -s train`            {figures['first_train_s']:6.1f} s  ({stage_text})")
    print(
        f"no-op `nox -s train`            {figures['noop_train_s']:6.2f} s  "
        f"{figures['noop_ratio']:.2f}x a bare no-op `dvc repro` "
        f"({figures['noop_dvc_repro_s']:.2f} s)"
    )
    if loop:
        print(
            f"training loop in the stage      {figures['loop_samples_per_s']:8,.0f} samples/s  "
            f"{figures['loop_ratio']:.2f}x a bare PyTorch loop "
            f"({figures['bare_loop_samples_per_s']:,.0f} samples/s)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
