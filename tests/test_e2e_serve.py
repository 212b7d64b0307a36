"""End to end: the trained project's champion shipped (`nox -s deploy`) and served (`nox -s serve`).

One server for the module, over the shared ``trained`` project: started once, with a token, and
stopped by the last test with SIGTERM, as a supervisor would.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from e2e import PACKAGE, Project, start_service

pytestmark = pytest.mark.e2e

TOKEN = "e2e-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    project: Project


def call(
    url: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text, status, head = answer.read(), answer.status, dict(answer.headers)
    except urllib.error.HTTPError as exc:
        text, status, head = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(text), head
    except ValueError:
        return status, {"text": text.decode(errors="replace")}, head


def oversized(url: str, size: int, path: str = "/predict") -> int:
    """The status of a POST that announces ``size`` bytes: the guard answers from the header.

    Only the start of the body is sent: a server that answers before reading it all (as it
    should) may close the connection while a client still writes, a broken pipe that says
    nothing about the server.
    """
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(size)}
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.send(b"[" * 65536)
        return connection.getresponse().status
    finally:
        connection.close()


def predict(
    server: Server, rows: list, headers: dict | None = None, route: str = "/predict"
) -> tuple[int, dict, dict]:
    body = json.dumps({"rows": rows}).encode()
    return call(f"{server.url}{route}", body, {**AUTH, **(headers or {})})


@pytest.fixture(scope="module")
def server(trained: Project) -> Iterator[Server]:
    result = trained.nox("deploy")
    assert "bento: my-ml-project:" in result.stdout + result.stderr
    assert not server_processes(trained), "the deploy smoke test left a server process behind"
    proc, url = start_service(trained, SERVICE_API_TOKEN=TOKEN, SERVE_MAX_ROWS="200")
    yield Server(url, proc, trained)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in server_processes(trained):  # workers live in sessions of their own
        os.kill(pid, signal.SIGKILL)


def server_processes(project: Project) -> list[int]:
    """Every live process of the project's BentoML server, by the BENTOML_HOME it runs with.

    Found through /proc rather than the process tree: BentoML starts each worker in a session
    of its own, and a worker whose arbiter died is re-parented to init.
    """
    marker = f"BENTOML_HOME={project.path / '.bentoml'}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


ROWS = """
import json
import pyarrow.parquet as pq
frame = pq.read_table("data/processed/test.parquet", use_threads=False).to_pandas()
target = json.load(open("data/processed/schema.json"))["target"]
rows = json.loads(frame.drop(columns=[target]).to_json(orient="records"))
print(json.dumps([rows, [str(v) for v in frame[target]]]))
"""


@pytest.fixture(scope="module")
def test_rows(trained: Project) -> tuple[list[dict], list[str]]:
    """The test split's feature rows (as JSON would carry them) and labels."""
    rows, labels = json.loads(trained.py("-c", ROWS).stdout)
    return rows, labels


def test_second_deploy_reuses_the_bento(server: Server) -> None:
    result = server.project.nox("deploy")
    tags = [line for line in result.stdout.splitlines() if line.startswith("bento: ")]
    assert tags, result.stdout
    listed = server.project.run(
        str(server.project.venv / "bin" / "bentoml"), "list", "-o", "json",
        BENTOML_HOME=str(server.project.path / ".bentoml"),
    ).stdout  # fmt: skip
    assert len(json.loads(listed)) == 1


def test_building_the_service_imports_neither_torch_nor_pandas(server: Server) -> None:
    """`bentoml serve` builds the service in its own process before it starts a worker: what that
    imports delays readiness (torch ~2 s, pandas ~0.3 s). The worker imports them."""
    code = (
        f"import sys\nfrom {PACKAGE}.serving import service\nassert service.Predictor\n"
        "print(sorted(name for name in ('torch', 'pandas') if name in sys.modules))"
    )
    built = server.project.py("-c", code, BENTOML_HOME=str(server.project.path / ".bentoml"))
    assert built.stdout.splitlines()[-1] == "[]", built.stdout + built.stderr


