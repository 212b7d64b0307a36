"""Serving speed of the generated BentoML service beside a minimal FastAPI server of the same model.

    nox -s bench-serve                       # renders, installs, trains, deploys build/bench-serve
    nox -s bench-serve -- --project build/demo --duration 10 --reps 1 --json out.json

Builds the default project (render with its tasks, ``nox -s install train deploy``; with
``--project``, a project already trained is reused and only deployed: a Bento of unchanged
sources is reused). Then, in one run, each server is started on a loopback port with the same
worker count and loaded by ``wrk`` (or ``hey`` when wrk is absent; the output says which) at
1, 8 and 64 clients with 1-row requests and at 64 clients with 32-row requests, ``--duration``
seconds each after a short warm-up:

- ``bentoml``: the built Bento, served as ``nox -s serve`` serves it, prediction log on;
- ``fastapi``: benchmarks/serve_fastapi.py, an ``async def`` endpoint on uvicorn doing the same
  work per request through the service's own pieces (schema, Guard middleware, overflow check,
  ``predict_frame``, prediction log on), without BentoML and without batching. With
  ``--bare-reference`` it leaves out the Guard, the check and the log, as it did before.

Reported per server and load point: req/s, rows/s, p50/p99 latency, non-2xx answers (and socket
errors), and the seconds from start to ``/readyz`` answering 200; ``ratio`` is BentoML's req/s over
FastAPI's; ``logged_rows``: the lines each server's prediction log wrote (warm-up included).
With ``--reps`` > 1 the servers alternate and medians are reported. A table on stdout,
everything in JSON (``--json``). Absolute figures depend on the machine and whatever else runs
on it (its load average is recorded); compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import render, torch_source_env  # noqa: E402

POINTS = ((1, 1), (8, 1), (64, 1), (64, 32))  # (clients, rows per request)
SERVERS = ("bentoml", "fastapi")
# The goals of the issue "Close the measured speed gaps" (ratios: BentoML's req/s over FastAPI's).
GOALS = {"ratio_at_64": 2.5, "p99_ms_at_64": 50.0, "ratio_at_1": 0.9, "non_2xx": 0, "ready_s": 4.0}

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _env(project: Path) -> dict[str, str]:
    env = {**os.environ, **torch_source_env(), "UV_PYTHON_DOWNLOADS": "never"}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true"}
    for name in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _nox(project: Path, *sessions: str) -> None:
    print(f"[bench] nox -s {' '.join(sessions)} in {project}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "nox", "-s", *sessions],
        cwd=project, env=_env(project), check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def build(project: Path | None) -> Path:
    """A trained, deployed default project (rendered into build/bench-serve unless given)."""
    if project is None:
        project = ROOT / "build" / "bench-serve"
        shutil.rmtree(project, ignore_errors=True)
        print(f"[bench] rendering the default project into {project}", flush=True)
        render(project, tasks=True)
        _nox(project, "install", "train")
    elif not (project / "models" / "model.pt").exists():
        _nox(project, "train")
    _nox(project, "deploy")
    return project.resolve()


def package(project: Path) -> str:
    wheel = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    return Path(wheel["targets"]["wheel"]["packages"][0]).name


def sample_rows(project: Path, count: int = 32) -> list[dict[str, Any]]:
    """``count`` rows of the test split, as the service takes them."""
    code = (
        f"import json; from {package(project)}.data.prepare import load_frame\n"
        "frame, schema = load_frame('test')\n"
        f"print(frame[schema.features].head({count}).to_json(orient='records'))"
    )
    out = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "-c", code],
        cwd=project, env=_env(project), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = json.loads(out.strip().splitlines()[-1])
    return (rows * count)[:count]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    server: str, project: Path, port: int, workers: int, log_dir: Path, bare: bool = False
) -> tuple[Any, float]:
    """The server's process (own process group) and its seconds from start to ``/readyz`` 200."""
    env = _env(project) | {"SERVE_WORKERS": str(workers), "TORCH_BACKEND": "cpu"}
    # Both servers log every row (the reference unless bare), each to a folder of its own.
    env |= {"PREDICTION_LOG": "on", "PREDICTION_LOG_DIR": str(log_dir), "SERVICE_API_TOKEN": ""}
    bin_dir = project / ".venv" / "bin"
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    if server == "bentoml":
        # As `nox -s serve` does: the project's store, the latest Bento, the prediction log on.
        env |= {"BENTOML_HOME": str(project / ".bentoml")}
        tag = f"{package(project).replace('_', '-')}:latest"
        command = [str(bin_dir / "bentoml"), "serve", tag, "--host", "127.0.0.1"]
        command += ["--port", str(port)]
    else:
        env |= {"BENCH_PACKAGE": package(project), "BENCH_MODEL": "models/model.pt"}
        env |= {"BENCH_BARE": "1" if bare else "0"}
        command = [str(bin_dir / "python"), str(HERE / "serve_fastapi.py")]
        command += ["--port", str(port), "--workers", str(workers)]
    begin = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    while time.monotonic() - begin < 120:
        if proc.poll() is not None:
            sys.exit(f"{server} exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return proc, time.monotonic() - begin
        except OSError:
            time.sleep(0.05)
    stop(proc)
    sys.exit(f"{server} was not ready after 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def load_generator() -> str:
    for tool in ("wrk", "hey"):
        if shutil.which(tool):
            return tool
    sys.exit("no load generator: install the Debian package wrk (or hey)")


def load(tool: str, url: str, body: str, clients: int, seconds: int, work: Path) -> dict:
    """One load run: req/s, p50/p99 (ms), non-2xx and socket errors."""
    if tool == "wrk":
        script = work / "post.lua"
        script.write_text(LUA.format(body=body))
        threads = min(clients, 2)
        command = ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{seconds}s"]
        command += ["--timeout", "5s", "-s", str(script), url]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        raw = json.loads(out.split("BENCH_JSON", 1)[1])
        duration = raw["duration_us"] / 1e6
        return {
            "requests": raw["requests"],
            "req_s": raw["requests"] / duration,
            "p50_ms": raw["p50_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3,
            "non_2xx": raw["non_2xx"],
            "socket_errors": raw["socket_errors"],
        }
    (work / "body.json").write_text(body)
    command = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "POST"]
    command += ["-T", "application/json", "-D", str(work / "body.json"), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    pct = {int(p): float(s) * 1e3 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", out)}
    errors = re.search(r"Error distribution:(.*)", out, re.S)
    return {
        "requests": sum(codes.values()),
        "req_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": pct.get(50, float("nan")),
        "p99_ms": pct.get(99, float("nan")),
        "non_2xx": sum(n for c, n in codes.items() if not 200 <= c < 300),
        "socket_errors": sum(int(n) for n in re.findall(r"\[(\d+)\]", errors.group(1)))
        if errors
        else 0,
    }


def bench_server(
    server: str, project: Path, rows: list[dict], args: argparse.Namespace, tool: str, work: Path
) -> dict:
    log_dir = work / f"log-{server}"
    port = free_port()
    proc, ready = start(server, project, port, args.workers, log_dir, args.bare_reference)
    url = f"http://127.0.0.1:{port}/predict"
    results: dict[str, Any] = {"ready_s": ready, "points": {}}
    try:
        load(tool, url, json.dumps({"rows": rows[:1]}), 8, args.warmup, work)
        for clients, count in POINTS:
            body = json.dumps({"rows": rows[:count]})
            point = load(tool, url, body, clients, args.duration, work)
            point["rows_s"] = point["req_s"] * count
            results["points"][f"{clients}x{count}"] = point
            print(f"[bench] {server:8} {clients:3} clients x {count:2} rows: "
                  f"{point['req_s']:8.0f} req/s  p99 {point['p99_ms']:7.1f} ms  "
                  f"non-2xx {point['non_2xx']}", flush=True)  # fmt: skip
    finally:
        stop(proc)
    files = list(log_dir.rglob("predictions-*.jsonl"))
    results["logged_rows"] = sum(len(f.read_bytes().splitlines()) for f in files)
    return results


def median_of(runs: list[dict]) -> dict:
    out: dict[str, Any] = {"ready_s": statistics.median(r["ready_s"] for r in runs), "points": {}}
    for key in runs[0]["points"]:
        out["points"][key] = {
            field: statistics.median(r["points"][key][field] for r in runs)
            for field in runs[0]["points"][key]
        }
        for field in ("non_2xx", "socket_errors"):  # errors: the sum over repetitions
            out["points"][key][field] = sum(r["points"][key][field] for r in runs)
    if "logged_rows" in runs[0]:
        out["logged_rows"] = sum(r["logged_rows"] for r in runs)
    return out


def table(result: dict) -> str:
    lines = [
        "| server | clients x rows | req/s | rows/s | p50 ms | p99 ms | non-2xx | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    servers = result["servers"]
    for key in servers["bentoml"]["points"]:
        for server in SERVERS:
            point = servers[server]["points"][key]
            ratio = point["req_s"] / servers["fastapi"]["points"][key]["req_s"]
            errors = f"{point['non_2xx']}" + (
                f" (+{point['socket_errors']} socket)" if point["socket_errors"] else ""
            )
            lines.append(
                f"| {server} | {key.replace('x', ' x ')} | {point['req_s']:,.0f} | "
                f"{point['rows_s']:,.0f} | {point['p50_ms']:.1f} | {point['p99_ms']:.1f} | "
                f"{errors} | {ratio:.2f} |"
            )
    lines.append(
        f"| ready (start to /readyz) | | bentoml {servers['bentoml']['ready_s']:.1f} s | "
        f"fastapi {servers['fastapi']['ready_s']:.1f} s | | | | |"
    )
    return "\n".join(lines)


def goals(result: dict) -> dict[str, bool]:
    bento, fast = result["servers"]["bentoml"], result["servers"]["fastapi"]
    at64, at1 = bento["points"]["64x1"], bento["points"]["1x1"]
    return {
        "ratio_at_64": at64["req_s"] / fast["points"]["64x1"]["req_s"] >= GOALS["ratio_at_64"],
        "p99_ms_at_64": at64["p99_ms"] <= GOALS["p99_ms_at_64"],
        "ratio_at_1": at1["req_s"] / fast["points"]["1x1"]["req_s"] >= GOALS["ratio_at_1"],
        "non_2xx": all(p["non_2xx"] + p["socket_errors"] == 0 for p in bento["points"].values()),
        "ready_s": bento["ready_s"] <= GOALS["ready_s"],
    }


def machine(project: Path) -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    versions = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "-c",
         "import importlib.metadata as m; print({p: m.version(p) for p in "
         "('bentoml', 'fastapi', 'uvicorn', 'torch', 'pydantic')})"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "versions": versions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a rendered, installed project to reuse")
    parser.add_argument("--workers", type=int, default=1, help="workers of each server")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load point")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per server")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (servers alternate)")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench-serve.json")
    parser.add_argument(
        "--bare-reference", action="store_true",
        help="FastAPI without the Guard, the overflow check and the prediction log",
    )  # fmt: skip
    args = parser.parse_args()

    project = build(args.project.resolve() if args.project else None)
    tool = load_generator()
    rows = sample_rows(project)
    info = machine(project) | {"load_generator": tool, "workers": args.workers}
    info["reference"] = "bare" if args.bare_reference else "same work"
    print(f"[bench] {info}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in SERVERS}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for rep in range(args.reps):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for server in order:
                runs[server].append(bench_server(server, project, rows, args, tool, Path(tmp)))
                shutil.rmtree(Path(tmp) / f"log-{server}", ignore_errors=True)
    result = {
        "machine": info,
        "duration_s": args.duration,
        "reps": args.reps,
        "points": [f"{c}x{r}" for c, r in POINTS],
        "servers": {s: median_of(runs[s]) for s in SERVERS},
        "runs": runs,
    }
    result["goals"] = {"targets": GOALS, "met": goals(result)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"goals met: {result['goals']['met']}")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
