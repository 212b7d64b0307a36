"""Monitoring: the log reader, the gate's decisions, and a real Evidently run on mixed data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from my_ml_project.core.config import MonitorParams, Params, SliceParams, load_params
from my_ml_project.core.features import NUMERIC
from my_ml_project.core.fileio import file_md5
from my_ml_project.data.prepare import Schema, load_frame, prepare
from my_ml_project.evaluation.slices import Slicer
from my_ml_project.monitoring.drift import chi2_homogeneity, judge, plan
from my_ml_project.monitoring.monitor import (
    PREDICTION,
    MonitorError,
    Traffic,
    _for_evidently,
    accuracy_p_value,
    decide,
    file_traffic,
    monitor,
    parse_time,
    prune,
    quality,
    read_feedback,
    read_log,
    run_drift,
)
from my_ml_project.monitoring.result import SCHEMA_VERSION, MonitorResult, json_schema
from my_ml_project.monitoring.retrain import (
    RetrainError,
    check_versioned,
    csv_lines,
    retrain,
    validate,
    write_rejects,
)
from my_ml_project.serving.predlog import PredictionLog, count_rows

PARAMS = MonitorParams(min_rows=20, min_labelled_rows=10)


@pytest.fixture
def mixed(mixed_project: Params) -> Schema:
    """The mixed project (numbers, a yes/no flag, text categories, gaps), prepared."""
    prepare(mixed_project)
    return load_frame("train")[1]


def _answers(n: int, label: str = "no") -> list[dict]:
    return [{"label": label, "probabilities": {"no": 0.9, "yes": 0.1}}] * n


def log_rows(folder: Path, frame: pd.DataFrame, schema: Schema, requests: int = 4) -> list[str]:
    """Log ``frame``'s rows as the service does, in ``requests`` requests; their ids."""
    log = PredictionLog(folder, categorical=schema.spec.categorical, flush_s=60)
    rows = frame[schema.features].astype(object).where(frame[schema.features].notna(), None)
    records = rows.to_dict(orient="records")
    ids = []
    for i, chunk in enumerate([records[i::requests] for i in range(requests)]):
        ids.append(f"{i:032x}")
        log.record(ids[-1], "1", chunk, _answers(len(chunk)))
    log.describe("1", {"classes": schema.classes, "test_metrics": {"accuracy": 0.9, "f1": 0.9}})
    log.close()
    return ids


def _old_day(folder: Path, schema: Schema, day: str, rows: int) -> None:
    """A day file as the writer leaves it, for days before today."""
    (folder / f"date={day}").mkdir(parents=True)
    row = {name: None for name in schema.features}
    lines = [
        json.dumps(
            {
                "ts": f"{day}T12:00:00.000000+00:00",
                "request_id": f"old{day}",
                "row": i,
                "model_version": "0",
                "inputs": row,
                **_answers(1)[0],
            }
        )
        for i in range(rows)
    ]
    (folder / f"date={day}" / "predictions-1.jsonl").write_text("\n".join(lines) + "\n")


def test_log_reads_back_typed_and_windowed(mixed: Schema, tmp_path: Path) -> None:
    test, _ = load_frame("test")
    log_rows(tmp_path, test, mixed)
    _old_day(tmp_path, mixed, "2020-01-01", 7)
    frame = read_log(tmp_path, mixed)
    assert len(frame) == len(test) + 7
    assert set(mixed.features) <= set(frame.columns)
    assert frame["ts"].is_monotonic_increasing
    assert frame[PREDICTION].eq("no").all()
    today = read_log(tmp_path, mixed, since=datetime.now(UTC) - timedelta(hours=1))
    assert len(today) == len(test)
    assert len(read_log(tmp_path, mixed, last=5)) == 5
    # Categories come back as the text the model knows, numbers as numbers.
    plans = set(today["plan"].dropna())
    assert plans <= set(mixed.categories["plan"])
    assert pd.api.types.is_float_dtype(today["tenure"])


def test_a_line_cut_short_is_skipped_with_a_warning(mixed: Schema, tmp_path: Path, capsys) -> None:
    test, _ = load_frame("test")
    log_rows(tmp_path, test, mixed)
    path = next(tmp_path.glob("date=*/predictions-*.jsonl"))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"ts": "2030-01-01T00:00:00+00:00", "request_id": "cut')
    assert len(read_log(tmp_path, mixed)) == len(test)
    assert "skipped 1 unreadable line" in capsys.readouterr().out


