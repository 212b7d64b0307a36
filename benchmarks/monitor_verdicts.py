"""Monitoring verdicts: how often ``drift`` and ``degraded`` are raised falsely, and how often a
real shift is caught, by the monitor's rules before and after the calibrated decision.

Run it from a rendered project whose environment is installed, with that environment's Python:

    make demo
    cd build/demo && .venv/bin/python ../../benchmarks/monitor_verdicts.py --trials 200

Synthetic mixed data (4 numeric columns: normal, log-normal, Poisson counts with ties, uniform;
3 categorical: 3 levels, 6 levels of which two are rare, a yes/no flag), a reference of
``--small`` or ``--large`` rows and a window of 50 to 20,000 rows, both drawn afresh from one
population in each trial (the reference is a sample too). Trials per cell: ``--trials`` (false
drift), ``--detect-trials`` (detection), ``--quality-trials`` (degraded).

- before: Evidently's default test per column (chosen by its reference size: K-S / chi-square
  up to 1,000 rows, Wasserstein / Jensen-Shannon above), its default threshold, and the old rule:
  drift when at least 30% of the features drift;
- after: the tests, thresholds and effect floors of ``monitoring/drift.py`` with params.yaml's
  defaults, p-values from the same Evidently tests a report runs, status by ``decide()``.

Evidently's tests are called on the frames directly (what a report calls per column), so a
cell costs seconds. Detection: one feature shifted by 0.5 standard deviations (``x_normal``), or
one category's share raised by 20 points (``c_three``). Degraded: labelled windows of a binary
model exactly as accurate as at test time (accuracy 0.95 and 0.80), judged by ``quality()``;
before: the old rule (accuracy or macro F1 more than 0.05 below its test value).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

NUMERIC = ["x_normal", "x_lognormal", "x_counts", "x_uniform"]
CATEGORICAL = ["c_three", "c_six", "c_flag"]
LEVELS = {
    "c_three": (["a", "b", "c"], [0.5, 0.3, 0.2]),
    "c_six": (["p", "q", "r", "s", "t", "u"], [0.4, 0.3, 0.15, 0.12, 0.02, 0.01]),
    "c_flag": (["yes", "no"], [0.3, 0.7]),
}
WINDOWS = [50, 200, 1_000, 5_000, 20_000]
DETECT_WINDOWS = [1_000, 5_000, 20_000]


def _package() -> str:
    return next(p.parent.parent.name for p in Path("src").glob("*/monitoring/monitor.py"))


def population(rng: np.random.Generator, rows: int, shift: str | None = None) -> pd.DataFrame:
    """``rows`` rows of the population; ``shift``: "numeric" or "categorical" moves one column."""
    frame = pd.DataFrame(
        {
            "x_normal": rng.normal(10, 2, rows) + (1.0 if shift == "numeric" else 0.0),  # 0.5 SD
            "x_lognormal": rng.lognormal(0, 0.8, rows),
            "x_counts": rng.poisson(3, rows).astype(float),
            "x_uniform": rng.uniform(-1, 1, rows),
        }
    )
    for name, (levels, shares) in LEVELS.items():
        p = np.array(shares)
        if shift == "categorical" and name == "c_three":
            p = np.array([p[0] + 0.2, *(p[1:] * (1 - p[0] - 0.2) / p[1:].sum())])
        frame[name] = rng.choice(levels, rows, p=p)
    return frame


def before(reference: pd.DataFrame, current: pd.DataFrame) -> bool:
    """The old status: Evidently's default test and threshold per column, 30% of features."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    drifted = 0
    for name in NUMERIC + CATEGORICAL:
        kind = ColumnType.Numerical if name in NUMERIC else ColumnType.Categorical
        test = get_stattest(reference[name], current[name], kind, None)
        drifted += bool(test(reference[name], current[name], kind, None).drifted)
    return drifted / len(NUMERIC + CATEGORICAL) >= 0.3


def after(reference: pd.DataFrame, current: pd.DataFrame, modules: dict[str, Any]) -> bool:
    """The monitor's status: its plan, Evidently's tests, its verdicts, its decide()."""
    drift, monitor, params = modules["drift"], modules["monitor"], modules["params"]
    plans = drift.plan({n: n in NUMERIC for n in NUMERIC + CATEGORICAL}, params)
    verdicts = drift.judge(reference, current, plans)
    status, _, _ = monitor.decide(
        len(current), verdicts, NUMERIC + CATEGORICAL, {"versions": {}}, params
    )
    return status == "drift"


