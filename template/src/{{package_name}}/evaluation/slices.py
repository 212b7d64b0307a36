"""Slices of the rows, each slice's metrics, and the gate's slice rule.

A slice is the rows sharing one value of one column (``evaluate.slices.columns``): a categorical
or boolean column by its values (``plan=pro``), a numeric one by quantile bins
(``mean_radius in [13.1, 15.2)``). Bin edges are computed on the train split only, so the
candidate and the champion, judged on the same holdout, are sliced identically, and the
monitor's slices of served traffic are the same ones.

Metrics per slice are fairlearn's ``MetricFrame`` (one per column: each column is sliced on its
own, not crossed with the others, so slices keep enough rows to mean something).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, count
from sklearn import metrics as skm

from ..core.config import ProjectError, SliceParams
from ..core.features import NUMERIC
from ..core.paths import PROCESSED_DIR, SCHEMA_FILE
from ..data.prepare import Schema

MISSING = "is missing"


@dataclass(frozen=True)
class Slicer:
    """How rows are sliced: the columns, and each numeric column's inner bin edges (train split)."""

    columns: list[str]
    kinds: dict[str, str]
    edges: dict[str, list[float]] = field(default_factory=dict)

    def labels(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Each row's slice in each column (``column=value`` or ``column in [a, b)``)."""
        absent = [c for c in self.columns if c not in frame.columns]
        if absent:
            raise ProjectError(f"cannot slice: the rows lack the column(s) {', '.join(absent)}")
        out = {}
        for column in self.columns:
            if self.kinds[column] == NUMERIC:
                values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
                out[column] = bin_names(column, self.edges[column], values)
            else:
                out[column] = [
                    f"{column} {MISSING}" if _blank(v) else f"{column}={v}" for v in frame[column]
                ]
        return pd.DataFrame(out, index=frame.index)

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "edges": self.edges}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _num(value: float) -> str:
    return f"{value:.6g}"


def bin_names(column: str, edges: list[float], values: np.ndarray) -> list[str]:
    """``column in [a, b)`` of each value (the outer bins open-ended), ``column is missing``."""
    bounds = [-math.inf, *edges, math.inf]
    names = [f"{column} in [{_num(lo)}, {_num(hi)})" for lo, hi in itertools.pairwise(bounds)]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return [
        f"{column} {MISSING}" if math.isnan(v) else names[i]
        for v, i in zip(values, index, strict=True)
    ]


