"""End to end: the served Bento as an operator sees it: a disk that fills up and recovers, the
exposure rules, every documented path. Each test starts its own server over the shared
``trained`` project (the module's first use deploys it: `nox -s deploy` reuses a built Bento).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e import MODEL_NAME, Project, free_port, start_service
from helpers import torch_source_env

pytestmark = pytest.mark.e2e

TOKEN, FEEDBACK_TOKEN = "e2e-predict-token", "e2e-feedback-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text, status, head = answer.read(), answer.status, dict(answer.headers)
    except urllib.error.HTTPError as exc:
        text, status, head = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(text), {k.lower(): v for k, v in head.items()}
    except ValueError:
        return status, {"text": text.decode(errors="replace")}, head


def processes(project: Project) -> list[int]:
    """The live processes of the project's BentoML server (workers run in sessions of their own)."""
    marker = f"BENTOML_HOME={project.path / '.bentoml'}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


@contextlib.contextmanager
def serving(project: Project, **env: str) -> Iterator[str]:
    """A server of the project's Bento on a free loopback port; stopped (SIGTERM) after."""
    proc, url = start_service(project, **env)
    try:
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        for pid in processes(project):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def ready(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening (yet)
        return 0


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployed(trained: Project) -> Project:
    trained.nox("deploy")
    return trained


def latest_bento(project: Project) -> Path:
    """The folder of the project's newest Bento (what `nox -s serve` serves)."""
    bentos = project.path / ".bentoml" / "bentos" / MODEL_NAME
    return bentos / (bentos / "latest").read_text().strip()


@pytest.fixture(scope="module")
def row(deployed: Project) -> dict:
    script = (
        "import json, pyarrow.parquet as pq;"
        "f = pq.read_table('data/processed/test.parquet', use_threads=False).to_pandas();"
        "t = json.load(open('data/processed/schema.json'))['target'];"
        "print(f.drop(columns=[t]).head(1).to_json(orient='records'))"
    )
    return json.loads(deployed.py("-c", script).stdout)[0]


LOG_COUNT = "prediction_log_lines_total"


def test_a_full_disk_loses_only_counted_lines_and_the_log_recovers(deployed, row, tmp_path):
    """The workers get a file-size limit (EFBIG past it: Python ignores SIGXFSZ), then lose it."""
    logs = tmp_path / "logs"
    env = {"PREDICTION_LOG_DIR": str(logs), "SERVE_LOG_MAX_PENDING": "50", "SERVE_LOG_STUCK_S": "2"}
    sent: list[str] = []

    def send(count: int) -> list[str]:
        ids = []
        for _ in range(count):
            status, body, head = call(f"{url}/predict", {"rows": [row]})
            assert status == 200, body  # a failing log never fails an answer
            ids.append(head["x-request-id"])
        sent.extend(ids)
        return ids

    with serving(deployed, **env) as url:
        send(10)
        wait_for(lambda: metric(url, LOG_COUNT, outcome="written") == 10, "10 lines written")
        size = sum(p.stat().st_size for p in logs.rglob("predictions-*.jsonl"))
        limited = processes(deployed)
        original = {pid: resource.prlimit(pid, resource.RLIMIT_FSIZE) for pid in limited}
        for pid, (_, hard) in original.items():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (size + 3000, hard))
        send(150)
        wait_for(lambda: ready(url) == 503, "/readyz failing while writes fail")
        assert metric(url, LOG_COUNT, outcome="write_errors") > 0
        for pid, limits in original.items():
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        wait_for(lambda: ready(url) == 200, "/readyz recovering with the disk")
        after = send(10)

        def settled() -> bool:
            done = metric(url, LOG_COUNT, outcome="written")
            return done + metric(url, LOG_COUNT, outcome="dropped") == len(sent)

        wait_for(settled, "every line written or dropped")
        dropped = metric(url, LOG_COUNT, outcome="dropped")
    lines = [line for path in logs.rglob("predictions-*.jsonl") for line in path.open()]
    logged = [json.loads(line)["request_id"] for line in lines]  # a torn line fails here
    assert len(logged) == len(set(logged)), "a line written twice"
    assert dropped > 0
    assert len(sent) - len(logged) == dropped, "lines lost that no counter shows"
    assert set(after) <= set(logged), "lines after the recovery are missing"
    print(f"full disk: {len(sent)} sent, {len(logged)} logged, {dropped:.0f} counted dropped")


