"""The service's request schema and prediction log, without a server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from my_ml_project.core.features import FeatureSpec
from my_ml_project.serving.contract import (
    Batcher,
    FeedbackError,
    Guard,
    RecentRequests,
    ServeSettings,
    blame,
    feedback_labels,
    overflow_errors,
    rows_type,
)
from my_ml_project.serving.deploy import serving_closure
from my_ml_project.serving.predlog import PredictionLog, RequestIndex, count_rows

SPEC = FeatureSpec.build(
    ["size", "member", "plan"],
    {"size": "numeric", "member": "boolean", "plan": "categorical"},
    {"plan": ["basic", "pro"]},
)
ROW = {"size": 1.5, "member": True, "plan": "pro"}


def rows(spec: FeatureSpec = SPEC, max_rows: int = 3) -> TypeAdapter:
    return TypeAdapter(rows_type(spec, max_rows))


def test_schema_accepts_a_typed_row() -> None:
    assert rows().validate_json(json.dumps([ROW, {**ROW, "size": 2}]))[1].size == 2


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"member": True, "plan": "pro"}, "size"),
        ({**ROW, "extra": 1}, "extra"),
        ({**ROW, "size": "1.5"}, "size"),
        ({**ROW, "member": "yes"}, "member"),
        ({**ROW, "size": None}, "size"),
    ],
)
def test_schema_refuses_bad_rows_naming_the_field(row: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        rows().validate_json(json.dumps([row]))
    assert field in {str(part) for e in error.value.errors() for part in e["loc"]}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_schema_refuses_non_finite_numbers(literal: str) -> None:
    with pytest.raises(ValidationError):
        rows().validate_json(json.dumps([ROW]).replace("1.5", literal))


@pytest.mark.parametrize("count", [0, 4])
def test_schema_bounds_the_row_count(count: int) -> None:
    with pytest.raises(ValidationError):
        rows().validate_python([ROW] * count)


def test_null_only_where_the_model_imputes() -> None:
    spec = FeatureSpec.build(SPEC.names, SPEC.kinds, SPEC.categories, missing="impute")
    assert rows(spec).validate_python([{**ROW, "size": None}])[0].size is None


def test_settings_from_the_environment() -> None:
    settings = ServeSettings.from_env({"SERVE_MAX_ROWS": "5", "PREDICTION_LOG": "off"})
    assert (settings.max_rows, settings.log_enabled, settings.token) == (5, False, None)
    with pytest.raises(ValueError, match="SERVE_MAX_ROWS"):
        ServeSettings.from_env({"SERVE_MAX_ROWS": "-1"})


def test_log_writes_every_record_once_from_many_threads(tmp_path) -> None:
    log = PredictionLog(tmp_path, flush_s=0.01)
    answer = {"label": "pro", "probabilities": {"a": 0.25, "b": 0.75}}

    def serve(i: int) -> None:
        for j in range(50):
            log.record(f"{i}-{j}", "3", [ROW, ROW], [answer, answer])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    files = list(tmp_path.glob("date=*/predictions-*.jsonl"))
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(records) == 8 * 50 * 2
    assert len({r["request_id"] for r in records}) == 400
    assert records[0]["inputs"] == ROW
    assert records[0]["model_version"] == "3"
    assert records[0]["probabilities"] == answer["probabilities"]


def test_log_is_bounded_dropping_the_oldest(tmp_path) -> None:
    log = PredictionLog(tmp_path, max_pending=2, flush_s=60)
    for i in range(5):
        log.record(str(i), "1", [ROW], [{"label": "x"}])
    log.close()
    assert log.dropped == 3
    lines = next(tmp_path.glob("date=*/predictions-*.jsonl")).read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["3", "4"]


def _scorer(calls: list[list]) -> object:
    def score(records: list) -> tuple[list, list]:
        calls.append(list(records))
        if "bad" in records:
            raise ValueError("bad row")
        return [f"label-{r}" for r in records], [[r] for r in records]

    return score


async def _gather(batcher: Batcher, requests: list[list]) -> list:
    return await asyncio.gather(*(batcher(r) for r in requests), return_exceptions=True)


def test_batcher_scores_concurrent_requests_together_in_order() -> None:
    calls: list[list] = []
    answers = asyncio.run(_gather(Batcher(_scorer(calls)), [[1], [2, 3], [4]]))
    assert calls == [[1, 2, 3, 4]]
    assert answers[1] == (["label-2", "label-3"], [[2], [3]])
    assert answers[2] == (["label-4"], [[4]])


def test_batcher_bounds_a_call_and_fails_only_the_bad_request() -> None:
    calls: list[list] = []
    batcher = Batcher(_scorer(calls), max_rows=2)
    answers = asyncio.run(_gather(batcher, [[1], ["bad"], [2, 3], [4]]))
    assert all(len(call) <= 2 for call in calls)
    assert isinstance(answers[1], ValueError)
    labels = [a[0] for a in (answers[0], answers[2], answers[3])]
    assert labels == [["label-1"], ["label-2", "label-3"], ["label-4"]]


@pytest.mark.parametrize(
    ("labels", "rows", "status", "message"),
    [
        (["pro"], None, 404, "unknown request_id"),
        (["pro"], 2, 422, "1 given, the request had 2 rows"),
        (["pro", "gold"], 2, 422, "unknown classes gold"),
    ],
)
def test_feedback_is_refused_with_the_reason(labels, rows, status, message) -> None:
    with pytest.raises(FeedbackError, match=message) as error:
        feedback_labels(labels, rows, ["basic", "pro"])
    assert error.value.status == status


def test_feedback_labels_are_the_model_s_class_names() -> None:
    assert feedback_labels([1, " pro"], 2, ["1", "pro"]) == ["1", "pro"]


def test_recent_requests_keep_the_newest() -> None:
    recent = RecentRequests(size=2)
    for i in range(3):
        recent.add(str(i), i + 1)
    assert (recent.get("0"), recent.get("1"), recent.get("2")) == (None, 2, 3)


def test_log_records_rows_in_order_with_the_shadow_and_text_categories(tmp_path) -> None:
    log = PredictionLog(tmp_path, categorical=["plan"], flush_s=60)
    shadow = ("4", [{"label": "b", "probabilities": {}}] * 2)
    log.record("r" * 32, "3", [{**ROW, "plan": 7}, ROW], [{"label": "a"}] * 2, shadow)
    log.close()
    lines = next(tmp_path.glob("date=*/predictions-*.jsonl")).read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (first["row"], second["row"]) == (0, 1)
    assert first["inputs"]["plan"] == "7"
    assert first["shadow"] == {"model_version": "4", "label": "b", "probabilities": {}}


def test_a_record_that_cannot_be_encoded_is_rejected_and_the_writer_goes_on(tmp_path) -> None:
    counted: list[tuple[str, int]] = []
    log = PredictionLog(tmp_path, flush_s=0.01, on_count=lambda name, n: counted.append((name, n)))
    nan = {"label": "a", "probabilities": {"a": float("nan"), "b": 0.5}}
    log.record("bad", "1", [ROW, ROW], [{"label": "a"}, nan])
    time.sleep(0.2)
    log.record("good", "1", [ROW], [{"label": "a"}])
    log.close()
    written = [json.loads(line) for p in tmp_path.rglob("predictions-*.jsonl") for line in p.open()]
    assert [(r["request_id"], r["row"]) for r in written] == [("bad", 0), ("good", 0)]
    (reject,) = [json.loads(line) for p in tmp_path.rglob("rejects-*.jsonl") for line in p.open()]
    assert (reject["request_id"], reject["row"]) == ("bad", 1)
    assert "Out of range float values are not JSON compliant" in reject["reason"]
    assert log.counts == {"written": 3, "dropped": 0, "write_errors": 0, "rejected": 1}
    assert sum(n for name, n in counted if name == "rejected") == 1


def test_text_that_reads_nan_is_logged_and_infinity_is_rejected(tmp_path) -> None:
    """The log's fast encoder writes NaN and Infinity as bare tokens; a line holding one is
    judged again strictly: text that reads so is kept, a non-finite number is rejected."""
    log = PredictionLog(tmp_path, flush_s=60)
    text = {"label": "NaN", "probabilities": {"NaN": 0.5, "Infinity": 0.5}}
    infinite = {"label": "a", "probabilities": {"a": float("inf"), "b": 0.5}}
    log.record("text", "1", [ROW], [text])
    log.record("inf", "1", [ROW], [infinite])
    log.feedback("text", ["NaN"])
    log.close()
    written = [json.loads(line) for p in tmp_path.rglob("predictions-*.jsonl") for line in p.open()]
    assert [(r["request_id"], r["label"], r["probabilities"]) for r in written] == [
        ("text", "NaN", {"NaN": 0.5, "Infinity": 0.5})
    ]
    assert written[0]["inputs"] == ROW
    (labels,) = [json.loads(line) for p in tmp_path.rglob("feedback-*.jsonl") for line in p.open()]
    assert labels["labels"] == ["NaN"]
    (reject,) = [json.loads(line) for p in tmp_path.rglob("rejects-*.jsonl") for line in p.open()]
    assert reject["request_id"] == "inf"
    assert log.counts["rejected"] == 1


# Run in a process of its own: the file-size limit holds for every file the process writes.
FULL_DISK = """
import json, resource, sys, time
from pathlib import Path
from my_ml_project.serving.deploy import serving_closure
from my_ml_project.serving.predlog import PredictionLog, count_rows