def quantile_edges(values: pd.Series, bins: int) -> list[float]:
    """The inner edges of ``bins`` quantile bins of ``values`` (gaps ignored; ties merged, so a
    column of few distinct values gets fewer bins)."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    numbers = numbers[~np.isnan(numbers)]
    if not len(numbers):
        return []
    inner = np.quantile(numbers, np.linspace(0, 1, bins + 1)[1:-1])
    # An edge at the minimum would leave the first bin empty.
    return [float(e) for e in np.unique(inner) if e > numbers.min()]


def make_slicer(cfg: SliceParams, schema: Schema, train: pd.DataFrame) -> Slicer:
    """The slicer of ``evaluate.slices``, bins fitted on ``train`` (the train split's frame).

    A column that is not a feature is a ProjectError naming it."""
    unknown = [c for c in cfg.columns if c not in schema.features]
    if unknown:
        raise ProjectError(
            f"params.yaml evaluate.slices.columns: unknown column {', '.join(unknown)}: not a "
            f"feature of {PROCESSED_DIR / SCHEMA_FILE} ({', '.join(schema.features[:8])}"
            f"{', ...' if len(schema.features) > 8 else ''})"
        )
    kinds = {c: (schema.kinds or {}).get(c, NUMERIC) for c in cfg.columns}
    edges = {c: quantile_edges(train[c], cfg.bins) for c in cfg.columns if kinds[c] == NUMERIC}
    return Slicer(list(cfg.columns), kinds, edges)


def _roc_auc(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of the second class; NaN on a slice holding one class only (undefined there)."""
    if len(np.unique(y_true)) < 2:
        return math.nan
    return float(skm.roc_auc_score(y_true, score))


def metric_frames(labels: pd.DataFrame, y: np.ndarray, proba: np.ndarray) -> dict[str, MetricFrame]:
    """A MetricFrame per slice column: rows, accuracy, macro F1 (and ROC AUC, binary targets)."""
    n_classes = proba.shape[1]
    pred = proba.argmax(axis=1)
    metrics: dict[str, Any] = {
        "rows": count,
        "accuracy": skm.accuracy_score,
        "f1": functools.partial(
            skm.f1_score, average="macro", labels=list(range(n_classes)), zero_division=0
        ),
    }
    params: dict[str, dict[str, Any]] = {}
    if n_classes == 2:
        metrics["roc_auc"] = _roc_auc
        params["roc_auc"] = {"score": proba[:, 1]}
    return {
        column: MetricFrame(
            metrics=metrics,
            y_true=y,
            y_pred=pred,
            sensitive_features=labels[column].to_numpy(),
            sample_params=params,
        )
        for column in labels.columns
    }


def _clean(value: Any) -> Any:
    """JSON's numbers: NaN (a metric undefined on a slice) as null, floats rounded."""
    value = float(value)
    if math.isnan(value):
        return None
    return round(value, 6)


def slice_report(
    slicer: Slicer, labels: pd.DataFrame, y: np.ndarray, proba: np.ndarray, min_rows: int
) -> dict[str, Any]:
    """Per column: each slice's metrics, and the gap (best minus worst slice) of each metric over
    the slices of at least ``min_rows`` rows (``judged``), and over all slices."""
    columns: dict[str, Any] = {}
    for column, frame in metric_frames(labels, y, proba).items():
        table = frame.by_group
        slices = {
            str(name): {k: int(v) if k == "rows" else _clean(v) for k, v in row.items()}
            for name, row in table.iterrows()
        }
        judged = table[table["rows"] >= min_rows]
        names = [c for c in table.columns if c != "rows"]
        entry: dict[str, Any] = {"slices": slices}
        # MetricFrame.difference(): the largest gap between two slices, per metric.
        entry["gap"] = {k: _clean(v) for k, v in frame.difference().items() if k != "rows"}
        if len(judged) >= 1:
            entry["judged_gap"] = {k: _clean(judged[k].max() - judged[k].min()) for k in names}
            worst = judged["accuracy"].idxmin()
            accuracy = _clean(judged.loc[worst, "accuracy"])
            entry["worst"] = {"slice": str(worst), "accuracy": accuracy}
        columns[column] = entry
    return {"min_slice_rows": min_rows, **slicer.to_json(), "by_column": columns}


def mlflow_metrics(report: dict[str, Any]) -> dict[str, float]:
    """A few numbers per column for the MLflow run (slice names are no metric keys): the worst
    judged slice's accuracy and the accuracy gap (``slice_<column>_min_accuracy``,
    ``slice_<column>_accuracy_gap``)."""
    out: dict[str, float] = {}
    for column, entry in report["by_column"].items():
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", column)
        if entry["gap"].get("accuracy") is not None:
            out[f"slice_{key}_accuracy_gap"] = entry["gap"]["accuracy"]
        if "worst" in entry and entry["worst"]["accuracy"] is not None:
            out[f"slice_{key}_min_accuracy"] = entry["worst"]["accuracy"]
    return out


def slice_accuracy(labels: pd.DataFrame, y: Any, pred: Any) -> dict[str, dict[str, Any]]:
    """``{column: {slice: {"rows", "accuracy"}}}`` of predictions ``pred`` of truths ``y``
    (class indices or labels alike), sliced by ``labels``."""
    out: dict[str, dict[str, Any]] = {}
    for column in labels.columns:
        table = MetricFrame(
            metrics={"rows": count, "accuracy": skm.accuracy_score},
            y_true=np.asarray(y),
            y_pred=np.asarray(pred),
            sensitive_features=labels[column].to_numpy(),
        ).by_group
        out[column] = {
            str(name): {"rows": int(row["rows"]), "accuracy": round(float(row["accuracy"]), 6)}
            for name, row in table.iterrows()
        }
    return out


@dataclass
class SliceDrop:
    """A slice on which the candidate's accuracy is below the champion's."""

    slice: str
    rows: int
    candidate: float
    champion: float

    @property
    def drop(self) -> float:
        return self.champion - self.candidate

    def text(self) -> str:
        return (
            f"on slice {self.slice} ({self.rows} holdout rows) accuracy "
            f"{self.candidate:.4f} < champion's {self.champion:.4f} - max_slice_drop"
        )


def slice_drops(
    labels: pd.DataFrame,
    y: np.ndarray,
    candidate_pred: np.ndarray,
    champion_pred: np.ndarray,
    min_rows: int,
    max_drop: float,
) -> list[SliceDrop]:
    """The slices of at least ``min_rows`` rows where the candidate's accuracy is below the
    champion's by more than ``max_drop``, the largest drop first. Both predict the same rows
    (``y``: the true class indices), sliced by ``labels``."""
    drops: list[SliceDrop] = []
    candidate = slice_accuracy(labels, y, candidate_pred)
    champion = slice_accuracy(labels, y, champion_pred)
    for column, slices in candidate.items():
        for name, entry in slices.items():
            a, b = entry["accuracy"], champion[column][name]["accuracy"]
            # The tolerance keeps a drop of exactly max_drop (k/n in floats) from counting.
            if entry["rows"] >= min_rows and b - a > max_drop + 1e-9:
                drops.append(SliceDrop(name, entry["rows"], a, b))
    return sorted(drops, key=lambda d: d.drop, reverse=True)