def test_deploy_writes_a_valid_sbom_of_the_locked_packages(server: Server) -> None:
    project = server.project
    sboms = list((project.path / "build" / "sbom").glob("*.cdx.json"))
    assert len(sboms) == 1, sboms
    text = sboms[0].read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
    bom = json.loads(text)
    tag = next(p["value"] for p in bom["metadata"]["properties"] if p["name"] == "bentoml:bento")
    assert sboms[0].name == tag.replace(":", "-") + ".cdx.json"
    lock = tomllib.loads((project.path / "uv.lock").read_text())["package"]
    locked = {p["name"]: p["version"] for p in lock}
    listed = {c["name"]: c["version"] for c in bom["components"]}
    for name in ("torch", "bentoml", "pandas"):
        assert listed[name] == locked[name], name
    assert "mlflow" not in listed, "the Bento ships the serving closure only"
    # nvidia-ml-py is BentoML's own (pure Python); the CUDA build's wheels are not shipped.
    cuda = [n for n in listed if n == "triton" or n.startswith(("nvidia-cu", "nvidia-nccl"))]
    assert not cuda, "a CPU Bento ships no CUDA wheels"
    assert "pytest" not in listed, "dev tools are not shipped"


def engine_running() -> bool:
    """Whether docker or podman answers (as deploy.py checks before containerizing)."""
    for engine in filter(shutil.which, ("docker", "podman")):
        if subprocess.run([engine, "info"], capture_output=True, timeout=60).returncode == 0:
            return True
    return False


def test_containerize_without_an_engine_says_so_and_still_writes_the_sbom(server) -> None:
    if engine_running():
        pytest.skip("a container engine runs here: the image would be built")
    sboms = server.project.path / "build" / "sbom"
    shutil.rmtree(sboms)
    result = server.project.nox("deploy", "--", "--containerize", check=False)
    assert result.returncode != 0
    assert "no container engine (docker or podman) is running here" in result.stdout + result.stderr
    assert len(list(sboms.glob("*.cdx.json"))) == 1


def test_test_split_answers_match_the_champion(server: Server, test_rows) -> None:
    rows, labels = test_rows
    status, body, head = predict(server, rows)
    assert status == 200, body
    registry = server.project.registry()
    assert body["model_version"] == str(registry["champion"])
    assert head.get("x-request-id")
    answered = [p["label"] for p in body["predictions"]]
    accuracy = sum(a == y for a, y in zip(answered, labels, strict=True)) / len(labels)
    # The logged metric is rounded to 6 decimals.
    assert accuracy == pytest.approx(registry["metrics"]["test_accuracy"], abs=1e-6)
    for p in body["predictions"]:
        assert math.isclose(sum(p["probabilities"].values()), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(
    ("change", "status", "named"),
    [
        (lambda r: r.pop(next(iter(r))), 400, True),
        (lambda r: r.update(unknown_field=1), 400, "unknown_field"),
        (lambda r: r.update({next(iter(r)): "abc"}), 400, True),
        (lambda r: r.update({next(iter(r)): None}), 400, True),
    ],
    ids=["missing", "extra", "wrong-type", "null"],
)
def test_bad_rows_get_a_4xx_naming_the_field(server, test_rows, change, status, named) -> None:
    row = dict(test_rows[0][0])
    field = next(iter(row))
    change(row)
    code, body, _ = predict(server, [row])
    assert code == status, body
    assert (field if named is True else named) in json.dumps(body)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_get_a_400(server, test_rows, literal) -> None:
    row = dict(test_rows[0][0])
    field = next(iter(row))
    text = json.dumps({"rows": [row]}).replace(
        f'"{field}": {json.dumps(row[field])}', f'"{field}": {literal}'
    )
    code, body, _ = call(f"{server.url}/predict", text.encode(), AUTH)
    assert code == 400, body
    assert field in json.dumps(body)


def test_bad_bodies_get_a_4xx_and_the_server_keeps_serving(server, test_rows) -> None:
    rows = test_rows[0]
    assert predict(server, [])[0] == 400
    assert predict(server, rows[:1] * 201)[0] == 400  # SERVE_MAX_ROWS=200
    assert call(f"{server.url}/predict", b"not json", AUTH)[0] == 400
    assert oversized(server.url, 2 << 20) == 413
    assert predict(server, rows[:2])[0] == 200


def test_token_is_enforced_but_probes_stay_open(server, test_rows) -> None:
    body = json.dumps({"rows": test_rows[0][:1]}).encode()
    assert call(f"{server.url}/predict", body)[0] == 401
    assert call(f"{server.url}/predict", body, {"Authorization": "Bearer wrong"})[0] == 401
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert call(f"{server.url}{path}")[0] == 200, path
    docs = call(f"{server.url}/docs.json", headers=AUTH)[1]
    assert next(iter(test_rows[0][0])) in json.dumps(docs)


def test_concurrent_requests_are_each_logged_once(server, test_rows) -> None:
    rows = test_rows[0][:3]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: predict(server, rows), range(200)))
    assert all(status == 200 for status, _, _ in answers)
    ids = {head["x-request-id"] for _, _, head in answers}
    assert len(ids) == 200
    time.sleep(2)  # the writer flushes every 0.5 s
    records = []
    for path in (server.project.path / "logs" / "predictions").rglob("*.jsonl"):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in records if r["request_id"] in ids]
    assert len(mine) == 200 * len(rows)
    assert {r["model_version"] for r in mine} == {str(server.project.registry()["champion"])}
    assert all(set(r["inputs"]) == set(rows[0]) and r["ts"].endswith("+00:00") for r in mine)


