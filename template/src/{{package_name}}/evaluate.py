"""DVC stage ``evaluate``: test metrics, plots, and the promotion gate of the registered model.

Run it as ``python -m <package>.evaluate`` from the project root, after ``train``. Reads the
``evaluate``, ``data`` and ``mlflow`` sections of params.yaml and ``models/run.json``.

The gate, in order:
1. quality: the model must beat the majority-class baseline on ``evaluate.metric`` and reach
   ``evaluate.min_score`` (when > 0); else the decision is ``failed``, exit code 3;
2. promotion: if another version holds the ``champion`` alias, it is scored on the same test
   split; the candidate becomes champion only if its score >= champion's + ``promotion_margin``,
   else it gets the alias ``challenger`` (``not_promoted``, exit code 0: a valid experiment that
   is not better must not break ``dvc repro``). A champion trained on other features or classes
   (the dataset changed) cannot be scored on this split: the candidate is promoted.
Outputs: metrics/evaluate.json, metrics/gate.json, plots/confusion.csv, plots/curve.csv; the test
metrics are logged to the training run (``test_*``) and the version is tagged with the decision.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from . import registry
from .config import ProjectError, cli_errors, get_param, load_params
from .data import PROCESSED_DIR, DataError, load_split
from .model import TabularClassifier, load_model

MODEL_PATH = Path("models/model.pt")
RUN_INFO_PATH = Path("models/run.json")
METRICS_PATH = Path("metrics/evaluate.json")
GATE_PATH = Path("metrics/gate.json")
CONFUSION_PATH = Path("plots/confusion.csv")
CURVE_PATH = Path("plots/curve.csv")
METRICS = ("accuracy", "f1", "roc_auc")
GATE_FAILED_EXIT = 3
FIX_TRAIN = f"run the train stage first (`dvc repro train` or `python -m {__package__}.train`)"


class GateFailedError(ProjectError):
    """The model is not good enough to be a candidate (exit code 3)."""

    exit_code = GATE_FAILED_EXIT


@dataclass
class Decision:
    """What the gate decided; written to metrics/gate.json."""

    decision: str  # promoted | not_promoted | failed
    reason: str
    metric: str
    model_name: str
    candidate_version: str
    candidate_score: float
    baseline_score: float
    min_score: float
    margin: float
    champion_version: str | None = None
    champion_score: float | None = None


def predict_proba(model: TabularClassifier, x: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] in float64, rows summing to 1 (sklearn checks that)."""
    model.eval()
    with torch.no_grad():
        proba = model.predict_proba(torch.from_numpy(x)).cpu().numpy().astype(np.float64)
    return proba / proba.sum(axis=1, keepdims=True)


def compute_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, macro f1, log_loss and roc_auc (binary, or macro one-vs-rest) when defined."""
    labels = list(range(proba.shape[1]))
    pred = proba.argmax(axis=1)
    result = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "log_loss": float(skm.log_loss(y, proba, labels=labels)),
    }
    # Undefined when the test split lacks a class: then roc_auc is left out.
    if len(np.unique(y)) == len(labels):
        if len(labels) == 2:
            result["roc_auc"] = float(skm.roc_auc_score(y, proba[:, 1]))
        else:
            result["roc_auc"] = float(
                skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels)
            )
    return result


def class_priors(n_classes: int, processed_dir: str | Path, y_test: np.ndarray) -> np.ndarray:
    """Class frequencies of the train split (what a model could know), else of the test split."""
    try:
        _, y, _ = load_split("train", processed_dir)
    except DataError:
        y = y_test
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return counts / counts.sum()


def baseline_metrics(y: np.ndarray, priors: np.ndarray) -> dict[str, float]:
    """Metrics of a model that ignores its input: it predicts the majority class, with p = priors.

    The majority class gets a sliver more probability, so argmax picks it even on ties.
    """
    proba = np.tile(priors, (len(y), 1))
    proba[:, int(priors.argmax())] += 1e-9
    return compute_metrics(y, proba / proba.sum(axis=1, keepdims=True))


def score(metric: str, metrics: dict[str, float], what: str) -> float:
    if metric not in metrics:
        raise ProjectError(
            f"evaluate.metric {metric} cannot be computed for the {what}: the test split lacks "
            "a class. Use accuracy or f1 in params.yaml, or a larger split.test_size"
        )
    return metrics[metric]


def roc_points(y: np.ndarray, proba: np.ndarray) -> list[tuple[float, float]]:
    """ROC curve (fpr, tpr): of the second class if binary, else micro-averaged over classes."""
    n_classes = proba.shape[1]
    if len(np.unique(y)) < 2:
        return []
    if n_classes == 2:
        fpr, tpr, _ = skm.roc_curve(y, proba[:, 1])
    else:
        onehot = np.eye(n_classes, dtype=np.int64)[y]
        fpr, tpr, _ = skm.roc_curve(onehot.ravel(), proba.ravel())
    return [(float(a), float(b)) for a, b in zip(fpr, tpr, strict=True)]


def write_outputs(
    metrics: dict[str, float], y: np.ndarray, proba: np.ndarray, classes: list[str]
) -> None:
    """metrics/evaluate.json, plots/confusion.csv (label names), plots/curve.csv."""
    METRICS_PATH.parent.mkdir(parents=True, exist_ok=True)
    METRICS_PATH.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    CONFUSION_PATH.parent.mkdir(parents=True, exist_ok=True)
    with CONFUSION_PATH.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (classes[a], classes[p]) for a, p in zip(y, proba.argmax(axis=1), strict=True)
        )
    with CURVE_PATH.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y"])
        writer.writerows(roc_points(y, proba))


def read_run_info(path: Path = RUN_INFO_PATH) -> dict[str, Any]:
    """run_id, model_name and model_version of the training run."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError(f"{path} not found: {FIX_TRAIN}") from None
    except (OSError, ValueError) as exc:
        raise ProjectError(f"{path} is not valid JSON ({exc}): {FIX_TRAIN}") from None
    if not isinstance(info, dict):
        raise ProjectError(f"{path} is not a JSON object: {FIX_TRAIN}")
    missing = [k for k in ("run_id", "model_name", "model_version") if not info.get(k)]
    if missing:
        raise ProjectError(f"{path} lacks {', '.join(missing)}: {FIX_TRAIN}")
    return info


