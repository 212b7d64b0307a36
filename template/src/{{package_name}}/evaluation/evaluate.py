"""DVC stage ``evaluate``: test metrics, plots, and the promotion gate of the registered model.

Run it as ``python -m <package>.evaluation.evaluate [--replace-unloadable-champion]`` from the
project root, after ``train``. Reads the ``evaluate``, ``mlflow`` sections of params.yaml,
``models/run.json``, the prepared splits and their row keys.

The gate, in order:
1. quality: the model must beat the majority-class baseline on ``evaluate.metric`` and reach
   ``evaluate.min_score`` (when > 0); else ``GATE FAILED``, exit code 3. The version is tagged,
   never given an alias.
2. promotion, under the registry's promotion lock: a version that was rolled back is blocked
   (``NOT PROMOTED (blocked)``, exit code 0, until ``nox -s unblock -- VERSION``). Otherwise
   champion and candidate are scored on the holdout: the test rows that neither trained on
   (each run records the keys of its train and val rows), the champion reading its features by
   name. The candidate becomes champion only if its score > champion's + ``promotion_margin``
   (> 0: a tie never promotes), else it gets the alias ``challenger`` (``NOT PROMOTED``, exit
   code 0: a valid experiment that is not better must not break ``dvc repro``).
   A candidate that wins is still refused (``GATE FAILED (slice)``, exit code 3, no alias) when
   its accuracy on any slice of ``evaluate.slices`` with at least ``evaluate.min_slice_rows``
   holdout rows is below the champion's by more than ``evaluate.max_slice_drop`` (slices.py).
3. fail closed: when the champion cannot be judged (artefacts gone, store down, other features
   or classes, no record of its training rows, fewer than ``evaluate.min_holdout`` holdout
   rows), nothing moves: ``GATE UNDECIDED``, exit code 4, the cause and its own fix in one line.
   Replacing an unusable champion on purpose takes ``--replace-unloadable-champion`` (or the
   environment variable ``REPLACE_UNLOADABLE_CHAMPION=1``, which reaches the stage through
   ``dvc repro``).
Outputs: metrics/evaluate.json, metrics/gate.json, metrics/slices.json, plots/confusion.csv,
plots/curve.csv; the test metrics are logged to the training run (``test_*``, slices.json as an
artifact) and the version is tagged with the decision. The attributions of the candidate and the
champion: see :mod:`.attributions`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from ..core.config import EvaluateParams, Params, ProjectError, cli_errors, load_params
from ..core.fileio import atomic_write_text
from ..core.paths import (
    CONFUSION_FILE,
    CURVE_FILE,
    EVAL_METRICS,
    GATE_FILE,
    MODEL_FILE,
    PROCESSED_DIR,
    RUN_FILE,
    SLICES_FILE,
    module,
)
from ..data.prepare import DataError, Schema, load_frame, load_row_keys, load_split, to_arrays
from ..model.network import TabularClassifier, load_model
from ..registry import store as registry
from . import attributions
from . import slices as slicing

GATE_FAILED_EXIT = 3
GATE_UNDECIDED_EXIT = 4
REPLACE_ENV = "REPLACE_UNLOADABLE_CHAMPION"
FIX_TRAIN = (
    f"run the train stage first (`dvc repro train` or `python -m {module('training.train')}`)"
)
LABELS = {
    "promoted": "PROMOTED",
    "not_promoted": "NOT PROMOTED",
    "blocked": "NOT PROMOTED (blocked)",
    "experiment": "NOT PROMOTED (experiment)",
    "uncommitted": "NOT PROMOTED (uncommitted workspace)",
    "failed": "GATE FAILED",
    "slice_regression": "GATE FAILED (slice)",
    "undecided": "GATE UNDECIDED",
}


class GateFailedError(ProjectError):
    """The model is not good enough to be a candidate (exit code 3)."""

    exit_code = GATE_FAILED_EXIT


class GateUndecidedError(ProjectError):
    """The gate cannot compare with the champion, so nothing is promoted (exit code 4)."""

    exit_code = GATE_UNDECIDED_EXIT


class ChampionUnusableError(Exception):
    """The champion cannot be loaded or scored on this test split (the reason is the message)."""


@dataclass
class Decision:
    """What the gate decided; written to metrics/gate.json."""

    decision: (
        str  # promoted | not_promoted | blocked | experiment | uncommitted | failed |
        # slice_regression | undecided
    )
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
    # The comparison with a champion: on the test rows neither model trained on (the holdout).
    min_holdout: int = 0
    holdout_rows: int | None = None
    excluded_rows: int | None = None  # test rows a model trained on, left out of the holdout
    candidate_holdout_score: float | None = None
    fix: str = ""  # an undecided gate's own fix
    # The slice rule (evaluate.slices): the slices where the candidate fell too far behind.
    max_slice_drop: float | None = None
    min_slice_rows: int | None = None
    slice_drops: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TestSplit:
    """The test split as a frame of raw columns (models read it by name), its labels, its row
    keys, and the candidate's class probabilities on it."""

    frame: pd.DataFrame
    y: np.ndarray
    schema: Schema
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    proba: np.ndarray | None = None
    slices: pd.DataFrame | None = None  # each row's slice per column of evaluate.slices

    def subset(self, mask: np.ndarray) -> TestSplit:
        proba = None if self.proba is None else self.proba[mask]
        frame = self.frame[mask].reset_index(drop=True)
        labels = None if self.slices is None else self.slices[mask].reset_index(drop=True)
        return TestSplit(frame, self.y[mask], self.schema, self.keys[mask], proba, labels)