# --- /explain: /predict's contract, each row with its attributions -----------------------------


def test_explain_answers_as_predict_with_attributions_per_feature(server, test_rows) -> None:
    rows = test_rows[0][:20]
    status, predicted, _ = predict(server, rows)
    assert status == 200, predicted
    status, explained, head = predict(server, rows, route="/explain")
    assert status == 200, explained
    assert head.get("x-request-id")
    assert explained["model_version"] == predicted["model_version"]
    for p, e, row in zip(predicted["predictions"], explained["predictions"], rows, strict=True):
        assert e["label"] == p["label"]
        assert e["probabilities"] == pytest.approx(p["probabilities"], abs=1e-6)
        assert set(e["attributions"]) == set(row), "one value per feature column sent"
        # Completeness: from the typical row's probability to this row's, in the features.
        total = sum(e["attributions"].values()) + e["baseline"]
        assert total == pytest.approx(e["probabilities"][e["label"]], abs=0.01)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: r.pop(next(iter(r))), True),
        (lambda r: r.update(unknown_field=1), "unknown_field"),
        (lambda r: r.update({next(iter(r)): "abc"}), True),
        (lambda r: r.update({next(iter(r)): None}), True),
    ],
    ids=["missing", "extra", "wrong-type", "null"],
)
def test_explain_refuses_bad_rows_as_predict_does(server, test_rows, change, named) -> None:
    row = dict(test_rows[0][0])
    field = next(iter(row))
    change(row)
    code, body, _ = predict(server, [row], route="/explain")
    assert (code, body) == predict(server, [row])[:2]
    assert code == 400, body
    assert (field if named is True else named) in json.dumps(body)


def test_explain_guards_as_predict_does(server, test_rows) -> None:
    url, rows = f"{server.url}/explain", test_rows[0]
    body = json.dumps({"rows": rows[:1]}).encode()
    assert call(url, body)[0] == 401
    assert call(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert call(url, body, {**AUTH, "Content-Type": "text/plain"})[0] == 415
    assert call(url, body, {**AUTH, "Host": "evil.example"})[0] == 400
    extra = json.dumps({"rows": rows[:1], "debug": True}).encode()
    code, answer, _ = call(url, extra, AUTH)
    assert code == 422
    assert "debug" in answer["error"]
    assert oversized(server.url, 2 << 20, "/explain") == 413
    assert predict(server, [], route="/explain")[0] == 400
    assert predict(server, rows[:1] * 201, route="/explain")[0] == 400  # SERVE_MAX_ROWS=200
    assert call(url, b"not json", AUTH)[0] == 400
    text = body.decode().replace(json.dumps(rows[0][next(iter(rows[0]))]), "NaN", 1)
    assert call(url, text.encode(), AUTH)[0] == 400
    assert predict(server, rows[:2], route="/explain")[0] == 200
    docs = call(f"{server.url}/docs.json", headers=AUTH)[1]
    assert "/explain" in docs["paths"]


def test_sigterm_stops_every_process(server: Server) -> None:
    running = server_processes(server.project)
    assert len(running) >= 2, "an arbiter and at least one worker"
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while left := server_processes(server.project):
        assert time.monotonic() < deadline, f"processes {left} outlived SIGTERM"
        time.sleep(0.5)