folder = Path(sys.argv[1])
log = PredictionLog(folder, max_pending=40, flush_s=0.01, retry_s=(0.01, 0.05), stuck_s=0.3)
row, answer = {"size": 1.5}, {"label": "a", "probabilities": {"a": 0.25, "b": 0.75}}
sent, health = [], {}

def send(prefix, count):
    for i in range(count):
        sent.append(f"{prefix}{i}")
        log.record(sent[-1], "1", [row], [answer])
        time.sleep(0.002)

def settle(done):
    deadline = time.monotonic() + 20
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)

send("before", 20)
settle(lambda: log.counts["written"] == 20)
size = sum(p.stat().st_size for p in folder.rglob("predictions-*.jsonl"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))  # a few more lines fit
send("during", 200)
settle(lambda: not log.healthy()[0])
health["failing"] = log.healthy()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
settle(lambda: log.healthy()[0])
health["recovered"] = log.healthy()
send("after", 20)
log.close()
print(json.dumps({"sent": sent, "counts": log.counts, "health": health}))
"""


def test_log_survives_a_full_disk_and_recovers_counting_every_lost_line(tmp_path) -> None:
    """Writes past a file-size limit fail with EFBIG (Python ignores SIGXFSZ): a disk that fills
    up, then frees space when the limit is lifted. Every line is written once or counted."""
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    lines = [line for p in tmp_path.rglob("predictions-*.jsonl") for line in p.open()]
    logged = [json.loads(line)["request_id"] for line in lines]  # a torn line fails here
    assert len(logged) == len(set(logged)), "a line written twice"
    counts = result["counts"]
    assert counts["write_errors"] > 0
    assert counts["dropped"] > 0
    assert len(result["sent"]) - len(logged) == counts["dropped"]
    assert counts["written"] == len(logged)
    assert {f"after{i}" for i in range(20)} <= set(logged), "lines after the recovery are lost"
    assert result["health"]["failing"][0] is False
    assert "cannot write" in result["health"]["failing"][1]
    assert result["health"]["recovered"] == [True, ""]
    assert "prediction log: cannot write" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_dead_writer_is_not_healthy(tmp_path) -> None:
    log = PredictionLog(tmp_path, flush_s=0.01)
    assert log.healthy() == (True, "")
    log._stop.set()  # the thread ends as if it had died; close() was never called
    log._thread.join()
    log._stop.clear()
    assert log.healthy() == (False, "the prediction log writer is dead")


def test_overflow_names_the_row_and_the_field() -> None:
    records = [{"size": 1.5, "age": 2.0}, {"size": 1e39, "age": 1e36}, {"size": None, "age": 1e30}]
    found = overflow_errors(records, ["size", "age"], mean=[0.0, 0.0], std=[1.0, 1e-3])
    assert len(found) == 2
    assert found[0].startswith("rows[1].size: 1e+39 overflows")
    assert found[1].startswith("rows[1].age: 1e+36 overflows")  # 1e39 once standardised


def test_blame_names_the_field_that_makes_a_row_non_finite() -> None:
    records = [{"size": 1.5, "age": 2.0}, {"size": 3e37, "age": 2.0}]

    def finite(rows: list[dict]) -> bool:
        return all(abs(r["size"]) < 1e30 and abs(r["age"]) < 1e30 for r in rows)

    assert blame(records, [1], ["size", "age"], [0.0, 0.0], [1.0, 1.0], finite) == [
        "rows[1].size: 3e+37 gives a non-finite result in the model"
    ]
    assert blame(records, [0], ["size", "age"], [0.0, 0.0], [1.0, 1.0], lambda _: False) == [
        "rows[0]: its values together give a non-finite result in the model"
    ]


async def _echo(scope: dict, receive, send) -> None:
    """The app behind the guard: answers 200 with the body it received and its request id."""
    message = await receive() if scope["method"] == "POST" else {"body": b""}
    request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode()
    body = json.dumps({"body": message["body"].decode(), "id": request_id}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def guarded(settings: ServeSettings, method: str, path: str, headers: dict, body: bytes = b""):
    """(status, headers, parsed body) of one request through the Guard in front of _echo."""
    guard = Guard(_echo, settings, fields={"/predict": frozenset({"rows"})})
    raw = {"host": "127.0.0.1:3000", "content-length": str(len(body))} | headers
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in raw.items()]}  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    head = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], head, json.loads(sent[1]["body"])


JSON = {"content-type": "application/json"}
BODY = json.dumps({"rows": [ROW]}).encode()
LOCKED = ServeSettings(token="p-token", feedback_token="f-token")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_guard_takes_the_bearer_scheme_in_any_case(scheme: str) -> None:
    auth = {"authorization": f"{scheme} p-token", **JSON}
    status, head, body = guarded(LOCKED, "POST", "/predict", auth, BODY)
    assert status == 200
    assert json.loads(body["body"]) == {"rows": [ROW]}, "the body reaches the service unchanged"
    assert head["x-request-id"] == body["id"], "one id, for the service and the client"


@pytest.mark.parametrize(
    ("path", "token"),
    [("/predict", None), ("/predict", "wrong"), ("/predict", "f-token"), ("/feedback", "p-token")],
)
def test_guard_401_with_a_challenge_and_one_token_per_route(path: str, token) -> None:
    auth = {"authorization": f"Bearer {token}"} if token else {}
    status, head, _ = guarded(LOCKED, "POST", path, auth | JSON, BODY)
    assert status == 401
    assert head["www-authenticate"].startswith("Bearer")


def test_feedback_is_closed_without_its_token_unless_opened() -> None:
    body = json.dumps({"request_id": "0" * 32, "labels": ["a"]}).encode()
    status, _, answer = guarded(ServeSettings(), "POST", "/feedback", JSON, body)
    assert status == 403
    assert "SERVICE_FEEDBACK_TOKEN" in answer["error"]
    assert guarded(ServeSettings(feedback_open=True), "POST", "/feedback", JSON, body)[0] == 200


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "text/plain"}, BODY, 415),
        ({"content-type": ""}, BODY, 415),
        (JSON, json.dumps({"rows": [ROW], "extra": 1}).encode(), 422),
        ({"host": "attacker.example"}, BODY, 400),
        ({"host": "localhost:3000"}, BODY, 200),
        ({"host": "[::1]:3000"}, BODY, 200),
    ],
)
def test_guard_refuses_what_the_service_would_not_take(headers, body, status) -> None:
    assert guarded(ServeSettings(), "POST", "/predict", JSON | headers, body)[0] == status


def test_host_allowlist_adds_the_bind_address_and_configured_names() -> None:
    settings = ServeSettings.from_env(
        {"SERVE_BIND_HOST": "10.0.0.5", "SERVE_ALLOWED_HOSTS": "api.example"}
    )
    for host, status in [("10.0.0.5:3000", 200), ("api.example", 200), ("other.example", 400)]:
        assert guarded(settings, "GET", "/docs.json", {"host": host})[0] == status, host
    anyone = ServeSettings.from_env({"SERVE_ALLOWED_HOSTS": "*"})
    assert guarded(anyone, "GET", "/docs.json", {"host": "other.example"})[0] == 200


def test_probes_answer_whatever_the_host_and_token() -> None:
    assert guarded(LOCKED, "GET", "/readyz", {"host": "10.1.2.3:3000"})[0] == 200


def test_feedback_waits_in_its_lane_while_predictions_go_through() -> None:
    """SERVE_FEEDBACK_CONCURRENCY (1): one /feedback request at a time reaches the service;
    /predict never waits for the feedback lane."""
    inside = {"/feedback": 0, "/predict": 0}
    most = dict(inside)
    release = asyncio.Event()

    async def app(scope: dict, receive, send) -> None:
        path = scope["path"]
        inside[path] += 1
        most[path] = max(most[path], inside[path])
        if path == "/feedback":
            await release.wait()  # a slow lookup
        inside[path] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    settings = ServeSettings.from_env({"SERVE_FEEDBACK_OPEN": "yes"})
    assert settings.feedback_concurrency == 1
    fields = {"/feedback": frozenset(), "/predict": frozenset()}  # as the service: bodies read
    guard = Guard(app, settings, fields, lanes={"/feedback": settings.feedback_concurrency})

    async def post(path: str, body_sent: asyncio.Event | None = None) -> int:
        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", b"2")]}  # fmt: skip
        sent: list[dict] = []

        async def receive() -> dict:
            if body_sent is not None:
                await body_sent.wait()  # a client sending its body slowly
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await guard(scope, receive, send)
        return sent[0]["status"]

    async def scenario() -> list[int]:
        slow_body = asyncio.Event()
        slow = asyncio.create_task(post("/feedback", slow_body))
        await asyncio.sleep(0.05)
        assert inside["/feedback"] == 0  # its body not in yet: it holds no place in the lane
        feedback = [asyncio.create_task(post("/feedback")) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert (inside["/feedback"], most["/feedback"]) == (1, 1)  # the others wait outside
        assert await asyncio.wait_for(post("/predict"), 1) == 200  # not behind the lane
        release.set()
        slow_body.set()
        return await asyncio.gather(slow, *feedback)

    assert asyncio.run(scenario()) == [200] * 5
    assert most == {"/feedback": 1, "/predict": 1}
    with pytest.raises(ValueError, match="SERVE_FEEDBACK_CONCURRENCY"):
        ServeSettings.from_env({"SERVE_FEEDBACK_CONCURRENCY": "0"})


def test_a_client_error_logs_one_warning_line_with_the_request_id(caplog) -> None:
    secret = json.dumps({"rows": [ROW], "card_number": "4111"}).encode()
    with caplog.at_level("INFO"):
        status, head, _ = guarded(
            LOCKED, "POST", "/predict", {"authorization": "Bearer p-token"} | JSON, secret
        )
    assert status == 422
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert head["x-request-id"] in record.getMessage()
    assert "4111" not in caplog.text
    assert record.exc_info is None


@pytest.mark.parametrize(
    ("env", "host", "refused"),
    [
        ({}, "127.0.0.1", None),
        ({}, "localhost", None),
        ({}, "0.0.0.0", "without SERVICE_API_TOKEN"),
        ({"SERVE_ALLOW_OPEN": "yes"}, "0.0.0.0", None),
        ({"SERVICE_API_TOKEN": "t"}, "0.0.0.0", None),
        (
            {"SERVICE_API_TOKEN": "t", "SERVE_FEEDBACK_OPEN": "yes"},
            "10.0.0.5",
            "SERVICE_FEEDBACK_TOKEN",
        ),
    ],
)
def test_exposing_the_service_needs_a_token(env: dict, host: str, refused) -> None:
    said = ServeSettings.from_env(env).exposure_error(host)
    if refused is None:
        assert said is None
    else:
        assert refused in said
        assert "\n" not in said


def test_an_image_without_its_token_never_starts(monkeypatch) -> None:
    """In BentoML's image the service binds 0.0.0.0 (no `nox -s serve` in front of it): the
    service itself refuses, before it loads a model."""
    from my_ml_project.core.config import ProjectError
    from my_ml_project.serving.service import CONTAINERIZED, build_service

    monkeypatch.setenv(CONTAINERIZED, "true")
    with pytest.raises(ProjectError, match="without SERVICE_API_TOKEN") as refused:
        build_service(ServeSettings.from_env({}))
    assert "this container serves 0.0.0.0" in str(refused.value)
    open_feedback = {"SERVICE_API_TOKEN": "t", "SERVE_FEEDBACK_OPEN": "yes"}
    with pytest.raises(ProjectError, match="SERVE_FEEDBACK_OPEN and no SERVICE_FEEDBACK_TOKEN"):
        build_service(ServeSettings.from_env(open_feedback))


def test_feedback_finds_a_request_in_the_index_without_reading_the_log(tmp_path) -> None:
    log = PredictionLog(tmp_path, flush_s=60)
    log.record("b" * 32, "1", [ROW] * 3, [{"label": "x"}] * 3)
    log.close()
    for day_file in tmp_path.glob("date=*/*.jsonl"):
        day_file.unlink()  # the lookup must not need the log itself
    assert count_rows(tmp_path, "b" * 32) == 3
    assert count_rows(tmp_path, "c" * 32) == 0
    assert count_rows(tmp_path / "missing", "b" * 32) == 0


def test_the_feedback_index_keeps_its_connection_and_sees_new_requests(tmp_path) -> None:
    index = RequestIndex(tmp_path)
    assert index.rows("b" * 32) == 0
    assert not index.path.exists()  # a lookup before the first write creates nothing
    log = PredictionLog(tmp_path, flush_s=60)
    log.record("b" * 32, "1", [ROW] * 3, [{"label": "x"}] * 3)
    log.flush()
    assert index.rows("b" * 32) == 3
    log.record("d" * 32, "1", [ROW], [{"label": "x"}])
    log.close()
    assert index.rows("d" * 32) == 1  # written after the connection was opened
    assert index.rows("c" * 32) == 0
    # Answered from a thread of its own, on a connection of its own (as /feedback does).
    assert asyncio.run(asyncio.to_thread(index.rows, "b" * 32)) == 3
    # The index deleted (the folder cleaned), then replaced: the kept connection follows.
    index.path.unlink()
    assert index.rows("b" * 32) == 0
    index.path.write_bytes(b"not a database")
    with pytest.raises(sqlite3.DatabaseError):
        index.rows("b" * 32)
    index.path.unlink()
    for suffix in ("-wal", "-shm"):
        index.path.with_name(index.path.name + suffix).unlink(missing_ok=True)
    again = PredictionLog(tmp_path, flush_s=60)
    again.record("e" * 32, "1", [ROW] * 2, [{"label": "x"}] * 2)
    again.close()
    assert (index.rows("e" * 32), index.rows("b" * 32)) == (2, 0)


def test_the_bento_pins_what_the_service_imports_at_the_locked_versions() -> None:
    closure = serving_closure()
    assert {"bentoml", "torch", "pandas", "numpy", "pydantic"} <= set(closure)
    # fairlearn: the gate's slice metrics, evaluation only.
    assert not {"mlflow", "dvc", "evidently", "fairlearn", "flask", "celery", "jupyter"} & set(
        closure
    )
    lock = tomllib.loads(Path("uv.lock").read_text())["package"]
    assert set(closure.items()) <= {(p["name"], p["version"]) for p in lock}


def test_a_stuck_writer_is_not_healthy_until_it_moves(tmp_path) -> None:
    """A write that hangs (here: opening a named pipe nobody reads, as a hung network disk)."""
    day = tmp_path / f"date={datetime.now(UTC).date().isoformat()}"
    day.mkdir()
    pipe = day / f"predictions-{os.getpid()}.jsonl"
    os.mkfifo(pipe)
    log = PredictionLog(tmp_path, flush_s=0.01, stuck_s=0.2)
    log.record("a" * 32, "1", [ROW], [{"label": "x"}])
    deadline = time.monotonic() + 20
    while log.healthy()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stuck" in log.healthy()[1]
    with open(pipe, "rb") as reader:  # someone reads: the write goes through
        assert json.loads(reader.readline())["request_id"] == "a" * 32
    while not log.healthy()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.healthy() == (True, "")
    log.close()
