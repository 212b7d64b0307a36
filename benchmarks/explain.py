"""Speed of the attributions: the evaluate stage's on the test split, and /explain beside /predict.

    nox -s bench-explain        # renders, installs, trains, deploys build/bench-serve
    nox -s bench-explain -- --project build/demo --requests 300 --json out.json

With ``--project``, a trained project is reused (deployed again: a Bento of unchanged sources is
reused); without, the default project is rendered, installed, trained and deployed into
build/bench-serve, as benchmarks/serve.py does.

1. ``attribute_frame`` of the champion-to-be (``models/model.pt``) on the whole test split, in
   the project's environment, on 1 torch thread and on the default count: the median of 5 runs
   after a warm-up, and the worst row's completeness error. Goal: <= 2 s.
2. The served Bento (prediction log on, as ``nox -s serve``), one client, one row a request,
   keep-alive: ``--requests`` of /predict and of /explain, alternating, after a warm-up; p50 and
   p99 latency of each and the p50 ratio. Goal: /explain <= 3x /predict.

Figures depend on the machine and its load (recorded); compare within one run. ``--json`` keeps
everything.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve import _env, build, free_port, package, sample_rows, start, stop  # noqa: E402

GOALS = {"attribution_s": 2.0, "explain_over_predict": 3.0}

ATTRIBUTION = """
import json, statistics, sys, time
import torch
from {package}.evaluation.evaluate import load_test_split
from {package}.model.explain import attribute_frame
from {package}.model.network import load_model

model, frame = load_model("models/model.pt"), load_test_split().frame
out = {{"rows": len(frame), "features": len(model.feature_names)}}
for threads in (1, torch.get_num_threads()):
    torch.set_num_threads(threads)
    explained = attribute_frame(model, frame)  # warm-up (and captum's import)
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        explained = attribute_frame(model, frame)
        times.append(time.perf_counter() - begin)
    out[f"seconds_{{threads}}_threads"] = statistics.median(times)
out["completeness_error_max"] = float(explained.error.max())
out["completeness_error_mean"] = float(explained.error.mean())
print(json.dumps(out))
"""


def attribution(project: Path) -> dict[str, Any]:
    code = ATTRIBUTION.format(package=package(project))
    out = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "-c", code],
        cwd=project, env=_env(project), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def latencies(port: int, body: bytes, requests: int) -> dict[str, list[float]]:
    """Seconds of each request to /predict and /explain, alternating, on one connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    found: dict[str, list[float]] = {"/predict": [], "/explain": []}
    for i in range(requests * 2 + 40):
        path = "/predict" if i % 2 == 0 else "/explain"
        begin = time.perf_counter()
        connection.request("POST", path, body, headers)
        answer = connection.getresponse()
        answer.read()
        spent = time.perf_counter() - begin
        if answer.status != 200:
            sys.exit(f"{path} answered {answer.status}")
        if i >= 40:  # the first 20 of each: warm-up
            found[path].append(spent)
    connection.close()
    return found


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a trained project (default: build one)")
    parser.add_argument("--requests", type=int, default=300, help="of each route (300)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    project = build(args.project)
    result: dict[str, Any] = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    result["attribution"] = attribution(project)
    body = json.dumps({"rows": sample_rows(project, 1)}).encode()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as log_dir:
        proc, ready = start("bentoml", project, port, 1, Path(log_dir))
        try:
            found = latencies(port, body, args.requests)
        finally:
            stop(proc)
    served = {path.strip("/"): summary(seconds) for path, seconds in found.items()}
    served["ratio_p50"] = served["explain"]["p50_ms"] / served["predict"]["p50_ms"]
    served["ready_s"] = ready
    result["serve_1_client_1_row"] = served
    attribution_s = max(v for k, v in result["attribution"].items() if k.startswith("seconds_"))
    result["goals"] = {
        "attribution_s": attribution_s <= GOALS["attribution_s"],
        "explain_over_predict": served["ratio_p50"] <= GOALS["explain_over_predict"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