def test_no_log_is_a_clear_error(mixed: Schema, tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match="no prediction log"):
        read_log(tmp_path / "absent", mixed)


def test_feedback_joins_by_request_and_row_the_latest_winning(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, flush_s=60)
    log.feedback("a" * 32, ["no", "yes"])
    log.flush()
    log.feedback("a" * 32, ["yes", "yes"])  # a correction
    log.close()
    feedback = read_feedback(tmp_path).sort_values("row")
    assert feedback["target"].tolist() == ["yes", "yes"]
    assert feedback["row"].tolist() == [0, 1]


def test_count_rows_finds_a_request_in_the_log(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, flush_s=60)
    log.record("b" * 32, "1", [{"x": 1}] * 3, _answers(3))
    log.close()
    assert count_rows(tmp_path, "b" * 32) == 3
    assert count_rows(tmp_path, "c" * 32) == 0


def _drift(*drifted: str, prediction: bool = False, watched: tuple[str, ...] = ()) -> dict:
    columns = {
        f"f{i}": {"drifted": f"f{i}" in drifted, "important": f"f{i}" not in watched}
        for i in range(10)
    }
    return columns | {PREDICTION: {"drifted": prediction}}


FEATURES = [f"f{i}" for i in range(10)]
NO_QUALITY: dict = {"versions": {}}
WATCHED = ("f0", "f1", "f2", "f3", "f4")  # weight 0: reported, never raising drift alone


@pytest.mark.parametrize(
    ("rows", "drift", "qual", "status"),
    [
        (19, _drift("f0", "f1", "f2"), NO_QUALITY, "insufficient_data"),
        (20, _drift(), NO_QUALITY, "healthy"),
        (20, _drift("f0"), NO_QUALITY, "drift"),  # one important feature is enough
        (20, _drift("f0", "f1", watched=WATCHED), NO_QUALITY, "healthy"),
        (20, _drift("f0", "f1", "f2", watched=WATCHED), NO_QUALITY, "drift"),  # drift_share
        (20, _drift(prediction=True), NO_QUALITY, "drift"),
        (
            20,
            _drift("f0", "f1", "f2"),
            {
                "versions": {
                    "1": {
                        "degraded": True,
                        "rows": 30,
                        "accuracy": 0.5,
                        "accuracy_floor": 0.85,
                        "p_value": 1e-6,
                        "test_accuracy": 0.9,
                    }
                }
            },
            "degraded",
        ),
    ],
)
def test_gate_decisions(rows: int, drift: dict, qual: dict, status: str) -> None:
    assert decide(rows, drift, FEATURES, qual, PARAMS)[0] == status


def test_drifted_features_are_named() -> None:
    status, reasons, drifted = decide(50, _drift("f3", "f5", "f7"), FEATURES, NO_QUALITY, PARAMS)
    assert (status, drifted) == ("drift", ["f3", "f5", "f7"])
    assert reasons[0].startswith("3 important feature(s) drift: f3, f5, f7")


def test_the_plan_spends_the_false_alarm_rate_by_weight() -> None:
    kinds = {"tenure": True, "plan": False, "country": False, "auto_renew": False}
    equal = plan(kinds, PARAMS, PREDICTION)
    assert {c.method for c in equal.values()} == {"ks", "chi2_homogeneity"}
    assert equal["tenure"].method == "ks"
    assert sum(c.threshold for c in equal.values()) == pytest.approx(PARAMS.drift_alpha)
    weighted = plan(kinds, PARAMS.model_copy(update={"importance": {"tenure": 3, "plan": 1}}))
    assert weighted["tenure"].threshold == pytest.approx(3 * weighted["plan"].threshold)
    assert weighted["tenure"].threshold + weighted["plan"].threshold == pytest.approx(
        PARAMS.drift_alpha
    )
    assert not weighted["country"].important  # unlisted: watched, at alpha / columns
    assert weighted["country"].threshold == pytest.approx(PARAMS.drift_alpha / 4)
    with pytest.raises(ValueError, match=r"monitor\.importance names tenur, not features"):
        plan(kinds, PARAMS.model_copy(update={"importance": {"tenur": 1}}))


