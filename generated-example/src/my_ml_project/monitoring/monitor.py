"""Monitoring: served traffic against the training data (Evidently), with a gate CI acts on.

``python -m <package>.monitoring.monitor [--last N | --since TIME] [--current FILE] [--log-dir DIR]
[--no-fail]`` (``nox -s monitor``), from the project root. Reads the ``monitor`` section of
params.yaml, the prepared train split (the reference, as DVC tracks it) and either the prediction
log (``PREDICTION_LOG_DIR``, default ``logs/predictions``, see :mod:`.predlog`) with the feedback
sent to ``/feedback``, or any CSV/Parquet file of feature rows (``--current``; a ``label`` column
is taken as the predictions, the target column as ground truth).

What it checks:
- data drift of every feature and of the predicted classes (against the train split's classes),
  by Evidently's tests (the test per column kind and size, thresholds from params.yaml);
- a data summary: missing values, categories the train split never had, numbers outside its range;
- with ground truth, accuracy and macro F1 of each served model version on its labelled rows,
  against that version's test metrics (``models/<version>.json`` in the log);
- with shadow scoring, how often champion and challenger agree and, with ground truth, the
  accuracy of each on the same rows.

Writes ``reports/monitoring/<UTC time>/`` (``report.html``: drift and data summary;
``quality.html``: classification on the labelled rows; ``result.json``) and the same files in
``reports/monitoring/latest/``; ``result.json`` is a :class:`~.result.MonitorResult` (versioned
schema: ``python -m <package>.monitoring.result`` prints it). Exit code: 0 healthy, 3 drift,
4 degraded (quality fell), 5 insufficient_data, 2 bad input (the message says what to fix);
``--no-fail``: 0 whatever the status, for dashboards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.config import MonitorParams, ProjectError, cli_errors, load_params
from ..core.features import BOOLEAN, CATEGORICAL, NUMERIC, ModelInputError, typed
from ..core.fileio import atomic_write_text
from ..core.paths import LOGGED_MODELS_DIR, REPORTS_DIR
from ..data.prepare import DataError, Schema, load_frame
from ..serving.predlog import FEEDBACK, PREDICTIONS, log_folder
from .result import DriftSummary, MonitorResult, RowCounts, Status

PREDICTION = "prediction"  # the predicted class, as a monitored column
EXIT_CODES = {"healthy": 0, "drift": 3, "degraded": 4, "insufficient_data": 5}
SHOWN = 10  # features printed in the terminal table


class MonitorError(ProjectError):
    """The monitor cannot read what it needs (exit code 2): the message says what to fix."""


@dataclass
class Traffic:
    """The rows to judge: features (typed), the prediction, and what the log adds."""

    frame: pd.DataFrame  # features + PREDICTION (+ "target", "model_version", "shadow_*", "ts")
    source: str
    window: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> pd.DataFrame:
        """The rows with ground truth and a prediction."""
        if "target" not in self.frame:
            return self.frame.iloc[:0]
        return self.frame[self.frame["target"].notna() & self.frame[PREDICTION].notna()]


# ---------------------------------------------------------------------------- reading the log


def _arrow_schema(schema: Schema) -> Any:
    """The prediction record, typed by the features' kinds (the log writes categories as text)."""
    import pyarrow as pa

    types = {NUMERIC: pa.float64(), BOOLEAN: pa.bool_(), CATEGORICAL: pa.string()}
    inputs = pa.struct([(name, types[schema.spec.kinds[name]]) for name in schema.features])
    answer = [("model_version", pa.string()), ("label", pa.string())]
    return pa.schema(
        [
            ("ts", pa.string()),
            ("request_id", pa.string()),
            ("row", pa.int64()),
            *answer,
            ("inputs", inputs),
            ("shadow", pa.struct(answer)),
        ]
    )