def test_serve_refuses_an_exposed_address_without_a_token(deployed: Project) -> None:
    result = deployed.nox("serve", "--", "--host", "0.0.0.0", check=False, SERVICE_API_TOKEN="")
    assert result.returncode != 0
    said = [line for line in (result.stdout + result.stderr).splitlines() if "refusing" in line]
    assert len(said) == 1, result.stdout + result.stderr
    assert "SERVICE_API_TOKEN" in said[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_tokens_per_route_and_the_documented_paths(deployed, row, tmp_path) -> None:
    env = {"SERVICE_API_TOKEN": TOKEN, "SERVICE_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
           "PREDICTION_LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    with serving(deployed, **env) as url:
        status, body, head = call(
            f"{url}/predict", {"rows": [row]}, {"Authorization": f"bearer {TOKEN}"}
        )
        assert status == 200, body
        request_id = head["x-request-id"]
        feedback = {"request_id": request_id, "labels": [body["predictions"][0]["label"]]}
        status, _, head = call(f"{url}/feedback", feedback, AUTH)
        assert status == 401
        assert head["www-authenticate"].startswith("Bearer")
        status, body, _ = call(
            f"{url}/feedback", feedback, {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
        )
        assert (status, body) == (200, {"request_id": request_id, "recorded": 1})
        # The README's ready request: `nox -s request` writes it from the test split.
        deployed.nox("request", "--", "--rows", "2")
        ready_made = json.loads((deployed.path / "build" / "request.json").read_text())
        status, body, _ = call(f"{url}/predict", ready_made, AUTH)
        assert status == 200, body
        assert len(body["predictions"]) == 2
        # Every path the README's serving section names answers.
        for path in ("/healthz", "/livez", "/readyz", "/metrics"):
            assert call(f"{url}{path}")[0] == 200, path
        status, spec, _ = call(f"{url}/docs.json", headers=AUTH)
        assert status == 200
        assert {"/predict", "/feedback"} <= set(spec["paths"])
        assert call(f"{url}/", headers=AUTH)[0] == 200  # the OpenAPI (Swagger) page


def _client(url: str, row: dict, stop: threading.Event, results: list) -> None:
    """1-row predictions, one connection each, until ``stop``; each outcome appended:
    ("answered", status, request id), ("refused", errno name) when no connection was made,
    ("failed", error) when a connection was made and no answer came."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"rows": [row]})
    while not stop.is_set():
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.connect()
        except OSError as exc:
            results.append(("refused", type(exc).__name__))
            time.sleep(0.05)
            continue
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            results.append(("answered", answer.status, answer.getheader("x-request-id")))
        except (OSError, http.client.HTTPException) as exc:
            results.append(("failed", f"{type(exc).__name__}: {exc}"))
        finally:
            connection.close()


def test_sigterm_drains_in_flight_requests_and_flushes_the_log(deployed, row, tmp_path) -> None:
    """64 clients; SIGTERM while they send: no request the server took fails (those sent after
    it are refused at connect), every answer is in the log, and the server exits 0."""
    logs = tmp_path / "logs"
    proc, url = start_service(deployed, PREDICTION_LOG_DIR=str(logs))
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=_client, args=(url, row, stop, results)) for _ in range(64)]
    for client in clients:
        client.start()
    time.sleep(3)
    # The server itself, as a supervisor signals it (nox, its parent here, then exits with it).
    (server,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(server), signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = proc.wait(timeout=45)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    stopped_in = time.monotonic() - signalled
    left = processes(deployed)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    answered = [r for r in results if r[0] == "answered"]
    failed = [r for r in results if r[0] == "failed"]
    refused = sum(r[0] == "refused" for r in results)
    print(f"drain: {len(answered)} answered, {len(failed)} failed, {refused} refused, "
          f"exit {code} after {stopped_in:.1f} s")  # fmt: skip
    assert not left, "processes outlived the drain"
    assert code == 0
    assert answered, "no request answered before the signal"
    assert failed == [], failed[:5]
    assert {r[1] for r in answered} == {200}
    logged = {
        json.loads(line)["request_id"]
        for p in logs.rglob("predictions-*.jsonl")
        for line in p.open()
    }
    assert {r[2] for r in answered} <= logged, "answered requests missing from the log"


# Never shipped to serve predictions: the training, tracking and monitoring stacks.
NOT_SERVING = (
    "mlflow",
    "mlflow-skinny",
    "dvc",
    "evidently",
    "flask",
    "celery",
    "jupyter",
    "notebook",
)


def test_the_bento_installs_its_serving_closure_and_serves(deployed, row, tmp_path) -> None:
    """The Bento's requirements, installed as its image installs them (uv pip install -r, with
    the Bento's build-time environment) into a fresh environment, torch from the local wheel
    source instead of PyTorch's index: that environment serves a prediction from the Bento."""
    bento = latest_bento(deployed)
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    pinned = [line.split("==")[0] for line in requirements.splitlines() if "==" in line]
    assert not set(pinned) & set(NOT_SERVING), set(pinned) & set(NOT_SERVING)
    assert {"bentoml", "torch", "pandas", "numpy", "pydantic"} <= set(pinned)
    assert re.search(r"^torch==[^+\s]+\+cpu$", requirements, re.M), "torch pinned to its CPU build"
    index = re.search(r"^--extra-index-url (\S+)$", requirements, re.M)
    assert index is not None
    assert index.group(1) == "https://download.pytorch.org/whl/cpu"
    print(f"bento requirements: {len(pinned)} packages")
    source = torch_source_env() or {"TORCH_FIND_LINKS": os.environ.get("TORCH_FIND_LINKS", "")}
    local = (
        f"--find-links {source['TORCH_FIND_LINKS']}"
        if source.get("TORCH_FIND_LINKS")
        else f"--extra-index-url {source['TORCH_INDEX_URL']}"
    )
    offline = tmp_path / "requirements.txt"
    offline.write_text(requirements.replace(index.group(0), local))
    build_env = {
        e["name"]: e["value"] for e in yaml.safe_load((bento / "bento.yaml").read_text())["envs"]
    }
    assert build_env.get("UV_INDEX_STRATEGY") == "unsafe-best-match"
    venv = tmp_path / "bento-env"
    deployed.run("uv", "venv", "--python", "3.11", str(venv))
    python = str(venv / "bin" / "python")
    deployed.run("uv", "pip", "install", "--python", python, "-r", str(offline), **build_env)
    port = free_port()
    env = {**deployed.env, "BENTOML_HOME": str(deployed.path / ".bentoml"),
           "PREDICTION_LOG_DIR": str(tmp_path / "logs"), "BENTOML_DO_NOT_TRACK": "1"}  # fmt: skip
    serve = [str(venv / "bin" / "bentoml"), "serve", str(bento), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*serve, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or ready(url) == 200, "the Bento's server", 120)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        status, body, _ = call(f"{url}/predict", {"rows": [row]})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert status == 200, body
    assert body["predictions"][0]["label"]