def test_importance_needs_a_positive_weight() -> None:
    with pytest.raises(ValidationError, match="at least one a positive weight"):
        MonitorParams(importance={"tenure": 0})


def test_a_negligible_shift_on_a_huge_window_is_not_drift() -> None:
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"x": rng.normal(0, 1, 20_000)})
    moved = pd.DataFrame({"x": rng.normal(0.05, 1, 200_000)})  # 0.05 SD: real, negligible
    plans = plan({"x": True}, PARAMS)
    verdict = judge(reference, moved, plans)["x"]
    assert verdict["score"] < 1e-6  # K-S sees it...
    assert verdict["effect"] < PARAMS.min_effect_numeric
    assert verdict["drifted"] is False  # ...but it moved less than min_effect_numeric
    far = judge(reference, pd.DataFrame({"x": rng.normal(0.5, 1, 1_000)}), plans)["x"]
    assert far["drifted"] is True


def test_chi_square_homogeneity_counts_the_reference_s_noise_too() -> None:
    rng = np.random.default_rng(1)
    levels, shares = ["a", "b", "c", "d"], [0.5, 0.3, 0.15, 0.05]
    reference = pd.Series(rng.choice(levels, 400, p=shares))
    p_values = [
        chi2_homogeneity(reference, pd.Series(rng.choice(levels, 20_000, p=shares)))
        for _ in range(40)
    ]
    # The same population: p-values spread over (0, 1), not piled near 0 as a goodness-of-fit
    # test against the reference's 400-row shares does.
    assert np.mean(np.array(p_values) < 0.05) < 0.2
    shifted = pd.Series(rng.choice(levels, 1_000, p=[0.7, 0.2, 0.07, 0.03]))
    assert chi2_homogeneity(reference, shifted) < 1e-4
    assert chi2_homogeneity(reference, pd.Series(["a"] * 50)) < 1e-6
    assert chi2_homogeneity(pd.Series(["a"] * 10), pd.Series(["a"] * 10)) == 1.0


def _traffic(target: list[str], prediction: list[str], version: str = "1") -> Traffic:
    frame = pd.DataFrame({"target": target, PREDICTION: prediction, "model_version": version})
    return Traffic(frame, "test")


def test_quality_is_a_binomial_test_against_the_version_s_test_accuracy() -> None:
    cards = {"1": {"test_metrics": {"accuracy": 0.95, "f1": 0.95}}}
    good = quality(_traffic(["a", "b"] * 10, ["a", "b"] * 10), cards, PARAMS)["versions"]["1"]
    assert (good["accuracy"], good["judged"], good["degraded"]) == (1.0, True, False)
    bad = quality(_traffic(["a", "b"] * 10, ["a", "a"] * 10), cards, PARAMS)["versions"]["1"]
    assert bad["degraded"] is True
    assert bad["p_value"] == pytest.approx(accuracy_p_value(10, 20, 0.90))
    # 27 of 30 right (0.90, under the 0.90 floor only by chance): not enough evidence.
    near = _traffic(["a"] * 30, ["a"] * 27 + ["b"] * 3)
    entry = quality(near, cards, PARAMS.model_copy(update={"min_labelled_rows": 30}))
    assert entry["versions"]["1"]["degraded"] is False
    few = quality(_traffic(["a"] * 5, ["b"] * 5), cards, PARAMS)["versions"]["1"]
    assert few["judged"] is False
    assert "min_labelled_rows" in few["why_not_judged"]
    unknown = quality(_traffic(["a"] * 20, ["b"] * 20, "7"), cards, PARAMS)["versions"]["7"]
    assert (unknown["judged"], unknown["degraded"]) == (False, False)


def test_accuracy_p_value_is_the_binomial_tail() -> None:
    assert accuracy_p_value(30, 30, 0.9) == pytest.approx(1.0)
    assert accuracy_p_value(0, 10, 0.5) == pytest.approx(0.5**10)
    assert accuracy_p_value(5, 10, 0.0) == 1.0


def test_file_without_the_features_names_them(mixed: Schema, tmp_path: Path) -> None:
    path = tmp_path / "current.csv"
    pd.DataFrame({"tenure": [1.0]}).to_csv(path, index=False)
    with pytest.raises(MonitorError, match="lacks 3 of the 4 feature columns: plan, country"):
        file_traffic(path, mixed)
    pd.DataFrame(columns=mixed.features).to_csv(path, index=False)
    with pytest.raises(MonitorError, match="has no rows"):
        file_traffic(path, mixed)


