"""The evaluate stage's global attributions: which original columns drive the challenger (the
model just trained) and the champion, on the test split.

Each model's figure per column is its mean |attribution| over the test rows (Integrated
Gradients, :mod:`..model.explain`: the code ``POST /explain`` answers with), written to
``plots/attributions.csv`` (the challenger) and ``plots/attributions_champion.csv`` (the
champion; only the header when there is none, or when it cannot be loaded or read this split),
``feature,importance`` each. ``dvc plots show`` draws the two side by side, ``dvc plots diff``
against another commit's. Both files go to the training run in MLflow as artefacts, with the
worst row's completeness error as the metric ``test_attribution_error``.

An attribution problem never changes the gate's decision: it is reported in one line.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from ..core.fileio import atomic_write_text
from ..core.paths import ATTRIBUTION_CHAMPION_FILE, ATTRIBUTION_FILE
from ..model.explain import Attributions, attribute_frame
from ..registry import store as registry

if TYPE_CHECKING:
    import pandas as pd

    from ..model.network import TabularClassifier


def table(importance: dict[str, float]) -> str:
    """``feature,importance`` CSV, the largest first (a fixed order: files diff line by line)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["feature", "importance"])
    ranked = sorted(importance.items(), key=lambda item: (-item[1], item[0]))
    writer.writerows((name, f"{value:.6g}") for name, value in ranked)
    return buffer.getvalue()


def champion_version(model_name: str, decided: str | None, candidate: str) -> str | None:
    """The champion to explain beside the candidate: the one the gate compared with, else the
    alias's (a held-back or failed candidate was never compared); never the candidate itself."""
    version = decided
    if version is None or version == candidate:
        version = registry.get_alias_version(model_name, registry.CHAMPION)
    return None if version in (None, candidate) else version


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:240]


def report(model: TabularClassifier, frame: pd.DataFrame, decision: Any, run_id: str) -> list[str]:
    """Write both plots files, log them to ``run_id``; return the lines to print.

    ``decision``: the gate's (model_name, candidate_version, champion_version).
    """
    mine = attribute_frame(model, frame)
    atomic_write_text(ATTRIBUTION_FILE, table(mine.importance()))
    lines = [_summary(f"challenger v{decision.candidate_version}", mine)]
    theirs: dict[str, float] = {}
    try:
        version = champion_version(
            decision.model_name, decision.champion_version, decision.candidate_version
        )
        if version is not None:
            champion = registry.load_version(decision.model_name, version)
            explained = attribute_frame(champion, frame)
            theirs = explained.importance()
            lines.append(_summary(f"champion v{version}", explained))
    except Exception as exc:  # gone, store down, other features: the plot shows the challenger
        lines.append(f"attributions: champion not explained ({_one_line(exc)})")
    atomic_write_text(ATTRIBUTION_CHAMPION_FILE, table(theirs))
    try:
        metrics = {"test_attribution_error": float(mine.error.max(initial=0.0))}
        registry.log_run_outputs(run_id, metrics, ATTRIBUTION_FILE, ATTRIBUTION_CHAMPION_FILE)
    except Exception as exc:  # the store failed: the gate says so; the files are written
        lines.append(f"attributions: not logged to MLflow ({_one_line(exc)})")
    return lines


def _summary(who: str, explained: Attributions) -> str:
    top = sorted(explained.importance().items(), key=lambda item: -item[1])[:3]
    shown = ", ".join(f"{name} {value:.3f}" for name, value in top)
    error = float(explained.error.max(initial=0.0))
    return f"attributions of {who}: {shown} (completeness error <= {error:.4f})"
