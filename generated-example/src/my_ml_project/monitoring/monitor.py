"""Monitoring: served traffic against the training data (Evidently), with a gate CI acts on.

``python -m <package>.monitoring.monitor [--last N | --since TIME] [--current FILE] [--log-dir DIR]
[--no-fail]`` (``nox -s monitor``), from the project root. Reads the ``monitor`` section of
params.yaml, the prepared train split (the reference, as DVC tracks it) and either the prediction
log (``PREDICTION_LOG_DIR``, default ``logs/predictions``, see :mod:`.predlog`) with the feedback
sent to ``/feedback``, or any CSV/Parquet file with the feature columns (``--current``; optional:
``label``, the predictions; the target column, ground truth; ``model_version``).

What it checks:
- data drift of every feature and of the predicted classes (against the train split's classes),
  by the tests and thresholds :mod:`.drift` sets for Evidently (K-S, chi-square homogeneity,
  weighted Bonferroni, a minimum effect);
- a data summary: missing values, categories the train split never had, numbers outside its range;
- with ground truth, accuracy and macro F1 of each served model version on its labelled rows; a
  one-sided binomial test of the accuracy against that version's test accuracy
  (``models/<version>.json`` in the log); and each version's accuracy on each slice of
  ``evaluate.slices`` (the gate's slices, bins from the train split), reported, not judged;
- with shadow scoring, how often champion and challenger agree and, with ground truth, the
  accuracy of each on the same rows.

Writes ``reports/monitoring/<UTC time>/`` (``report.html``: drift and data summary;
``quality.html``: classification on the labelled rows; ``result.json``) and the same files in
``reports/monitoring/latest/`` (the newest ``monitor.keep_reports`` kept); each report opens with
the gate's verdict; ``result.json`` is a :class:`~.result.MonitorResult` (versioned
schema: ``python -m <package>.monitoring.result`` prints it). Exit code: 0 healthy, 3 drift,
4 degraded (quality fell), 5 insufficient_data, 2 bad input (the message says what to fix);
``--no-fail``: 0 whatever the status, for dashboards.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.config import MonitorParams, ProjectError, SliceParams, cli_errors, load_params
from ..core.features import BOOLEAN, CATEGORICAL, NUMERIC, ModelInputError, typed
from ..core.fileio import atomic_write_text, read_parquet
from ..core.paths import LOGGED_MODELS_DIR, REPORTS_DIR
from ..data.prepare import DataError, Schema, load_frame
from ..evaluation import slices as slicing
from ..serving.predlog import FEEDBACK, PREDICTIONS, log_folder
from . import drift
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
    """Rows of a CSV or Parquet file: its feature columns; optional, ``label`` (the
    predictions), the target column (ground truth) and ``model_version``; other columns are
    ignored."""
    text = {name: str for name in (schema.target, "label", "model_version")}
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=text)
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
    if frame.empty:
        raise MonitorError(f"{path} has no rows")
    out = frame[schema.features].copy()
    for name, column in (("label", PREDICTION), (schema.target, "target")):
        values = frame[name] if name in frame else pd.Series(None, index=frame.index)
        out[column] = values.astype(object).where(values.notna(), None)
        out[column] = out[column].map(lambda v: v if v is None else str(v))
    if "model_version" in frame:
        out["model_version"] = frame["model_version"].astype(str)
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
    """Evidently's drift and data summary presets, each column's test and threshold set by
    :func:`.drift.plan`; (snapshot, each column's verdict by :func:`.drift.judge`)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    numeric = [n for n in schema.features if schema.spec.kinds[n] == NUMERIC]
    columns = [c for c in (*schema.features, PREDICTION) if c in current]
    definition = DataDefinition(
        numerical_columns=numeric, categorical_columns=[c for c in columns if c not in numeric]
    )
    try:
        plans = drift.plan(
            {n: n in numeric for n in schema.features},
            params,
            PREDICTION if PREDICTION in columns else None,
        )
    except ValueError as exc:
        raise MonitorError(str(exc)) from None
    empty = [c for c in columns if current[c].isna().all()]
    if empty:
        raise MonitorError(
            f"{', '.join(empty[:10])}: no values in the window (every row empty): the rows "
            "cannot be judged; fix what writes them"
        )
    drift.register_tests()
    report = Report(
        [
            DataDriftPreset(
                columns=columns,
                # The preset's dataset verdict: drift when any column fails its test, as close
                # to the gate's own decision as the preset can say it (the gate's comes first).
                drift_share=min(1.0, 0.5 / len(columns)),
                per_column_method={c: plans[c].method for c in columns},
                per_column_threshold={c: plans[c].threshold for c in columns},
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
    scores = _drift_scores(snapshot.dict())
    used = {c: plans[c] for c in columns}
    return snapshot, drift.judge(reference, current, used, scores)


def _drift_scores(result: dict[str, Any]) -> dict[str, float]:
    """Each column's drift score (a p-value: the methods are ours), from a snapshot."""
    return {
        metric["config"]["column"]: float(metric["value"])
        for metric in result["metrics"]
        if metric["config"].get("type") == "evidently:metric_v2:ValueDrift"
    }


def accuracy_p_value(correct: int, rows: int, floor: float) -> float:
    """One-sided exact binomial test: the chance of ``correct`` or fewer right answers in
    ``rows`` if the accuracy were ``floor``; small means the accuracy is below it."""
    from scipy.stats import binom

    return float(binom.cdf(correct, rows, floor)) if floor > 0 else 1.0


def quality(
    traffic: Traffic,
    cards: dict[str, dict],
    params: MonitorParams,
    slicer: slicing.Slicer | None = None,
) -> dict[str, Any]:
    """Accuracy and macro F1 of each served version on its labelled rows; ``degraded`` when a
    version with enough rows is, by a one-sided binomial test, less accurate than its test
    accuracy minus ``max_accuracy_drop``. With a ``slicer``, each version's accuracy per slice
    (``slices``: column -> slice -> rows, accuracy): shown, never judged (live slices are small,
    and the test above already judges the version)."""
    from sklearn.metrics import f1_score

    labelled = traffic.labelled
    versions: dict[str, Any] = {}
    groups = labelled.groupby("model_version") if "model_version" in labelled else []
    if "model_version" not in labelled and len(labelled):
        groups = [(_only(cards), labelled)]
    for version, rows in groups:
        y, pred = rows["target"].astype(str), rows[PREDICTION].astype(str)
        correct = int((y == pred).sum())
        entry: dict[str, Any] = {"rows": len(rows), "accuracy": correct / len(rows)}
        entry["f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        if slicer is not None and slicer.columns:
            entry["slices"] = slicing.slice_accuracy(slicer.labels(rows), y, pred)
        test = (cards.get(str(version)) or {}).get("test_metrics") or {}
        entry |= {f"test_{k}": test[k] for k in ("accuracy", "f1") if k in test}
        judged = len(rows) >= params.min_labelled_rows and "test_accuracy" in entry
        entry["judged"] = judged
        entry["degraded"] = False
        if judged:
            floor = max(0.0, entry["test_accuracy"] - params.max_accuracy_drop)
            entry["accuracy_floor"] = floor
            entry["p_value"] = accuracy_p_value(correct, len(rows), floor)
            entry["degraded"] = entry["p_value"] < params.quality_alpha
        elif len(rows) < params.min_labelled_rows:
            entry["why_not_judged"] = (
                f"{len(rows)} labelled rows < monitor.min_labelled_rows {params.min_labelled_rows}"
            )
        elif version == "file" and not cards:
            entry["why_not_judged"] = (
                "no test metrics to judge against: the prediction log describes no model "
                "version (models/<version>.json); point --log-dir at the served model's log"
            )
        elif version == "file":
            entry["why_not_judged"] = (
                f"which model made the file's predictions? The prediction log describes "
                f"{len(cards)} versions: add a model_version column"
            )
        else:
            entry["why_not_judged"] = (
                f"no test metrics for v{version} (models/{version}.json in the prediction log)"
            )
        versions[str(version)] = entry
    return {"labelled_rows": len(labelled), "versions": versions}


def _only(cards: dict[str, dict[str, Any]]) -> str:
    """The version a file without a model_version column is judged against: the only one the
    prediction log describes (with several, it cannot tell which made the predictions)."""
    return next(iter(cards)) if len(cards) == 1 else "file"


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
    """(status, reasons, drifted features): insufficient_data before degraded before drift.
    Drift: any important (weighted) feature drifts, at least ``drift_share`` of all features
    do, or the predicted classes do."""
    if rows < params.min_rows:
        return "insufficient_data", [f"{rows} rows < monitor.min_rows {params.min_rows}"], []
    drifted = [name for name in features if drift.get(name, {}).get("drifted")]
    important = [name for name in drifted if drift[name].get("important", True)]
    degraded = [v for v, entry in qual["versions"].items() if entry["degraded"]]
    reasons = []
    for version in degraded:
        e = qual["versions"][version]
        reasons.append(
            f"v{version} on {e['rows']} labelled rows: accuracy {e['accuracy']:.3f} is below "
            f"{e['accuracy_floor']:.3f} (test {e['test_accuracy']:.3f} - "
            f"monitor.max_accuracy_drop; binomial p = {e['p_value']:.2g})"
        )
    if important:
        named = ", ".join(_drift_text(name, drift[name]) for name in important[:5])
        more = f" and {len(important) - 5} more" if len(important) > 5 else ""
        reasons.append(f"{len(important)} important feature(s) drift: {named}{more}")
    share = len(drifted) / len(features) if features else 0.0
    if share >= params.drift_share and len(drifted) > len(important):
        reasons.append(
            f"{len(drifted)} of {len(features)} features drift (share {share:.2f} >= "
            f"monitor.drift_share {params.drift_share:g})"
        )
    if drift.get(PREDICTION, {}).get("drifted"):
        reasons.append("the predicted classes drift from the train split's classes")
    if degraded:
        return "degraded", reasons, drifted
    return ("drift" if reasons else "healthy"), reasons, drifted


def _drift_text(name: str, entry: dict[str, Any]) -> str:
    if "score" not in entry:
        return name
    return f"{name} (p = {entry['score']:.2g}, effect {entry['effect']:.2f})"


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


STAMP = "%Y%m%dT%H%M%S%fZ"  # a report folder's name: its UTC time


def verdict_banner(result: MonitorResult) -> str:
    """The gate's own verdict, as HTML: the first thing each report shows (Evidently's
    per-test verdicts below it know nothing of the weights, effect sizes or quality test)."""
    colour = {"healthy": "#1b7f3b", "insufficient_data": "#8a6d00"}.get(result.status, "#b3261e")
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in result.reasons) or "<li>-</li>"
    return (
        f'<section id="monitor-verdict" style="font-family:sans-serif;margin:16px;padding:12px '
        f'16px;border-left:8px solid {colour};background:#f6f6f6">'
        f'<h1 style="margin:0;color:{colour}">Monitoring gate: {result.status.upper()}</h1>'
        f"<p>{html.escape(result.source)}: {result.rows.current} rows, "
        f"{result.rows.labelled} labelled; reference: {result.rows.reference} rows. This is the "
        "status CI acts on (result.json); the tests below are Evidently's, per column.</p>"
        f"<ul>{reasons}</ul></section>"
    )


def _save_html(snapshot: Any, path: Path, banner: str) -> None:
    snapshot.save_html(str(path))
    text = path.read_text(encoding="utf-8")
    at = text.find(">", text.find("<body")) + 1 if "<body" in text else 0
    atomic_write_text(path, text[:at] + banner + text[at:])


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` report folders (``latest/`` stays); those removed."""
    folders = []
    for path in root.iterdir() if root.is_dir() else []:
        try:
            datetime.strptime(path.name, STAMP)
        except ValueError:
            continue  # latest/, staging folders, anything a person put there
        folders.append(path)
    old = sorted(folders)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def write_outputs(
    result: MonitorResult, snapshots: dict[str, Any], root: Path = REPORTS_DIR, keep: int = 30
) -> Path:
    """``<root>/<UTC time>/`` with the HTML reports and result.json; ``latest/`` replaced; the
    newest ``keep`` folders kept."""
    stamp = datetime.now(UTC).strftime(STAMP)
    folder = root / stamp
    folder.mkdir(parents=True, exist_ok=True)
    for name, snapshot in snapshots.items():
        if snapshot is not None:
            result.reports[name.removesuffix(".html")] = name
    banner = verdict_banner(result)
    for name, snapshot in snapshots.items():
        if snapshot is not None:
            _save_html(snapshot, folder / name, banner)
    atomic_write_text(folder / "result.json", result.to_json())
    latest, staging = root / "latest", root / f".latest-{stamp}"
    shutil.copytree(folder, staging)
    old = root / f".old-{stamp}"
    if latest.exists():
        latest.rename(old)
    staging.rename(latest)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep)
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
        print(f"  {'column':<28} {'test':<17} {'p-value':>9} {'threshold':>9} {'effect':>7}  drift")
        for name, entry in order[:SHOWN]:
            flag = "no"
            if entry.get("drifted"):
                flag = "yes" if entry.get("important", True) else "yes (weight 0)"
            print(
                f"  {name[:28]:<28} {entry['method'][:17]:<17} {entry['score']:>9.2g} "
                f"{entry['threshold']:>9.2g} {entry['effect']:>7.3f}  {flag}"
            )
        if len(order) > SHOWN:
            print(f"  ... {len(order) - SHOWN} more in result.json")
    for version, entry in result.quality.get("versions", {}).items():
        print(
            f"  quality v{version}: {entry['rows']} labelled rows, accuracy {entry['accuracy']:.3f}"
            f" (test {entry.get('test_accuracy', float('nan')):.3f}), F1 {entry['f1']:.3f}"
        )
        sliced = [(n, e) for column in entry.get("slices", {}).values() for n, e in column.items()]
        if sliced:
            name, worst = min(sliced, key=lambda item: item[1]["accuracy"])
            print(
                f"    worst slice: {name}, accuracy {worst['accuracy']:.3f} on {worst['rows']} "
                "rows (every slice in result.json)"
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
    slices: SliceParams | None = None,
) -> tuple[MonitorResult, Path]:
    """Read, check, write the reports; (result, report folder). ``slices``: the gate's
    (``evaluate.slices``), for the quality per slice."""
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
    cards = model_cards(log_dir)  # each served version's test metrics, for --current too
    frame = traffic.frame
    versions = (
        frame["model_version"].astype(str).value_counts().sort_index().to_dict()
        if "model_version" in frame
        else {}
    )
    snapshots: dict[str, Any] = {}
    slicer = slicing.make_slicer(slices, schema, reference_raw) if slices else None
    qual = quality(traffic, cards, params, slicer)
    verdicts: dict[str, dict[str, Any]] = {}
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
        snapshots["report.html"], verdicts = run_drift(
            current_typed, reference_typed, schema, params
        )
        summary = data_summary(current_typed, reference_typed, schema)
        snapshots["quality.html"] = classification_report(traffic, schema.classes)
    status, reasons, drifted = decide(len(frame), verdicts, schema.features, qual, params)
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
            features={n: verdicts[n] for n in schema.features if n in verdicts},
            drifted_features=drifted,
            share=len(drifted) / len(schema.features) if verdicts else None,
            prediction=verdicts.get(PREDICTION),
        ),
        data_summary=summary,
        quality=qual,
        shadow=shadow_comparison(traffic),
    )
    folder = write_outputs(result, snapshots, keep=params.keep_reports)
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
    params = load_params()
    result, folder = monitor(
        params.monitor, log_dir, args.current, since, args.last, params.evaluate.slices
    )
    print_summary(result, folder)
    return 0 if args.no_fail else EXIT_CODES[result.status]


if __name__ == "__main__":
    raise SystemExit(main())