def test_a_column_empty_in_every_row_is_one_clear_error(mixed: Schema, tmp_path: Path) -> None:
    test, _ = load_frame("test")
    path = tmp_path / "current.csv"
    test[mixed.features].assign(tenure=None).to_csv(path, index=False)
    with pytest.raises(MonitorError, match="tenure: no values in the window"):
        monitor(PARAMS, tmp_path / "no-log", path)


@pytest.mark.slow
def test_the_report_s_p_values_are_the_direct_tests(mixed: Schema) -> None:
    """What benchmarks/monitor_verdicts.py measures (Evidently's tests called on the frames) is
    what a report computes."""
    frames = [load_frame(split)[0] for split in ("train", "test")]
    reference, current = (
        _for_evidently(f.assign(**{PREDICTION: f[mixed.target]}), mixed) for f in frames
    )
    _, verdicts = run_drift(current, reference, mixed, PARAMS)
    kinds = {name: mixed.spec.kinds[name] == NUMERIC for name in mixed.features}
    direct = judge(reference, current, plan(kinds, PARAMS, PREDICTION))
    assert set(direct) == set(verdicts) == {*mixed.features, PREDICTION}
    for name, entry in verdicts.items():
        assert direct[name]["score"] == pytest.approx(entry["score"], rel=1e-9), name
        assert direct[name]["drifted"] == entry["drifted"]


def test_old_report_folders_are_pruned(tmp_path: Path) -> None:
    stamps = [f"2026010{d}T000000000000Z" for d in range(1, 6)]
    for name in [*stamps, "latest", "notes"]:
        (tmp_path / name).mkdir()
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == stamps[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*stamps[3:], "latest", "notes"])


def test_since_must_be_a_time() -> None:
    assert parse_time("2026-01-31T12:00").tzinfo == UTC
    with pytest.raises(MonitorError, match="ISO time"):
        parse_time("yesterday")


@pytest.mark.slow
def test_monitor_finds_the_shifted_feature_and_new_categories(
    mixed: Schema, tmp_path: Path
) -> None:
    test, _ = load_frame("test")
    log_rows(tmp_path / "calm", test, mixed)
    result, folder = monitor(
        load_params().monitor.model_copy(update={"min_rows": 20}), tmp_path / "calm"
    )
    assert result.status in ("healthy", "drift")
    assert set(result.drift.features) == set(mixed.features)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert len(page) > 100_000
    # The gate's own verdict is the first thing in the page's body, before Evidently's app.
    body = page[page.index(">", page.index("<body")) + 1 :]
    assert body.startswith('<section id="monitor-verdict"')
    assert f"Monitoring gate: {result.status.upper()}" in body[:2000]
    written = folder.parent / "latest" / "result.json"
    assert json.loads(written.read_text())["schema_version"] == SCHEMA_VERSION
    assert MonitorResult.read(written).to_json() == result.to_json()
    assert written.stat().st_mode & 0o777 == 0o666 & ~current_umask()

    moved = test.assign(tenure=test["tenure"] + 1000, plan="Platinum")
    log_rows(tmp_path / "moved", moved, mixed)
    result, _ = monitor(PARAMS, tmp_path / "moved")
    assert result.status == "drift"
    assert {"tenure", "plan"} <= set(result.drift.drifted_features)
    assert result.data_summary["new_categories"]["plan"] == ["Platinum"]
    assert result.data_summary["out_of_range"]["tenure"]["rows"] > 0
    entry = result.drift.features["tenure"]
    assert (entry["method"], entry["important"]) == ("ks", True)
    assert entry["score"] <= entry["threshold"]
    assert entry["effect"] >= entry["min_effect"]
    assert result.drift.features["plan"]["method"] == "chi2_homogeneity"


SHAPES = [
    ((), "csv"),
    (("label",), "parquet"),
    (("churned",), "csv"),
    (("label", "churned"), "csv"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "suffix"), SHAPES)