def predict_proba(model: TabularClassifier, frame: pd.DataFrame) -> np.ndarray:
    """Class probabilities [N, C] of the rows of ``frame``, read by the model itself (its
    ``predict_proba_frame``, as any server would); float64, rows summing to 1 (sklearn checks)."""
    model.eval()
    with torch.no_grad():
        proba = model.predict_proba_frame(frame).cpu().numpy().astype(np.float64)
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


def class_priors(n_classes: int, y_test: np.ndarray) -> np.ndarray:
    """Class frequencies of the train split (what a model could know), else of the test split."""
    try:
        _, y, _ = load_split("train")
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
    atomic_write_text(EVAL_METRICS, json.dumps(metrics, indent=2) + "\n")
    pairs = [(classes[a], classes[p]) for a, p in zip(y, proba.argmax(axis=1), strict=True)]
    atomic_write_text(CONFUSION_FILE, _csv(["actual", "predicted"], pairs))
    atomic_write_text(CURVE_FILE, _csv(["x", "y"], roc_points(y, proba)))


def _csv(header: list[str], rows: list[tuple[Any, ...]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def read_run_info(path: Path = RUN_FILE) -> dict[str, Any]:
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


def load_test_split(processed_dir: str | Path = PROCESSED_DIR) -> TestSplit:
    frame, schema = load_frame("test", processed_dir)
    _, y = to_arrays(frame, schema)  # also checks that the split matches its schema
    keys = load_row_keys("test", processed_dir)
    if len(keys) != len(frame):
        raise DataError(
            f"{PROCESSED_DIR}: the row keys do not match the test split: re-run prepare"
        )
    return TestSplit(frame, y, schema, keys)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, short: the gate reports in one line."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def quality_gate(d: Decision) -> bool:
    """Baseline and floor; on failure fill in the decision and return False."""
    v, metric = f"v{d.candidate_version}", d.metric
    if d.candidate_score <= d.baseline_score:
        d.decision = "failed"
        d.reason = (
            f"candidate {v} {metric} {_fmt(d.candidate_score)} "
            f"<= baseline {_fmt(d.baseline_score)} (always predicting the majority class)"
        )
    elif d.min_score > 0 and d.candidate_score < d.min_score:
        d.decision = "failed"
        d.reason = (
            f"candidate {v} {metric} {_fmt(d.candidate_score)} "
            f"< evaluate.min_score {_fmt(d.min_score)}"
        )
    return d.decision != "failed"


def load_champion(name: str, version: str, test: TestSplit) -> TabularClassifier:
    """A registered version, checked to be a model of this project's classes (else
    ChampionUnusableError: no comparison is possible)."""
    what = f"champion v{version}"
    try:
        champion = registry.load_version(name, version)
    except Exception as exc:  # artefacts gone, store down, credentials, incompatible pickle
        raise ChampionUnusableError(f"{what} cannot be loaded ({_one_line(exc)})") from None
    classes = [str(c) for c in getattr(champion, "class_names", None) or []]
    if not classes or not hasattr(champion, "feature_names"):
        raise ChampionUnusableError(f"{what} is not a model of this project")
    if sorted(classes) != sorted(test.schema.classes):
        raise ChampionUnusableError(
            f"{what} predicts other classes ({', '.join(classes)}) than this test split has "
            f"({', '.join(test.schema.classes)})"
        )
    return champion


def champion_predictions(champion: TabularClassifier, version: str, test: TestSplit) -> np.ndarray:
    """The champion's predicted classes of ``test``'s rows, as indices into this split's classes
    (its own class order may differ); ChampionUnusableError when it cannot score them."""
    try:
        proba = predict_proba(champion, test.frame)
    except Exception as exc:
        raise ChampionUnusableError(
            f"champion v{version} cannot be scored on the slices ({_one_line(exc)})"
        ) from None
    index = {label: i for i, label in enumerate(test.schema.classes)}
    return np.array([index[str(champion.class_names[i])] for i in proba.argmax(axis=1)])


def slice_rule(d: Decision, held: TestSplit, champion_pred: np.ndarray) -> None:
    """Refuse a winning candidate that fell behind the champion on a large enough slice."""
    assert held.proba is not None
    assert held.slices is not None
    drops = slicing.slice_drops(
        held.slices,
        held.y,
        held.proba.argmax(axis=1),
        champion_pred,
        d.min_slice_rows or 1,
        d.max_slice_drop or 0.0,
    )
    d.slice_drops = [{**asdict(x), "drop": round(x.drop, 6)} for x in drops]
    if drops:
        more = f" (and {len(drops) - 1} more slices)" if len(drops) > 1 else ""
        d.decision = "slice_regression"
        d.reason = (
            f"candidate v{d.candidate_version} beats champion v{d.champion_version} overall, but "
            f"{drops[0].text()} {_fmt(d.max_slice_drop or 0.0)} (evaluate.max_slice_drop){more}"
        )


def champion_score(
    champion: TabularClassifier, version: str, test: TestSplit, metric: str
) -> float:
    """Score the champion on ``test``, reading its own features by name (ChampionUnusableError
    when its inputs cannot be built from this split)."""
    try:
        proba = predict_proba(champion, test.frame)
    except Exception as exc:  # missing columns (ModelInputError), or a model that fails
        raise ChampionUnusableError(
            f"champion v{version} cannot be scored ({_one_line(exc)})"
        ) from None
    index = {label: i for i, label in enumerate(champion.class_names)}
    y = test.frame[test.schema.target].astype(str).map(index).to_numpy(np.int64)
    return score(metric, compute_metrics(y, proba), "champion")


FIX_UNUSABLE = (
    "restore the champion's artefacts or the store, or replace it on purpose: "
    "`nox -s evaluate -- --replace-unloadable-champion`"
)


def holdout(d: Decision, test: TestSplit, seen: np.ndarray) -> TestSplit | None:
    """The test rows none of ``seen`` (the rows either model trained on); None, with the decision
    made undecided, when fewer than ``evaluate.min_holdout`` are left."""
    mask = ~np.isin(test.keys, seen)
    d.holdout_rows, d.excluded_rows = int(mask.sum()), int((~mask).sum())
    if d.holdout_rows < d.min_holdout:
        d.decision = "undecided"
        d.reason = (
            f"only {d.holdout_rows} of {len(test.keys)} test rows are unseen by both champion "
            f"v{d.champion_version} and candidate v{d.candidate_version} ({d.excluded_rows} were "
            f"in their training data); evaluate.min_holdout is {d.min_holdout}"
        )
        d.fix = (
            "add fresh labelled rows (they land in the test split by their hash), or lower "
            "evaluate.min_holdout"
        )
        return None
    return test.subset(mask)


def compare(
    d: Decision, test: TestSplit, replace_unloadable: bool, seen: np.ndarray | None = None
) -> None:
    """Decide against the current champion (promoted, not_promoted, blocked or undecided), both
    scored on the holdout: the test rows neither trained on. ``seen``: the candidate's rows."""
    v, metric = f"v{d.candidate_version}", d.metric
    champion = registry.get_alias_version(d.model_name, registry.CHAMPION)
    d.champion_version, d.champion_score, d.decision = champion, None, "promoted"
    d.holdout_rows = d.excluded_rows = d.candidate_holdout_score = None
    if champion == d.candidate_version:
        d.champion_score = d.candidate_score
        d.reason = f"candidate {v} already is the champion ({metric}={_fmt(d.candidate_score)})"
        return
    if block := registry.blocked(d.model_name, d.candidate_version):
        d.decision = "blocked"
        d.reason = (
            f"candidate {v} is blocked from promotion ({block}); to allow it again: "
            f"`nox -s unblock -- {d.candidate_version}`"
        )
        return
    if champion is None:
        d.reason = f"candidate {v} {metric}={_fmt(d.candidate_score)}; there was no champion yet"
        return
    try:
        model = load_champion(d.model_name, champion, test)
        champion_seen = registry.seen_rows(d.model_name, champion)
        if champion_seen is None:
            raise ChampionUnusableError(
                f"champion v{champion} cannot be judged on rows it never saw: its run recorded "
                "no training rows (trained by an older release)"
            )
        rows = champion_seen if seen is None else np.concatenate([champion_seen, seen])
        held = holdout(d, test, rows)
        if held is None:
            return
        assert held.proba is not None, "evaluate() scores the candidate first"
        d.candidate_holdout_score = score(metric, compute_metrics(held.y, held.proba), "model")
        d.champion_score = champion_score(model, champion, held, metric)
        champion_pred = None
        if held.slices is not None and len(held.slices.columns):
            champion_pred = champion_predictions(model, champion, held)
    except (ChampionUnusableError, registry.RegistryError) as exc:
        what = (
            str(exc) if isinstance(exc, ChampionUnusableError) else f"champion v{champion}: {exc}"
        )
        if replace_unloadable:
            d.reason = f"{what}; replaced on purpose (--replace-unloadable-champion)"
        else:
            d.decision, d.reason, d.fix = "undecided", what, FIX_UNUSABLE
        return
    comparison = (
        f"on {d.holdout_rows} holdout rows (of {len(test.keys)} test rows; {d.excluded_rows} "
        f"seen in training left out): candidate {v} {metric}={_fmt(d.candidate_holdout_score)} "
        f"{{}} champion v{champion} {metric}={_fmt(d.champion_score)} + margin {_fmt(d.margin)}"
    )
    if d.candidate_holdout_score > d.champion_score + d.margin:
        d.reason = comparison.format(">")
        if champion_pred is not None:
            slice_rule(d, held, champion_pred)
    else:
        d.decision, d.reason = "not_promoted", comparison.format("<=")


def promote(
    d: Decision, test: TestSplit, replace_unloadable: bool, seen: np.ndarray | None = None
) -> str:
    """Compare and move the aliases under the promotion lock; return the summary line.

    Compare-and-set: the champion alias is read again right before it is moved, and the
    comparison is made again if it moved meanwhile (someone moved it by hand, say).
    """
    with registry.promotion_lock(d.model_name):
        for _ in range(3):
            compare(d, test, replace_unloadable, seen)
            if d.decision == "undecided":
                return _undecided(d)
            if d.decision == "slice_regression":
                return slice_summary(d)
            if registry.get_alias_version(d.model_name, registry.CHAMPION) == d.champion_version:
                return apply_decision(d)
        d.decision, d.reason = "undecided", "the champion alias kept moving during evaluation"
        d.fix = "run `nox -s evaluate` again once nobody else moves the alias"
        return _undecided(d)


def _undecided(d: Decision) -> str:
    kept = f"champion v{d.champion_version} unchanged" if d.champion_version else "no alias moved"
    return (
        f"GATE UNDECIDED: {d.reason}; candidate v{d.candidate_version} not promoted, {kept}. "
        f"Fix: {d.fix or FIX_UNUSABLE}"
    )


def apply_decision(d: Decision) -> str:
    """Move the aliases of a valid candidate; return the one-line summary."""
    name, version = d.model_name, d.candidate_version
    if d.decision == "promoted":
        registry.promote(name, version)
        if registry.get_alias_version(name, registry.CHALLENGER) == version:
            registry.delete_alias(name, registry.CHALLENGER)
        before = d.champion_version
        was = f" (was v{before})" if before not in (None, version) else ""
        after = f"'{name}' v{version} is the champion{was}."
    elif d.decision == "blocked":  # no alias either: a rolled-back model is not shadow-scored
        after = f"'{name}' v{d.champion_version} stays champion."
    else:  # not_promoted: a valid model that lost the comparison
        registry.set_alias(name, registry.CHALLENGER, version)
        after = f"'{name}' v{d.champion_version} stays champion; v{version} is the challenger."
    return f"{LABELS[d.decision]}: {d.reason}. {after}"


def slice_summary(d: Decision) -> str:
    """A candidate refused by the slice rule: a tag, never an alias (as a failed one)."""
    return (
        f"{LABELS[d.decision]}: {d.reason}. '{d.model_name}' v{d.champion_version} stays "
        f"champion. Fix: see {SLICES_FILE} and improve the model on that slice, or raise "
        "evaluate.max_slice_drop on purpose."
    )


def failed_summary(d: Decision) -> str:
    """A model below the baseline or floor: a tag, never an alias (the challenger stays)."""
    name, version = d.model_name, d.candidate_version
    after = (
        "Fix: improve the model (model/train in params.yaml) or the data, or lower "
        "evaluate.min_score if the floor is too strict."
    )
    if registry.get_alias_version(name, registry.CHAMPION) == version:
        # Taking the served model away is a person's decision, not a side effect of new params.
        after = f"v{version} keeps its alias 'champion': move it by hand if it must not be served."
    return f"GATE FAILED: {d.reason}. {after}"


# Inputs whose uncommitted changes make a run an experiment (data comes through DVC and retrain).
CODE_AND_CONFIG = ("src", "params.yaml", "dvc.yaml", "pyproject.toml", "uv.lock")
UNCOMMITTED_ENV = "PROMOTE_UNCOMMITTED"


def uncommitted() -> list[str] | None:
    """The code and configuration files that differ from git's HEAD (None outside git)."""
    try:
        status = subprocess.run(
            # Tracked files only (a new module counts once a tracked one imports it): listing
            # untracked ones would read .gitignore, a file no stage declares.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_AND_CONFIG],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({line[3:].strip() for line in status.splitlines() if line.strip()})


def _held_back(d: Decision) -> str | None:
    """Why this run may not move an alias, whatever its scores: a DVC experiment, or a workspace
    with uncommitted code or configuration (None: it may). Such a model stays registered."""
    name, v = d.model_name, f"v{d.candidate_version}"
    if experiment := os.environ.get("DVC_EXP_NAME"):
        d.decision = "experiment"
        d.reason = (
            f"candidate {v} {d.metric}={_fmt(d.candidate_score)} comes from DVC experiment "
            f"'{experiment}': experiments never move champion; to promote it, `dvc exp apply "
            f"{experiment}`, commit, and run `nox -s evaluate`"
        )
        registry.set_version_tags(name, d.candidate_version, {"experiment": experiment})
        return f"{LABELS[d.decision]}: {d.reason}."
    changed = uncommitted()
    if changed and os.environ.get(UNCOMMITTED_ENV, "").strip().lower() not in ("1", "true", "yes"):
        d.decision = "uncommitted"
        d.reason = (
            f"candidate {v} {d.metric}={_fmt(d.candidate_score)} was made from uncommitted "
            f"changes ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}): only a "
            "committed workspace may promote; commit them and run `nox -s evaluate` (or set "
            f"{UNCOMMITTED_ENV}=1 to promote from this workspace on purpose)"
        )
        return f"{LABELS[d.decision]}: {d.reason}."
    return None


def _tag(d: Decision, info: dict[str, Any], extra: dict[str, str]) -> None:
    tags = {"gate": d.decision, "gate_metric": d.metric, "gate_reason": d.reason, **extra}
    registry.tag_decision(str(info["run_id"]), d.model_name, d.candidate_version, tags)


def committed_champion() -> tuple[str, str] | None:
    """(model name, version) of the champion the committed gate decision names (git's HEAD);
    None outside git, or before any commit of one."""
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:{GATE_FILE.as_posix()}"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        gate = json.loads(shown.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not isinstance(gate, dict) or not gate.get("model_name"):
        return None
    version = gate.get("candidate_version") if gate.get("decision") == "promoted" else None
    version = version or gate.get("champion_version")
    return (str(gate["model_name"]), str(version)) if version else None


def read_replace_env() -> bool:
    return os.environ.get(REPLACE_ENV, "").strip().lower() in ("1", "true", "yes")


def evaluate(params: Params, *, replace_unloadable: bool = False) -> Decision:
    """Score models/model.pt on the test split, write the outputs, and run the gate."""
    cfg: EvaluateParams = params.evaluate
    info = read_run_info()
    test = load_test_split()
    model = load_model(MODEL_FILE)
    if list(model.feature_names) != test.schema.features or list(model.class_names) != (
        test.schema.classes
    ):
        raise ProjectError(
            f"{MODEL_FILE} was trained on other features or classes than {PROCESSED_DIR}: "
            "re-run training (`dvc repro`)"
        )
    proba = predict_proba(model, test.frame)
    test.proba = proba
    slice_metrics = slice_outputs(cfg, test)
    metrics = compute_metrics(test.y, proba)
    baseline = baseline_metrics(test.y, class_priors(len(test.schema.classes), test.y))
    candidate_score = score(cfg.metric, metrics, "model")
    report = {**metrics, **{f"baseline_{k}": v for k, v in baseline.items()}}
    report = {k: round(v, 6) for k, v in report.items()}
    write_outputs({**report, "n_test": len(test.y)}, test.y, proba, test.schema.classes)

    d = Decision(
        decision="",
        reason="",
        metric=cfg.metric,
        model_name=str(info["model_name"]),
        candidate_version=str(info["model_version"]),
        candidate_score=candidate_score,
        baseline_score=baseline[cfg.metric],
        min_score=cfg.min_score,
        margin=cfg.promotion_margin,
        min_holdout=cfg.min_holdout,
        max_slice_drop=cfg.max_slice_drop if cfg.slices.columns else None,
        min_slice_rows=cfg.min_slice_rows if cfg.slices.columns else None,
    )
    uri = registry.tracking_uri(params.mlflow)
    try:
        registry.configure(params.mlflow)
        summary = _gate(d, test, info, {**report, **slice_metrics}, replace_unloadable, uri)
    except ProjectError:
        raise
    except Exception as exc:  # the store is down or failed mid-way: nothing moves, say so
        d.decision = "undecided"
        d.reason = f"the MLflow store {registry.portable_uri(uri)} failed ({_one_line(exc)})"
        d.fix = (
            "check that the store answers (MLFLOW_TRACKING_URI, the server, its credentials), "
            "then run `nox -s evaluate` again"
        )
        summary = _undecided(d)
    # After the gate: it names the champion it compared with (attributions.py explains both).
    for line in attributions.report(model, test.frame, d, str(info["run_id"])):
        print(line)
    atomic_write_text(GATE_FILE, json.dumps(asdict(d), indent=2) + "\n")
    if d.decision in ("failed", "slice_regression"):
        raise GateFailedError(summary)
    if d.decision == "undecided":
        raise GateUndecidedError(summary)
    print(summary)
    return d


def slice_outputs(cfg: EvaluateParams, test: TestSplit) -> dict[str, float]:
    """Slice the test rows (bins from the train split), write metrics/slices.json; return the
    numbers for the MLflow run. No slices configured: the file says so, and nothing is judged."""
    report: dict[str, Any] = {"columns": [], "by_column": {}}
    if cfg.slices.columns:
        train, _ = load_frame("train")
        slicer = slicing.make_slicer(cfg.slices, test.schema, train)
        test.slices = slicer.labels(test.frame)
        assert test.proba is not None
        report = slicing.slice_report(slicer, test.slices, test.y, test.proba, cfg.min_slice_rows)
    atomic_write_text(SLICES_FILE, json.dumps(report, indent=2) + "\n")
    return slicing.mlflow_metrics(report)


def _gate(
    d: Decision,
    test: TestSplit,
    info: dict[str, Any],
    report: dict[str, float],
    replace_unloadable: bool,
    uri: str,
) -> str:
    where = registry.portable_uri(uri)
    if not registry.version_exists(d.model_name, d.candidate_version):
        d.decision = "undecided"
        d.reason = (
            f"model '{d.model_name}' v{d.candidate_version} (from {RUN_FILE}) is not in the "
            f"MLflow store {where}: the store is another one than training used (a fresh clone "
            "has no mlflow.db)"
        )
        d.fix = (
            "point MLFLOW_TRACKING_URI at the registry the model was trained into, or restore "
            "that store; to train into this one instead: `dvc repro --force train`"
        )
        return _undecided(d)
    committed = committed_champion()
    if (
        committed is not None
        and committed[0] == d.model_name
        and not registry.version_exists(*committed)
    ):
        d.decision = "undecided"
        d.reason = (
            f"the committed {GATE_FILE} names champion v{committed[1]} of '{d.model_name}', "
            f"which the MLflow store {where} lacks: promoting here would start a registry "
            "nobody else sees"
        )
        d.fix = (
            "point MLFLOW_TRACKING_URI at the project's registry, or restore its mlflow.db; to "
            f"start a new registry on purpose, `git rm {GATE_FILE}` and commit"
        )
        return _undecided(d)
    registry.log_test_metrics(str(info["run_id"]), report)  # before any alias moves
    if d.min_slice_rows is not None:
        registry.log_run_outputs(str(info["run_id"]), {}, SLICES_FILE)
    held_back = _held_back(d)
    if held_back is not None:
        _tag(d, info, {"gate_held_back": held_back})
        return held_back
    seen = np.concatenate([load_row_keys("train"), load_row_keys("val")])
    passed = quality_gate(d)
    summary = promote(d, test, replace_unloadable, seen) if passed else failed_summary(d)
    tags = {"gate": d.decision, "gate_metric": d.metric, "gate_reason": d.reason}
    try:
        registry.tag_decision(str(info["run_id"]), d.model_name, d.candidate_version, tags)
    except Exception as exc:  # the decision stands; only its record failed
        summary += f" (warning: the decision could not be tagged: {_one_line(exc)})"
    return summary


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``evaluate`` stage."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module('evaluation.evaluate')}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    parser.add_argument(
        "--replace-unloadable-champion",
        action="store_true",
        default=read_replace_env(),
        help=f"promote even if the champion cannot be loaded or scored (or {REPLACE_ENV}=1)",
    )
    args = parser.parse_args(argv)
    evaluate(load_params(args.params), replace_unloadable=args.replace_unloadable_champion)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
