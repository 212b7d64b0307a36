"""Batch scoring throughput (``nox -s predict``'s scorer) against the bare model on the same rows.

Run it from a rendered, trained project with that project's environment:

    make demo                      # or: copier copy + nox -s install train
    cd build/demo && .venv/bin/python ../../benchmarks/predict.py --rows 1000000 --reps 3

It writes a Parquet file of ``--rows`` rows (the test split tiled, with a little noise), then
alternates, ``--reps`` times, two sides, each in a fresh process so that its peak memory is its
own:
- ``scorer``: ``predict.score_file`` Parquet -> Parquet, all input columns kept (reading, scoring,
  writing, the rejects check; what ``nox -s predict`` does after loading the model);
- ``raw``: the file read whole into memory first (not timed), then the model alone:
  ``model.predict_proba_frame`` (encode + forward) on chunks of the same size.
Reported: medians of rows/s, their ratio (the issue asks >= 0.8), and each side's peak RSS (VmHWM)
above the process's RSS after imports and model loading.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path


def _package() -> str:
    """The generated project's import name, from its pyproject.toml."""
    wheel = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["hatch"]["build"]
    return Path(wheel["targets"]["wheel"]["packages"][0]).name


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_input(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    test = pq.read_table("data/processed/test.parquet", use_threads=False).to_pandas()
    reps = -(-rows // len(test))
    frame = pd.concat([test] * reps, ignore_index=True).iloc[:rows]
    numbers = frame.select_dtypes("number").columns
    rng = np.random.default_rng(0)
    frame[numbers] = frame[numbers] * rng.normal(1.0, 0.01, (rows, len(numbers)))
    frame.to_parquet(path, index=False)


def child(
    side: str, source: Path, chunk_rows: int, keep: list[str] | None, passes: int = 2
) -> dict[str, float]:
    """One side in this (fresh) process: the best of ``passes`` (the first pays for page faults
    and lazy initialisation, which the other side would not share)."""
    pkg = _package()
    model = importlib.import_module(f"{pkg}.model.network").load_model("models/model.pt")
    predict = importlib.import_module(f"{pkg}.serving.batch")
    base = _status_mb("VmRSS")
    best = 0.0
    for _ in range(passes):
        if side == "raw":
            import pyarrow.parquet as pq

            frame = pq.read_table(source, use_threads=False).to_pandas()
            start = time.perf_counter()
            for i in range(0, len(frame), chunk_rows):
                model.predict_proba_frame(frame.iloc[i : i + chunk_rows]).cpu().numpy()
            seconds, rows = time.perf_counter() - start, len(frame)
            del frame
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out, rejects = Path(tmp) / "out.parquet", Path(tmp) / "rejects.csv"
                start = time.perf_counter()
                counts = predict.score_file(
                    model,
                    "1",
                    source,
                    out,
                    rejects,
                    keep=keep,
                    chunk_rows=chunk_rows,
                    progress=False,
                )
                seconds, rows = time.perf_counter() - start, counts.scored
        best = max(best, rows / seconds)
    return {"rows_per_s": best, "peak_mb": _status_mb("VmHWM") - base}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--keep", nargs="+", help="input columns the scorer copies (default: all)")
    parser.add_argument("--child", choices=["raw", "scorer"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.source, args.chunk_rows, args.keep)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "input.parquet"
        make_input(source, args.rows)
        runs: dict[str, list[dict[str, float]]] = {"raw": [], "scorer": []}
        for _ in range(args.reps):
            for side in runs:
                command = [sys.executable, __file__, "--child", side, "--source", str(source)]
                command += ["--chunk-rows", str(args.chunk_rows)]
                command += ["--keep", *args.keep] if args.keep else []
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs[side].append(json.loads(out.splitlines()[-1]))
        size_mb = source.stat().st_size / 2**20
    result = {
        side: {key: statistics.median(r[key] for r in values) for key in values[0]}
        for side, values in runs.items()
    }
    result["ratio"] = result["scorer"]["rows_per_s"] / result["raw"]["rows_per_s"]
    result |= {"rows": args.rows, "input_mb": size_mb, "reps": args.reps, "keep": args.keep}
    print(
        f"{args.rows} rows ({size_mb:.0f} MB Parquet), medians of {args.reps}:\n"
        f"  raw model  {result['raw']['rows_per_s']:>10,.0f} rows/s  "
        f"peak +{result['raw']['peak_mb']:.0f} MB (the frame in memory)\n"
        f"  scorer     {result['scorer']['rows_per_s']:>10,.0f} rows/s  "
        f"peak +{result['scorer']['peak_mb']:.0f} MB (read, score, write; keep "
        f"{', '.join(args.keep) if args.keep else 'all columns'})\n"
        f"  ratio      {result['ratio']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