def test_current_takes_any_file_with_the_feature_columns(
    mixed: Schema, tmp_path: Path, extra: tuple[str, ...], suffix: str
) -> None:
    test, _ = load_frame("test")
    frame = test[mixed.features].assign(label=test["churned"], churned=test["churned"])
    frame = frame[[*mixed.features, *extra]].assign(note="ignored")
    path = tmp_path / f"current.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
    result, folder = monitor(PARAMS, tmp_path / "no-log", path)
    assert result.status in ("healthy", "drift"), result.reasons
    assert result.rows.current == len(test)
    assert set(result.drift.features) == set(mixed.features)
    assert (result.drift.prediction is not None) == ("label" in extra)
    assert result.rows.labelled == (len(test) if {"label", "churned"} <= set(extra) else 0)
    assert (folder / "quality.html").exists() == (result.rows.labelled > 0)
    if result.rows.labelled:  # no log beside the file: nothing to judge the accuracy against
        entry = result.quality["versions"]["file"]
        assert entry["judged"] is False
        assert "describes no model version" in entry["why_not_judged"]


@pytest.mark.slow
def test_current_with_labels_is_judged_against_the_served_model(
    mixed: Schema, tmp_path: Path
) -> None:
    test, _ = load_frame("test")
    log_rows(tmp_path / "log", test.iloc[:5], mixed)  # describes v1: test accuracy 0.9
    wrong = test["churned"].map({"yes": "no", "no": "yes"})
    half = np.arange(len(test)) % 2 == 0
    frame = test[mixed.features].assign(
        label=np.where(half, wrong, test["churned"]), churned=test["churned"]
    )
    path = tmp_path / "current.csv"
    frame.to_csv(path, index=False)
    slices = SliceParams(columns=["plan", "tenure"], bins=2)
    result, folder = monitor(PARAMS, tmp_path / "log", path, slices=slices)
    assert result.status == "degraded", result.reasons
    entry = result.quality["versions"]["1"]
    assert entry["accuracy"] == pytest.approx(0.5, abs=0.02)
    assert entry["p_value"] < PARAMS.quality_alpha
    # Quality per slice: every labelled row in one slice of each column, the tenure bins cut at
    # the train split's median.
    for column in ("plan", "tenure"):
        assert sum(e["rows"] for e in entry["slices"][column].values()) == entry["rows"]
    median = float(load_frame("train")[0]["tenure"].median())
    assert f"tenure in [-inf, {median:.6g})" in entry["slices"]["tenure"]
    assert MonitorResult.read(folder / "result.json").quality == result.quality
    right = frame.assign(label=test["churned"])
    right.to_csv(path, index=False)
    result, _ = monitor(PARAMS, tmp_path / "log", path)
    assert result.quality["versions"]["1"]["degraded"] is False


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_result_json_has_a_versioned_schema_and_refuses_others(tmp_path: Path) -> None:
    schema = json_schema()
    assert schema["properties"]["schema_version"]["default"] == SCHEMA_VERSION
    assert {"status", "reasons", "rows", "source"} <= set(schema["required"])
    stale = tmp_path / "result.json"
    stale.write_text(json.dumps({"status": "drift", "schema_version": 0}))
    with pytest.raises(ValueError, match="schema_version 0"):
        MonitorResult.read(stale)
    stale.write_text(json.dumps({"status": "fine", "schema_version": SCHEMA_VERSION}))
    with pytest.raises(ValueError, match="not a monitoring result"):
        MonitorResult.read(stale)


def test_retrain_writes_rows_in_the_raw_file_s_column_order() -> None:
    rows = pd.DataFrame({"b": [1.5, None], "a": [True, False], "label": ["x", "y"]})
    assert csv_lines(rows, ["label", "a", "unused", "b"]) == "x,true,,1.5\ny,false,,\n"


def test_retrain_refuses_a_raw_file_that_is_not_its_dvc_version(project_dir: Path) -> None:
    raw = Path(load_params().data.raw_path)
    md5 = file_md5(raw)
    raw.with_name(raw.name + ".dvc").write_text(f"outs:\n- md5: {md5}\n  path: {raw.name}\n")
    subprocess.run(["git", "init", "-q"], check=True)
    with pytest.raises(RetrainError, match="not in DVC's cache"):
        check_versioned(raw)
    raw.write_text(raw.read_text() + "1,2,3,4,negative\n")
    with pytest.raises(RetrainError, match="differs from the version"):
        check_versioned(raw)


