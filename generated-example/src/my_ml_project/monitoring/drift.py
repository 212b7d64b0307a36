"""The drift decision: which test each column gets, at which threshold, and when a column counts
as drifted. Evidently runs the tests; this module chooses them and judges their scores.

Evidently's defaults pick the test by the reference's size (K-S or chi-square up to 1,000 rows,
Wasserstein or Jensen-Shannon distances with a fixed 0.1 above), so the same data got another
verdict as the reference or the window grew. Here the choice is fixed, by column kind:

- numbers: the two-sample Kolmogorov-Smirnov test (Evidently's ``ks``), a p-value;
- categories and booleans: a chi-square test of homogeneity on both samples' counts
  (``chi2_homogeneity``, registered with Evidently by :func:`register_tests`). Evidently's
  ``chisquare`` tests the window against the reference's shares as if they were exact, so
  against a small reference it alarmed more the larger the window; the two-sample test counts
  both samples' noise. Categories too rare for the test (expected count under 5) are pooled.

Both p-values are uniform on unshifted data at any size, so one threshold holds at every size.
Across columns, the false-alarm rate of a run is held at ``monitor.drift_alpha`` by a weighted
Bonferroni correction: a column of weight w is tested at alpha * w / (sum of the weights), the
predicted classes counting as one feature of average weight. A column must also move by a
minimum effect (the Wasserstein distance in reference standard deviations for numbers, the total
variation distance of the shares for categories), so a huge window does not alarm on a shift
too small to matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..core.config import MonitorParams

NUMERIC_TEST = "ks"
CATEGORICAL_TEST = "chi2_homogeneity"
MIN_EXPECTED = 5  # rarer categories are pooled: the chi-square approximation needs this many


@dataclass(frozen=True)
class ColumnPlan:
    """How one column is judged: Evidently's method and its p-value threshold, the minimum
    effect, and the column's weight (0: watched and reported, but it never raises drift)."""

    numeric: bool
    threshold: float
    min_effect: float
    weight: float

    @property
    def method(self) -> str:
        return NUMERIC_TEST if self.numeric else CATEGORICAL_TEST

    @property
    def important(self) -> bool:
        return self.weight > 0


def plan(
    columns: Mapping[str, bool], params: MonitorParams, prediction: str | None = None
) -> dict[str, ColumnPlan]:
    """Each feature's plan (``columns``: name -> numeric?), and the predicted classes' when
    ``prediction`` names that column. Unknown names in ``monitor.importance``: ValueError."""
    unknown = sorted(set(params.importance) - set(columns))
    if unknown:
        raise ValueError(
            f"monitor.importance names {', '.join(unknown)}, not features of the model: "
            "fix params.yaml"
        )
    weights = {name: float(params.importance.get(name, 0.0)) for name in columns}
    if not params.importance:
        weights = dict.fromkeys(columns, 1.0)
    positive = [w for w in weights.values() if w > 0]
    if prediction is not None:
        weights[prediction] = sum(positive) / len(positive)
    total = sum(weights.values())
    watched = params.drift_alpha / len(weights)  # a report-only verdict for weight-0 columns
    kinds = {**columns, **({prediction: False} if prediction else {})}
    return {
        name: ColumnPlan(
            numeric=kinds[name],
            threshold=params.drift_alpha * w / total if w > 0 else watched,
            min_effect=params.min_effect_numeric if kinds[name] else params.min_effect_categorical,
            weight=w,
        )
        for name, w in weights.items()
    }


def _clean(values: pd.Series) -> pd.Series:
    """As Evidently tests a column: infinities and gaps left out."""
    return values.replace([-np.inf, np.inf], np.nan).dropna()


def chi2_homogeneity(reference: pd.Series, current: pd.Series) -> float:
    """p-value of the chi-square test that both samples come from one categorical distribution
    (rare categories pooled; 1.0 when fewer than two groups remain)."""
    from scipy.stats import chi2_contingency

    table = pd.concat(
        [reference.astype(str).value_counts(), current.astype(str).value_counts()], axis=1
    ).fillna(0)
    sizes = table.sum(axis=0).to_numpy()
    if (sizes == 0).any():
        return 1.0
    expected = np.outer(table.sum(axis=1) / sizes.sum(), sizes)
    rare = (expected < MIN_EXPECTED).any(axis=1)
    if rare.any():
        table = pd.concat([table[~rare], table[rare].sum().to_frame().T])
    table = table[table.sum(axis=1) > 0]
    if len(table) < 2:
        return 1.0
    return float(chi2_contingency(table.to_numpy(), correction=False).pvalue)


def _chi2_stattest(reference: pd.Series, current: pd.Series, _kind: Any, threshold: float):
    p_value = chi2_homogeneity(reference, current)
    return p_value, p_value <= threshold


def register_tests() -> None:
    """Make ``chi2_homogeneity`` a method Evidently knows (once per process)."""
    from evidently.legacy.calculations.stattests import registry
    from evidently.legacy.core import ColumnType

    if CATEGORICAL_TEST in registry._registered_stat_tests:
        return
    test = registry.StatTest(
        name=CATEGORICAL_TEST,
        display_name="chi-square homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
        default_threshold=0.05,
    )
    registry.register_stattest(test, default_impl=_chi2_stattest)


def p_value(reference: pd.Series, current: pd.Series, column: ColumnPlan) -> float:
    """The column's p-value by the same Evidently test a report runs (for benchmarks)."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    register_tests()
    kind = ColumnType.Numerical if column.numeric else ColumnType.Categorical
    test = get_registered_stattest(column.method, kind)
    return float(test(_clean(reference), _clean(current), kind, column.threshold).drift_score)


def effect_size(reference: pd.Series, current: pd.Series, numeric: bool) -> float:
    """How far the column moved: numbers, the Wasserstein distance in reference standard
    deviations; categories, the total variation distance of their shares (0 to 1)."""
    ref, cur = _clean(reference), _clean(current)
    if ref.empty or cur.empty:
        return 0.0
    if numeric:
        from scipy.stats import wasserstein_distance

        scale = float(ref.std()) or 1.0  # a constant reference: in the column's own units
        return float(wasserstein_distance(ref.to_numpy(float), cur.to_numpy(float)) / scale)
    shares = pd.concat(
        [
            ref.astype(str).value_counts(normalize=True),
            cur.astype(str).value_counts(normalize=True),
        ],
        axis=1,
    ).fillna(0)
    return float(0.5 * (shares.iloc[:, 0] - shares.iloc[:, 1]).abs().sum())


def verdict(score: float, effect: float, column: ColumnPlan) -> dict[str, Any]:
    """One column's entry in result.json: its test, score, threshold, effect and verdict."""
    return {
        "method": column.method,
        "score": score,
        "threshold": column.threshold,
        "effect": effect,
        "min_effect": column.min_effect,
        "weight": column.weight,
        "important": column.important,
        "drifted": bool(score <= column.threshold and effect >= column.min_effect),
    }


def judge(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    plans: Mapping[str, ColumnPlan],
    scores: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every planned column's verdict; p-values from ``scores`` (a report's), else computed by
    the same Evidently tests."""
    out = {}
    for name, column in plans.items():
        ref, cur = reference[name], current[name]
        score = scores[name] if scores is not None else p_value(ref, cur, column)
        out[name] = verdict(score, effect_size(ref, cur, column.numeric), column)
    return out