def drift_rates(
    reference_rows: int, window: int, shift: str | None, trials: int, modules: dict[str, Any]
) -> tuple[float, float]:
    rng = np.random.default_rng(
        [reference_rows, window, [None, "numeric", "categorical"].index(shift)]
    )
    alarms = np.zeros(2)
    for _ in range(trials):
        reference = population(rng, reference_rows)
        current = population(rng, window, shift)
        alarms += [before(reference, current), after(reference, current, modules)]
    return alarms[0] / trials, alarms[1] / trials


def degraded_rates(
    rows: int, accuracy: float, trials: int, modules: dict[str, Any]
) -> tuple[float, float]:
    """A binary model as accurate as at test time: the share of windows judged degraded."""
    monitor, params = modules["monitor"], modules["params"]
    rng = np.random.default_rng([rows, int(accuracy * 100)])

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(["benign", "malignant"], n, p=[0.63, 0.37])
        wrong = rng.random(n) >= accuracy
        return y, np.where(wrong, np.where(y == "benign", "malignant", "benign"), y)

    from sklearn.metrics import f1_score

    y, pred = sample(1_000_000)  # the test metrics: the population's own
    test = {"accuracy": accuracy, "f1": float(f1_score(y, pred, average="macro"))}
    cards = {"1": {"test_metrics": test}}
    alarms = np.zeros(2)
    for _ in range(trials):
        y, pred = sample(rows)
        frame = pd.DataFrame({"target": y, monitor.PREDICTION: pred, "model_version": "1"})
        entry = monitor.quality(monitor.Traffic(frame, "bench"), cards, params)["versions"]["1"]
        old = (test["accuracy"] - entry["accuracy"] > 0.05) or (test["f1"] - entry["f1"] > 0.05)
        alarms += [old, entry["degraded"]]
    return alarms[0] / trials, alarms[1] / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="per false-drift cell")
    parser.add_argument("--detect-trials", type=int, default=100, help="per detection cell")
    parser.add_argument("--quality-trials", type=int, default=2000, help="per degraded cell")
    parser.add_argument("--small", type=int, default=400, help="rows of the small reference")
    parser.add_argument("--large", type=int, default=14_000, help="rows of the large reference")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    package = _package()
    modules = {
        "drift": importlib.import_module(f"{package}.monitoring.drift"),
        "monitor": importlib.import_module(f"{package}.monitoring.monitor"),
        "params": importlib.import_module(f"{package}.core.config").load_params().monitor,
    }
    import warnings

    warnings.simplefilter("ignore")  # scipy's notes on empty categories
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    print("| check | reference | window | before | after |")
    print("| --- | --- | --- | --- | --- |")
    cases = [("false drift (unshifted)", None, WINDOWS, args.trials)]
    cases += [("detected: numeric +0.5 SD", "numeric", DETECT_WINDOWS, args.detect_trials)]
    cases += [("detected: category +20 points", "categorical", DETECT_WINDOWS, args.detect_trials)]
    for label, shift, windows, trials in cases:
        for reference_rows in (args.small, args.large):
            for window in windows:
                old, new = drift_rates(reference_rows, window, shift, trials, modules)
                rows.append({"check": label, "reference": reference_rows, "window": window,
                             "before": old, "after": new, "trials": trials})  # fmt: skip
                print(f"| {label} | {reference_rows:,} | {window:,} | {old:.1%} | {new:.1%} |",
                      flush=True)  # fmt: skip
    for accuracy in (0.95, 0.80):
        for labelled in (30, 100, 1_000):
            old, new = degraded_rates(labelled, accuracy, args.quality_trials, modules)
            label = f"false degraded (accuracy {accuracy:.2f})"
            rows.append({"check": label, "reference": None, "window": labelled, "before": old,
                         "after": new, "trials": args.quality_trials})  # fmt: skip
            print(f"| {label} | - | {labelled:,} labelled | {old:.1%} | {new:.1%} |", flush=True)
    seconds = time.perf_counter() - started
    print(
        f"\n{args.trials} trials per false-drift cell, {args.detect_trials} per detection cell, "
        f"{args.quality_trials} per degraded cell; "
        f"{seconds:.0f} s on {platform.machine()} ({platform.python_version()})"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