def _labelled(schema: Schema, n: int = 4) -> pd.DataFrame:
    """Labelled production rows as retrain joins them: request, row, features, the true class."""
    test, _ = load_frame("test")
    rows = test.head(n).reset_index(drop=True)
    return rows.assign(request_id=[f"r{i}" for i in range(n)], row=0)


def test_feedback_is_checked_against_the_model_s_schema(prepared_project: Path) -> None:
    schema = Schema.load(Path("data/processed/schema.json"))
    rows = _labelled(schema)
    feature = schema.features[0]
    rows.loc[0, schema.target] = "maybe"  # a class the model never had
    rows.loc[1, feature] = float("inf")
    rows.loc[2, feature] = None  # a gap, and this project refuses gaps (data.missing: error)
    valid, rejected = validate(rows, schema, "error", allow_new_classes=False)
    assert valid["request_id"].tolist() == ["r3"]
    reasons = dict(zip(rejected["request_id"], rejected["reason"], strict=True))
    assert reasons["r0"].startswith("class 'maybe' is not one of the model's")
    assert reasons["r1"] == f"{feature} is not finite"
    assert reasons["r2"] == f"no value for {feature} (data.missing: error)"
    valid, _ = validate(rows, schema, "impute", allow_new_classes=True)
    assert valid["request_id"].tolist() == ["r0", "r2", "r3"]  # on purpose: a new class
    written = write_rejects(rejected, Path("rejects"))
    assert pd.read_csv(written).columns[:3].tolist() == ["request_id", "row", "reason"]


def test_rows_from_a_log_without_a_feature_are_rejected_not_appended(
    prepared_project: Path,
) -> None:
    schema = Schema.load(Path("data/processed/schema.json"))
    rows = _labelled(schema).drop(columns=schema.features[-1])
    valid, rejected = validate(rows, schema, "impute", allow_new_classes=False)
    assert valid.empty
    assert set(rejected["reason"]) == {f"feature {schema.features[-1]!r} is not in the log"}


@pytest.mark.slow
def test_retrain_adds_each_labelled_row_once(
    prepared_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same feedback sent again after a retrain (a client's retry) adds nothing."""
    schema = Schema.load(Path("data/processed/schema.json"))
    raw = Path(load_params().data.raw_path)
    # retrain runs `dvc` and `git`: this environment's dvc first, a committer of this repository.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in (
        ["git", "init", "-q"], ["git", "config", "user.name", "Test"],
        ["git", "config", "user.email", "test@example.com"], ["dvc", "init", "-q"],
        ["dvc", "add", "-q", str(raw)], ["git", "add", "-A"], ["git", "commit", "-qm", "data"],
    ):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    test, _ = load_frame("test")
    logs = Path("logs")
    ids = log_rows(logs, test.head(8), schema, requests=2)
    log = PredictionLog(logs, categorical=schema.spec.categorical, flush_s=60)
    for request_id in ids:
        log.feedback(request_id, [schema.classes[0]] * 4)
    log.close()
    lines = len(raw.read_text().splitlines())
    first = retrain(logs, dry_run=False, commit=True)
    assert first["rows"] == 8
    assert len(raw.read_text().splitlines()) == lines + 8
    log = PredictionLog(logs, categorical=schema.spec.categorical, flush_s=60)
    log.feedback(ids[0], [schema.classes[0]] * 4)  # sent again
    log.close()
    again = retrain(logs, dry_run=False, commit=True)
    assert (again["rows"], again["repeated"]) == (0, 4)
    assert len(raw.read_text().splitlines()) == lines + 8


def test_quality_per_slice_with_labels() -> None:
    """Wrong on every pro row, right on every basic one: the slices say so, and the result
    still reads back with this schema version (the slices are an added key)."""
    frame = pd.DataFrame(
        {
            "plan": ["basic", "pro"] * 20,
            "target": ["yes"] * 40,
            PREDICTION: ["yes", "no"] * 20,
            "model_version": ["3"] * 40,
        }
    )
    slicer = Slicer(["plan"], {"plan": "categorical"})
    entry = quality(Traffic(frame, "file"), {}, PARAMS, slicer)["versions"]["3"]
    assert entry["slices"] == {
        "plan": {
            "plan=basic": {"rows": 20, "accuracy": 1.0},
            "plan=pro": {"rows": 20, "accuracy": 0.0},
        }
    }
    assert "slices" not in quality(Traffic(frame, "file"), {}, PARAMS)["versions"]["3"]
