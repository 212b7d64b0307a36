"""The service's request schema and prediction log, without a server."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pydantic import TypeAdapter, ValidationError

from my_ml_project.core.features import FeatureSpec
from my_ml_project.serving.contract import (
    Batcher,
    FeedbackError,
    RecentRequests,
    ServeSettings,
    feedback_labels,
    rows_type,
)
from my_ml_project.serving.predlog import PredictionLog

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


def test_log_is_bounded(tmp_path) -> None:
    log = PredictionLog(tmp_path, max_pending=2, flush_s=60)
    for i in range(5):
        log.record(str(i), "1", [ROW], [{"label": "x"}])
    log.close()
    assert log.dropped == 3
    assert len(next(tmp_path.rglob("*.jsonl")).read_text().splitlines()) == 2


def test_log_reports_its_events(tmp_path) -> None:
    """Rows written and dropped reach the callback the service turns into metrics."""
    events: list[tuple[str, int]] = []
    log = PredictionLog(tmp_path, max_pending=2, flush_s=60, on_event=lambda *e: events.append(e))
    for i in range(3):
        log.record(str(i), "1", [ROW], [{"label": "x"}])
    log.close()
    assert events == [("dropped", 1), ("written", 2)]


def test_failed_write_loses_its_batch_not_the_writer(tmp_path) -> None:
    """A folder that cannot be written (here: a file in its way) fails that batch, counted; the
    next batch, once the folder can be written, is logged."""
    blocked = tmp_path / "log"
    blocked.write_text("not a folder")
    events: list[tuple[str, int]] = []
    log = PredictionLog(blocked, flush_s=60, on_event=lambda *e: events.append(e))
    log.record("a", "1", [ROW, ROW], [{"label": "x"}, {"label": "y"}])
    assert log.flush() == 0
    assert (log.write_errors, log.dropped) == (1, 2)
    assert events == [("write_error", 1), ("dropped", 2)]
    blocked.unlink()
    log.record("b", "1", [ROW], [{"label": "x"}])
    log.close()
    assert len(next(blocked.rglob("predictions-*.jsonl")).read_text().splitlines()) == 1


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
