"""The cost of ``/feedback`` for unknown request ids on a large prediction log, beside idle.

    python benchmarks/feedback.py --project /tmp/demo            # a project trained and deployed
    python benchmarks/feedback.py --project /tmp/demo --log-mb 300 --seconds 20 --json out.json

Fills a prediction log folder with ``--log-mb`` MB of prediction lines (copies of a real line,
each with its own request id, spread over 7 days, and those ids in the request index), serves
the project's latest Bento over it (``nox -s serve``, feedback open, loopback), then measures two
phases of ``--seconds`` each, one after the other:

- ``idle``: one client sends 1-row ``/predict`` requests back to back;
- ``feedback``: the same, while 8 client processes post ``/feedback`` for unknown request ids
  back to back (each answered 404 after the lookup);
- ``predict``: the reference: the same, while the 8 processes post 1-row ``/predict`` requests
  instead (what any 8 busy clients cost a one-worker service on this machine).

Reported per phase: /predict p50 and p99 (ms) and count, feedback requests answered, and the
server's peak RSS (arbiter and workers, summed, sampled every 0.1 s). Goals: peak RSS under
feedback within +100 MB of idle, /predict p99 within 2x idle. Figures depend on the machine
and what else runs on it (its load average is recorded): compare only within one run; on a
machine with fewer cores than clients, read ``p99_ratio`` beside ``p99_ratio_predict_load``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

CLIENTS = 8
GOALS = {"rss_delta_mb": 100.0, "p99_ratio": 2.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_row(project: Path) -> dict[str, Any]:
    script = (
        "import json, pyarrow.parquet as pq;"
        "f = pq.read_table('data/processed/test.parquet', use_threads=False).to_pandas();"
        "t = json.load(open('data/processed/schema.json'))['target'];"
        "print(f.drop(columns=[t]).head(1).to_json(orient='records'))"
    )
    python = project / ".venv" / "bin" / "python"
    out = subprocess.run([python, "-c", script], cwd=project, capture_output=True, text=True)
    return json.loads(out.stdout)[0]


def fill_log(folder: Path, row: dict[str, Any], megabytes: int) -> int:
    """Write ``megabytes`` MB of prediction lines over 7 days, and index their ids."""
    line = {"ts": "", "request_id": "", "row": 0, "model_version": "1", "inputs": row,
            "label": "a", "probabilities": {"a": 0.25, "b": 0.75}}  # fmt: skip
    size = len(json.dumps(line | {"request_id": "0" * 32, "ts": datetime.now(UTC).isoformat()}))
    count = megabytes * 1_000_000 // (size + 1)
    today = datetime.now(UTC)
    ids = []
    for day in range(7):
        ts = (today - timedelta(days=day)).isoformat()
        partition = folder / f"date={ts[:10]}"
        partition.mkdir(parents=True, exist_ok=True)
        with open(partition / "predictions-1.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(count // 7):
                ids.append((f"{random.getrandbits(128):032x}", 1, ts[:10]))
                fh.write(json.dumps(line | {"ts": ts, "request_id": ids[-1][0]}) + "\n")
    with sqlite3.connect(folder / "requests.sqlite") as db:
        columns = "request_id TEXT PRIMARY KEY, rows INTEGER NOT NULL, day TEXT NOT NULL"
        db.execute(f"CREATE TABLE IF NOT EXISTS requests ({columns})")
        db.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", ids)
    return len(ids)


def server_pids(home: Path) -> list[int]:
    """The server's processes, by the BENTOML_HOME in their environment (workers are in
    sessions of their own)."""
    marker = f"BENTOML_HOME={home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
        )
    return total / 1024


def post(url: str, body: dict, timeout: float = 60) -> int:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def answers(url: str, row: dict) -> bool:
    try:
        return post(f"{url}/predict", {"rows": [row]}, timeout=5) == 200
    except OSError:
        return False


def load_client(url: str, route: str, row: dict, seconds: float, answered: Any) -> None:
    """Requests back to back until ``seconds`` pass (a process of its own): unknown-id
    feedback (answered 404) or 1-row predictions (200)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        feedback = {"request_id": f"{random.getrandbits(128):032x}", "labels": ["a"]}
        body = feedback if route == "feedback" else {"rows": [row]}
        try:
            if post(f"{url}/{route}", body) in (200, 404):
                with answered.get_lock():
                    answered.value += 1
        except OSError:
            pass


def phase(url: str, row: dict, seconds: float, pids: list[int], load: str | None) -> dict[str, Any]:
    answered = multiprocessing.Value("i", 0)
    clients = [
        multiprocessing.Process(target=load_client, args=(url, load, row, seconds, answered))
        for _ in range(CLIENTS if load else 0)
    ]
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss_mb(pids))

    sampler = threading.Thread(target=sample)
    sampler.start()
    for client in clients:
        client.start()
    latencies, failed = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        status = post(f"{url}/predict", {"rows": [row]})
        latencies.append((time.perf_counter() - start) * 1000)
        failed += status != 200
    for client in clients:
        client.join(seconds + 120)
    stop.set()
    sampler.join()
    cuts = statistics.quantiles(latencies, n=100)
    return {"predict": len(latencies), "predict_failed": failed, "p50_ms": round(cuts[49], 1),
            "p99_ms": round(cuts[98], 1), "load_answered": answered.value,
            "peak_rss_mb": round(peak[0], 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="trained and deployed")
    parser.add_argument("--log-mb", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    project = args.project.resolve()
    row = sample_row(project)
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        logs = Path(tmp) / "logs"
        lines = fill_log(logs, row, args.log_mb)
        port, home = free_port(), project / ".bentoml"
        env = {**os.environ, "PREDICTION_LOG_DIR": str(logs), "SERVE_FEEDBACK_OPEN": "yes",
               "SERVICE_API_TOKEN": "", "SERVICE_FEEDBACK_TOKEN": ""}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "nox", "-s", "serve", "--", "--port", str(port)],
            cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while not answers(url, row):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the service did not start")
                time.sleep(0.5)
            pids = server_pids(home)
            result = {
                "log_mb": round(sum(p.stat().st_size for p in logs.rglob("*.jsonl")) / 1e6),
                "log_lines": lines,
                "load_average": os.getloadavg(),
                "idle": phase(url, row, args.seconds, pids, None),
                "feedback": phase(url, row, args.seconds, pids, "feedback"),
                "predict": phase(url, row, args.seconds, pids, "predict"),
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            for pid in server_pids(home):  # a worker its arbiter left behind
                os.kill(pid, signal.SIGKILL)
    idle, busy = result["idle"], result["feedback"]
    result["rss_delta_mb"] = round(busy["peak_rss_mb"] - idle["peak_rss_mb"], 1)
    result["p99_ratio"] = round(busy["p99_ms"] / idle["p99_ms"], 2)
    result["p99_ratio_predict_load"] = round(result["predict"]["p99_ms"] / idle["p99_ms"], 2)
    result["goals_met"] = {k: result[k] <= v for k, v in GOALS.items()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