def gate_params(params: dict[str, Any]) -> tuple[str, float, float]:
    """evaluate.metric, evaluate.min_score, evaluate.promotion_margin, validated."""
    metric = str(get_param(params, "evaluate.metric"))
    if metric not in METRICS:
        raise ProjectError(
            f"evaluate.metric in params.yaml is {metric!r}: use one of {', '.join(METRICS)}"
        )
    values = []
    for key in ("evaluate.min_score", "evaluate.promotion_margin"):
        value = get_param(params, key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ProjectError(f"{key} in params.yaml must be a number, not {value!r}")
        values.append(float(value))
    if not 0 <= values[0] <= 1:
        raise ProjectError(f"evaluate.min_score must be in [0, 1] (0 disables it), not {values[0]}")
    return metric, values[0], values[1]


def same_inputs(champion: Any, model: TabularClassifier) -> bool:
    """Whether the champion reads the same features and predicts the same classes."""
    return list(getattr(champion, "feature_names", [])) == list(model.feature_names) and list(
        getattr(champion, "class_names", [])
    ) == list(model.class_names)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def decide(decision: Decision, model: TabularClassifier, x: np.ndarray, y: np.ndarray) -> Decision:
    """Fill in the decision: quality gate first, then the comparison with the champion."""
    d, metric = decision, decision.metric
    v = f"v{d.candidate_version}"
    if d.candidate_score <= d.baseline_score:
        d.decision = "failed"
        d.reason = (
            f"candidate {v} {metric} {_fmt(d.candidate_score)} "
            f"<= baseline {_fmt(d.baseline_score)} (always predicting the majority class)"
        )
        return d
    if d.min_score > 0 and d.candidate_score < d.min_score:
        d.decision = "failed"
        d.reason = (
            f"candidate {v} {metric} {_fmt(d.candidate_score)} "
            f"< evaluate.min_score {_fmt(d.min_score)}"
        )
        return d
    champion = registry.get_alias_version(d.model_name, registry.CHAMPION)
    d.champion_version = champion
    d.decision = "promoted"
    if champion is None:
        d.reason = f"candidate {v} {metric}={_fmt(d.candidate_score)}; there was no champion yet"
        return d
    if champion == d.candidate_version:
        d.champion_score = d.candidate_score
        d.reason = f"candidate {v} already is the champion ({metric}={_fmt(d.candidate_score)})"
        return d
    try:
        champion_model = registry.load_version(d.model_name, champion)
    except Exception as exc:  # any load failure: the champion could not be served either
        d.reason = f"champion v{champion} cannot be loaded ({type(exc).__name__}: {exc})"
        return d
    if not same_inputs(champion_model, model):
        d.reason = (
            f"champion v{champion} was trained on other features or classes (the dataset "
            "changed), so it cannot be scored on this test split"
        )
        return d
    d.champion_score = score(
        metric, compute_metrics(y, predict_proba(champion_model, x)), "champion"
    )
    comparison = (
        f"candidate {v} {metric}={_fmt(d.candidate_score)} "
        f"{{}} champion v{champion} {metric}={_fmt(d.champion_score)} + margin {_fmt(d.margin)}"
    )
    if d.candidate_score >= d.champion_score + d.margin:
        d.reason = comparison.format(">=")
    else:
        d.decision = "not_promoted"
        d.reason = comparison.format("<")
    return d


def apply_decision(d: Decision) -> str:
    """Move the aliases, tag the version; return the one-paragraph summary."""
    name, version = d.model_name, d.candidate_version
    is_champion = registry.get_alias_version(name, registry.CHAMPION) == version
    if d.decision == "promoted":
        registry.set_alias(name, registry.CHAMPION, version)
        if registry.get_alias_version(name, registry.CHALLENGER) == version:
            registry.delete_alias(name, registry.CHALLENGER)
        before = d.champion_version
        was = f" (was v{before})" if before not in (None, version) else ""
        after = f"'{name}' v{version} is the champion{was}."
    elif is_champion:
        # Taking the served model away is a person's decision, not a side effect of new params.
        after = (
            f"'{name}' v{version} keeps its alias 'champion': move or delete it by hand "
            "if it must not be served."
        )
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
        kept = "" if d.champion_version is None else f" v{d.champion_version} stays champion;"
        after = f"'{name}'{kept} v{version} stays registered with alias 'challenger'."
    if d.decision == "failed":
        after += (
            " Fix: improve the model (model/train in params.yaml) or the data, or lower "
            "evaluate.min_score if the floor is too strict."
        )
    registry.set_version_tags(
        name, version, {"gate": d.decision, "gate_metric": d.metric, "gate_reason": d.reason}
    )
    label = {"promoted": "PROMOTED", "not_promoted": "NOT PROMOTED", "failed": "GATE FAILED"}
    return f"{label[d.decision]}: {d.reason}. {after}"


def log_test_metrics(run_id: str, metrics: dict[str, float], decision: str) -> None:
    """Add the test metrics (``test_*``) and the decision to the training run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    now = int(time.time() * 1000)
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(f"test_{k}", v, now, 0) for k, v in metrics.items()],
            tags=[RunTag("gate", decision)],
        )
    except MlflowException as exc:
        raise ProjectError(
            f"cannot log to the training run {run_id} ({exc.message}): train and evaluate must "
            f"use the same MLflow store; re-run training (`dvc repro --force train`)"
        ) from None


def check_version(model_name: str, version: str, uri: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version(model_name, version)
    except MlflowException:
        raise ProjectError(
            f"model '{model_name}' version {version} (from {RUN_INFO_PATH}) is not in the MLflow "
            f"store {uri}: the store changed since training; re-run `dvc repro --force train`"
        ) from None


def evaluate(params: dict[str, Any]) -> Decision:
    """Score models/model.pt on the test split, write the outputs, and run the gate."""
    metric, min_score, margin = gate_params(params)
    info = read_run_info()
    processed_dir = PROCESSED_DIR
    x, y, schema = load_split("test", processed_dir)
    model = load_model(MODEL_PATH)
    if list(model.feature_names) != schema.features or list(model.class_names) != schema.classes:
        raise ProjectError(
            f"{MODEL_PATH} was trained on other features or classes than {processed_dir}: "
            "re-run training (`dvc repro`)"
        )
    uri = registry.configure(params)
    name, version = str(info["model_name"]), str(info["model_version"])
    check_version(name, version, uri)

    proba = predict_proba(model, x)
    metrics = compute_metrics(y, proba)
    baseline = baseline_metrics(y, class_priors(len(schema.classes), processed_dir, y))
    candidate_score = score(metric, metrics, "model")
    report = {**metrics, **{f"baseline_{k}": v for k, v in baseline.items()}}
    report = {k: round(v, 6) for k, v in report.items()}
    write_outputs({**report, "n_test": len(y)}, y, proba, schema.classes)

    decision = Decision(
        decision="",
        reason="",
        metric=metric,
        model_name=name,
        candidate_version=version,
        candidate_score=candidate_score,
        baseline_score=baseline[metric],
        min_score=min_score,
        margin=margin,
    )
    decide(decision, model, x, y)
    log_test_metrics(str(info["run_id"]), report, decision.decision)
    summary = apply_decision(decision)
    GATE_PATH.write_text(json.dumps(asdict(decision), indent=2) + "\n", encoding="utf-8")
    if decision.decision == "failed":
        raise GateFailedError(summary)
    print(summary)
    return decision


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``evaluate`` stage."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    args = parser.parse_args(argv)
    evaluate(load_params(args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