def _read_files(paths: list[Path], arrow_schema: Any) -> pd.DataFrame:
    """Prediction files in one read (each call costs ~5 ms of set-up, and the log holds a file
    per day and worker); a file whose lines do not all parse is read alone, bad lines skipped."""
    import pyarrow as pa
    import pyarrow.json as pj

    options = pj.ParseOptions(explicit_schema=arrow_schema, unexpected_field_behavior="ignore")
    chunks = [path.read_bytes() for path in paths]
    data = b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chunks if c)
    if not data.strip():
        return pd.DataFrame()
    try:
        table = pj.read_json(pa.BufferReader(data), parse_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if len(paths) == 1:
            table = _read_lenient(paths[0], options)
        else:
            return pd.concat([_read_files([p], arrow_schema) for p in paths], ignore_index=True)
    return table.flatten().to_pandas()


def _read_lenient(path: Path, options: Any) -> Any:
    """Line by line, for a file the fast reader refused: bad lines are skipped, and counted."""
    import pyarrow as pa
    import pyarrow.json as pj

    good, bad = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pj.read_json(pa.BufferReader(line), parse_options=options)
            good.append(line)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            bad.append(number)
    if not good:
        raise MonitorError(f"{path} is not a prediction log (no line parses): move it away")
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    print(f"warning: {path}: skipped {len(bad)} unreadable line(s) ({shown})")
    return pj.read_json(pa.BufferReader(b"\n".join(good)), parse_options=options)


def _partitions(folder: Path, kind: str) -> list[tuple[str, list[Path]]]:
    """(day, files) of ``kind``, oldest day first."""
    days = []
    for partition in sorted(folder.glob("date=*")):
        files = sorted(partition.glob(f"{kind}-*.jsonl"))
        if files:
            days.append((partition.name.removeprefix("date="), files))
    return days


def read_log(
    folder: Path, schema: Schema, since: datetime | None = None, last: int | None = None
) -> pd.DataFrame:
    """The logged predictions since ``since`` (UTC), or the ``last`` N, oldest first.

    Day partitions outside the window are not read. Columns: ts, request_id, row,
    model_version, the features, PREDICTION, shadow_model_version, shadow_label.
    """
    days = _partitions(folder, PREDICTIONS)
    if not days:
        raise MonitorError(
            f"no prediction log in {folder}: serve the model (`nox -s serve`) and send it "
            "traffic, set PREDICTION_LOG_DIR, or judge a file with --current FILE"
        )
    arrow_schema = _arrow_schema(schema)
    if since is not None:
        days = [(day, files) for day, files in days if day >= since.date().isoformat()]
    if last is None:
        paths = [path for _, files in days for path in files]
        frame = _read_files(paths, arrow_schema) if paths else pd.DataFrame()
    else:  # the newest days, until they hold `last` rows
        frames, rows = [], 0
        for _, files in reversed(days):
            frames.append(_read_files(files, arrow_schema))
            rows += len(frames[-1])
            if rows >= last:
                break
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frame.empty:
        return _empty(schema)
    frame.columns = [c.removeprefix("inputs.").replace("shadow.", "shadow_") for c in frame]
    frame = frame.rename(columns={"label": PREDICTION}).sort_values("ts", kind="stable")
    if since is not None:
        frame = frame[frame["ts"] >= since.isoformat(timespec="microseconds")]
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True)


def _empty(schema: Schema) -> pd.DataFrame:
    columns = ["ts", "request_id", "row", "model_version", *schema.features, PREDICTION]
    return pd.DataFrame(columns=columns)


def read_feedback(
    folder: Path, since_day: str | None = None, keep_ts: bool = False
) -> pd.DataFrame:
    """The true classes sent to /feedback, one row per (request_id, row); the latest wins
    (``keep_ts``: with the time it arrived)."""
    records = []
    for day, files in _partitions(folder, FEEDBACK):
        if since_day is not None and day < since_day:
            continue
        for path in files:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    records.append((item["ts"], item["request_id"], list(item["labels"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash; the others stand
    rows = [(ts, rid, i, str(y)) for ts, rid, labels in records for i, y in enumerate(labels)]
    frame = pd.DataFrame(rows, columns=["ts", "request_id", "row", "target"])
    frame = frame.sort_values("ts", kind="stable").drop_duplicates(
        ["request_id", "row"], keep="last"
    )
    return frame if keep_ts else frame.drop(columns="ts")


def log_traffic(
    folder: Path, schema: Schema, params: MonitorParams, since: datetime | None, last: int | None
) -> Traffic:
    """The window of the log, joined with its feedback."""
    if since is None and last is None:
        since = datetime.now(UTC) - timedelta(days=params.window_days)
    frame = read_log(folder, schema, since, last)
    if len(frame):
        first_day = str(frame["ts"].iloc[0])[:10]
        feedback = read_feedback(folder, first_day)
        frame = frame.merge(feedback, on=["request_id", "row"], how="left")
    window = {
        "since": since.isoformat() if since else None,
        "last": last,
        "first": str(frame["ts"].iloc[0]) if len(frame) else None,
        "until": str(frame["ts"].iloc[-1]) if len(frame) else None,
    }
    return Traffic(frame, f"prediction log {folder}", window)


def file_traffic(path: Path, schema: Schema) -> Traffic:
    """Rows of a CSV or Parquet file: its feature columns, ``label`` as the prediction, the
    target column as ground truth (both optional)."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype={schema.target: str, "label": str})
    except FileNotFoundError:
        raise MonitorError(f"{path} not found") from None
    except Exception as exc:  # pandas/pyarrow parse errors have many types
        raise MonitorError(f"{path} cannot be read as CSV or Parquet: {exc}") from None
    absent = [name for name in schema.features if name not in frame.columns]
    if absent:
        raise MonitorError(
            f"{path} lacks {len(absent)} of the {len(schema.features)} feature columns: "
            f"{', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''}. "
            "Fix: give a file with the train split's feature columns (data/processed/schema.json)"
        )
    out = frame[schema.features].copy()
    out[PREDICTION] = frame["label"].astype(str) if "label" in frame else None
    if schema.target in frame:
        out["target"] = frame[schema.target].where(frame[schema.target].notna(), None)
    return Traffic(out.reset_index(drop=True), f"file {path}", {"file": str(path)})


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; UTC unless it says otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MonitorError(
            f"--since {text!r}: expected an ISO time, e.g. 2026-01-31T12:00"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# ------------------------------------------------------------------------------- the checks


def model_cards(folder: Path | None) -> dict[str, dict[str, Any]]:
    """``models/<version>.json`` of the log: each served version's classes and test metrics."""
    cards: dict[str, dict[str, Any]] = {}
    if folder is None:
        return cards
    for path in sorted((folder / LOGGED_MODELS_DIR).glob("*.json")):
        try:
            cards[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            print(f"warning: {path} is not valid JSON: that version's test metrics are unknown")
    return cards


def _for_evidently(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Features in their kind's type, booleans as the labels true/false (categories to
    Evidently), and the predicted class; wrong values raise ModelInputError."""
    out = typed(frame, schema.spec.kinds)
    for name in schema.features:
        if schema.spec.kinds[name] == BOOLEAN:
            out[name] = out[name].map({True: "true", False: "false"}).astype(object)
    out[PREDICTION] = frame[PREDICTION].astype(object).where(frame[PREDICTION].notna(), None)
    return out


def data_summary(current: pd.DataFrame, reference: pd.DataFrame, schema: Schema) -> dict:
    """Missing values, unseen categories and out-of-range numbers, per feature (only those
    with any)."""
    missing, unseen, out_of_range = {}, {}, {}
    for name in schema.features:
        column = current[name]
        if gaps := int(column.isna().sum()):
            missing[name] = gaps
        kind = schema.spec.kinds[name]
        if kind == CATEGORICAL:
            known = set(reference[name].dropna().astype(str))
            new = sorted(set(column.dropna().astype(str)) - known)
            if new:
                unseen[name] = new[:20]
        elif kind == NUMERIC:
            low, high = reference[name].min(), reference[name].max()
            if outside := int(((column < low) | (column > high)).sum()):
                out_of_range[name] = {"rows": outside, "train_min": low, "train_max": high}
    return {"missing": missing, "new_categories": unseen, "out_of_range": out_of_range}


def run_drift(
    current: pd.DataFrame, reference: pd.DataFrame, schema: Schema, params: MonitorParams
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Evidently's drift and data summary presets; (snapshot, per-column results)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    numeric = [n for n in schema.features if schema.spec.kinds[n] == NUMERIC]
    columns = [*schema.features, PREDICTION]
    definition = DataDefinition(
        numerical_columns=numeric, categorical_columns=[c for c in columns if c not in numeric]
    )
    unknown = sorted(set(params.feature_thresholds) - set(schema.features))
    if unknown:
        raise MonitorError(
            f"monitor.feature_thresholds names {', '.join(unknown)}, not features of the model: "
            "fix params.yaml"
        )
    report = Report(
        [
            DataDriftPreset(
                columns=columns,
                drift_share=params.drift_share,
                threshold=params.drift_threshold,
                per_column_threshold=dict(params.feature_thresholds) or None,
            ),
            DataSummaryPreset(columns=columns),
        ],
        include_tests=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's divide-by-zero notes on empty categories
        snapshot = report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    return snapshot, _drift_results(snapshot.dict())


def _drift_results(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each column's drift score, test, threshold and Evidently's verdict, from a snapshot."""
    columns: dict[str, dict[str, Any]] = {}
    for metric in result["metrics"]:
        config = metric["config"]
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            columns[config["column"]] = {
                "score": float(metric["value"]),
                "method": config["method"],
                "threshold": float(config["threshold"]),
            }
    for test in result["tests"]:
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type") == "evidently:metric_v2:ValueDrift":
            columns[params["column"]]["drifted"] = test["status"] == "FAIL"
    return columns


def quality(traffic: Traffic, cards: dict[str, dict], params: MonitorParams) -> dict[str, Any]:
    """Accuracy and macro F1 of each served version on its labelled rows, against its test
    metrics; ``degraded`` when a version with enough rows fell by more than allowed."""
    from sklearn.metrics import accuracy_score, f1_score

    labelled = traffic.labelled
    versions: dict[str, Any] = {}
    groups = (
        labelled.groupby("model_version") if "model_version" in labelled else [("file", labelled)]
    )
    for version, rows in groups:
        y, pred = rows["target"].astype(str), rows[PREDICTION].astype(str)
        entry: dict[str, Any] = {"rows": len(rows)}
        entry["accuracy"] = float(accuracy_score(y, pred))
        entry["f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        test = (cards.get(str(version)) or {}).get("test_metrics") or {}
        entry |= {f"test_{k}": test[k] for k in ("accuracy", "f1") if k in test}
        judged = len(rows) >= params.min_labelled_rows and "test_accuracy" in entry
        entry["judged"] = judged
        entry["degraded"] = judged and (
            entry["test_accuracy"] - entry["accuracy"] > params.max_accuracy_drop
            or entry.get("test_f1", 0.0) - entry["f1"] > params.max_f1_drop
        )
        if not judged:
            entry["why_not_judged"] = (
                f"{len(rows)} labelled rows < monitor.min_labelled_rows {params.min_labelled_rows}"
                if len(rows) < params.min_labelled_rows
                else f"no test metrics for v{version} (models/{version}.json in the log)"
            )
        versions[str(version)] = entry
    return {"labelled_rows": len(labelled), "versions": versions}


def shadow_comparison(traffic: Traffic) -> dict[str, Any] | None:
    """Champion/challenger agreement on the rows both scored; with ground truth, each one's
    accuracy on the same labelled rows."""
    frame = traffic.frame
    if "shadow_label" not in frame or frame["shadow_label"].isna().all():
        return None
    both = frame[frame["shadow_label"].notna()]
    result: dict[str, Any] = {
        "rows": len(both),
        "served_versions": sorted(both["model_version"].astype(str).unique().tolist()),
        "shadow_versions": sorted(both["shadow_model_version"].astype(str).unique().tolist()),
        "agreement": float((both[PREDICTION] == both["shadow_label"]).mean()),
    }
    if "target" in both and both["target"].notna().any():
        labelled = both[both["target"].notna()]
        result["labelled_rows"] = len(labelled)
        result["champion_accuracy"] = float((labelled[PREDICTION] == labelled["target"]).mean())
        result["challenger_accuracy"] = float(
            (labelled["shadow_label"] == labelled["target"]).mean()
        )
    return result


def decide(
    rows: int, drift: dict[str, dict[str, Any]], features: Sequence[str], qual: dict[str, Any],
    params: MonitorParams,
) -> tuple[Status, list[str], list[str]]:  # fmt: skip
    """(status, reasons, drifted features): insufficient_data before degraded before drift."""
    if rows < params.min_rows:
        return "insufficient_data", [f"{rows} rows < monitor.min_rows {params.min_rows}"], []
    drifted = [name for name in features if drift.get(name, {}).get("drifted")]
    degraded = [v for v, entry in qual["versions"].items() if entry["degraded"]]
    reasons = []
    for version in degraded:
        e = qual["versions"][version]
        test_f1 = e.get("test_f1", float("nan"))
        reasons.append(
            f"v{version} on {e['rows']} labelled rows: accuracy {e['accuracy']:.3f} (test "
            f"{e['test_accuracy']:.3f}), F1 {e['f1']:.3f} (test {test_f1:.3f})"
        )
    share = len(drifted) / len(features) if features else 0.0
    if share >= params.drift_share:
        reasons.append(
            f"{len(drifted)} of {len(features)} features drift (share {share:.2f} >= "
            f"monitor.drift_share {params.drift_share:g})"
        )
    if drift.get(PREDICTION, {}).get("drifted"):
        reasons.append("the predicted classes drift from the train split's classes")
    if degraded:
        return "degraded", reasons, drifted
    return ("drift" if reasons else "healthy"), reasons, drifted


# ------------------------------------------------------------------------------------ outputs


def classification_report(traffic: Traffic, classes: list[str]) -> Any | None:
    """Evidently's classification preset on the labelled rows (None when there are none)."""
    from evidently import (
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Report,
    )
    from evidently.presets import ClassificationPreset

    labelled = traffic.labelled[["target", PREDICTION]].astype(str)
    if labelled.empty:
        return None
    names = {"target": "target", "prediction_labels": PREDICTION}
    # Two classes: the second is the positive one, as in the evaluate stage's ROC AUC.
    spec: Any = (
        BinaryClassification(**names, pos_label=classes[1])
        if len(classes) == 2
        else MulticlassClassification(**names, labels={c: c for c in classes})
    )
    definition = DataDefinition(categorical_columns=["target", PREDICTION], classification=[spec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Report([ClassificationPreset()]).run(
            Dataset.from_pandas(labelled, data_definition=definition), None
        )


def write_outputs(
    result: MonitorResult, snapshots: dict[str, Any], root: Path = REPORTS_DIR
) -> Path:
    """``<root>/<UTC time>/`` with the HTML reports and result.json; ``latest/`` replaced."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder = root / stamp
    folder.mkdir(parents=True, exist_ok=True)
    for name, snapshot in snapshots.items():
        if snapshot is not None:
            snapshot.save_html(str(folder / name))
            result.reports[name.removesuffix(".html")] = name
    atomic_write_text(folder / "result.json", result.to_json())
    latest, staging = root / "latest", root / f".latest-{stamp}"
    shutil.copytree(folder, staging)
    old = root / f".old-{stamp}"
    if latest.exists():
        latest.rename(old)
    staging.rename(latest)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def print_summary(result: MonitorResult, folder: Path) -> None:
    rows, versions = result.rows, result.model_versions
    seen = ", ".join(f"v{v}: {n}" for v, n in versions.items()) or "-"
    print(
        f"monitoring {result.source}: {rows.current} rows (models {seen}); "
        f"reference: train split, {rows.reference} rows"
    )
    print(f"status: {result.status.upper()}")
    for reason in result.reasons:
        print(f"  - {reason}")
    features = result.drift.features
    if features:
        order = sorted(features.items(), key=lambda kv: (not kv[1].get("drifted"), kv[0]))
        print(f"  {'column':<28} {'test':<22} {'score':>9} {'threshold':>9}  drift")
        for name, entry in order[:SHOWN]:
            flag = "yes" if entry.get("drifted") else "no"
            print(
                f"  {name[:28]:<28} {entry['method'][:22]:<22} {entry['score']:>9.4f} "
                f"{entry['threshold']:>9.4f}  {flag}"
            )
        if len(order) > SHOWN:
            print(f"  ... {len(order) - SHOWN} more in result.json")
    for version, entry in result.quality.get("versions", {}).items():
        print(
            f"  quality v{version}: {entry['rows']} labelled rows, accuracy {entry['accuracy']:.3f}"
            f" (test {entry.get('test_accuracy', float('nan')):.3f}), F1 {entry['f1']:.3f}"
        )
    if shadow := result.shadow:
        line = f"  shadow: champion and challenger agree on {shadow['agreement']:.1%}"
        line += f" of {shadow['rows']} rows"
        if "challenger_accuracy" in shadow:
            line += (
                f"; accuracy champion {shadow['champion_accuracy']:.3f}, "
                f"challenger {shadow['challenger_accuracy']:.3f}"
            )
        print(line)
    print(f"report: {folder}/ (and {folder.parent / 'latest'}/)")


def monitor(
    params: MonitorParams,
    log_dir: Path | None,
    current_file: Path | None = None,
    since: datetime | None = None,
    last: int | None = None,
) -> tuple[MonitorResult, Path]:
    """Read, check, write the reports; (result, report folder)."""
    try:
        reference_raw, schema = load_frame("train")
    except DataError as exc:
        raise MonitorError(
            f"the reference (train split) cannot be read: {exc}; or fetch it from the DVC "
            "remote: `nox -s pull -- prepare`"
        ) from None
    if current_file is not None:
        traffic = file_traffic(current_file, schema)
    else:
        assert log_dir is not None
        traffic = log_traffic(log_dir, schema, params, since, last)
    cards = model_cards(log_dir if current_file is None else None)
    frame = traffic.frame
    versions = (
        frame["model_version"].astype(str).value_counts().sort_index().to_dict()
        if "model_version" in frame
        else {}
    )
    snapshots: dict[str, Any] = {}
    qual = quality(traffic, cards, params)
    drift: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    if len(frame) >= params.min_rows:
        reference = reference_raw.assign(**{PREDICTION: reference_raw[schema.target].astype(str)})
        try:
            current_typed = _for_evidently(frame, schema)
            reference_typed = _for_evidently(reference, schema)
        except ModelInputError as exc:
            raise MonitorError(f"{traffic.source}: {exc}") from None
        if current_typed[PREDICTION].isna().all():  # a file without predictions
            current_typed = current_typed.drop(columns=PREDICTION)
            reference_typed = reference_typed.drop(columns=PREDICTION)
        snapshots["report.html"], drift = run_drift(current_typed, reference_typed, schema, params)
        summary = data_summary(current_typed, reference_typed, schema)
        snapshots["quality.html"] = classification_report(traffic, schema.classes)
    status, reasons, drifted = decide(len(frame), drift, schema.features, qual, params)
    if status == "insufficient_data" and len(frame) == 0:
        reasons = [f"no rows in the window ({_window_text(traffic.window)})"]
    result = MonitorResult(
        status=status,
        reasons=reasons,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=traffic.source,
        window=traffic.window,
        rows=RowCounts(len(frame), len(reference_raw), len(traffic.labelled)),
        model_versions=versions,
        thresholds=params.model_dump(),
        drift=DriftSummary(
            features={n: drift[n] for n in schema.features if n in drift},
            drifted_features=drifted,
            share=len(drifted) / len(schema.features) if drift else None,
            prediction=drift.get(PREDICTION),
        ),
        data_summary=summary,
        quality=qual,
        shadow=shadow_comparison(traffic),
    )
    folder = write_outputs(result, snapshots)
    return result, folder


def _window_text(window: dict[str, Any]) -> str:
    if window.get("last"):
        return f"the last {window['last']} rows"
    return f"since {window.get('since')}"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monitor", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="N", help="the newest N logged rows")
    which.add_argument("--since", metavar="TIME", help="logged rows since TIME (ISO, UTC)")
    which.add_argument("--current", type=Path, metavar="FILE", help="a CSV/Parquet file instead")
    parser.add_argument("--log-dir", type=Path, help="the prediction log (PREDICTION_LOG_DIR)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 whatever the status")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error("--last must be a positive number of rows")
    log_dir = log_folder(args.log_dir)
    since = parse_time(args.since) if args.since else None
    params = load_params().monitor
    result, folder = monitor(params, log_dir, args.current, since, args.last)
    print_summary(result, folder)
    return 0 if args.no_fail else EXIT_CODES[result.status]


if __name__ == "__main__":
    raise SystemExit(main())
