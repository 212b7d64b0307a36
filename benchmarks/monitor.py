"""Monitoring speed: ``python -m <package>.monitoring.monitor`` on a large prediction log, beside
Evidently alone on the same frames.

Run it from a rendered project whose environment is installed, with that environment's Python:

    make demo
    cd build/demo && .venv/bin/python ../../benchmarks/monitor.py --rows 100000 --reps 3

It prepares the data (the train split is the reference), writes ``--rows`` rows drawn from the
train split with noise into a prediction log under ``build/bench-monitor/log`` through the
project's own writer (``PredictionLog``, in 100 days of partitions: realistic files to read),
with feedback on ``--labelled`` of them, and also saves the same rows, typed, as Parquet. Then,
``--reps`` times, alternating:
- monitor: the whole command, reading the log and the feedback, joining them, Evidently's drift,
  data summary and classification presets, both HTML reports and result.json;
- Evidently alone: a process that reads the prepared frames from Parquet and runs the same
  presets on them and saves the same two HTML reports: the floor the monitor's own work adds to.
Prints the medians and their ratio (the goal: monitor <= 1.1x Evidently alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUILD = Path("build/bench-monitor")

# The reference side: the same presets as monitor.py's run_drift and classification_report (the
# same test and threshold per column), on frames already typed, nothing else.
EVIDENTLY_ALONE = """
import importlib, sys, warnings
import pandas as pd
import pyarrow.parquet as pq
from evidently import BinaryClassification, DataDefinition, Dataset
from evidently import MulticlassClassification, Report
from evidently.presets import ClassificationPreset, DataDriftPreset, DataSummaryPreset

folder, numeric, classes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
drift = importlib.import_module(sys.argv[4] + ".monitoring.drift")
params = importlib.import_module(sys.argv[4] + ".core.config").load_params().monitor
current = pq.read_table(f"{folder}/current.parquet", use_threads=False).to_pandas()
reference = pq.read_table(f"{folder}/reference.parquet", use_threads=False).to_pandas()
columns = list(reference.columns)
features = {c: c in numeric for c in columns if c != "prediction"}
plans = drift.plan(features, params, "prediction")
drift.register_tests()
definition = DataDefinition(numerical_columns=numeric,
                            categorical_columns=[c for c in columns if c not in numeric])
warnings.simplefilter("ignore")
report = Report([DataDriftPreset(columns=columns, drift_share=0.5 / len(columns),
                                 per_column_method={c: plans[c].method for c in columns},
                                 per_column_threshold={c: plans[c].threshold for c in columns}),
                 DataSummaryPreset(columns=columns)], include_tests=True)
report.run(Dataset.from_pandas(current[columns], data_definition=definition),
           Dataset.from_pandas(reference, data_definition=definition)).save_html(
    f"{folder}/alone-report.html")
labelled = current[current["target"].notna()][["target", "prediction"]].astype(str)
names = {"target": "target", "prediction_labels": "prediction"}
spec = (BinaryClassification(**names, pos_label=classes[1]) if len(classes) == 2
        else MulticlassClassification(**names, labels={c: c for c in classes}))
quality = Report([ClassificationPreset()]).run(Dataset.from_pandas(
    labelled, data_definition=DataDefinition(categorical_columns=["target", "prediction"],
                                             classification=[spec])), None)
quality.save_html(f"{folder}/alone-quality.html")
"""


def _package() -> str:
    return next(p.parent.parent.name for p in Path("src").glob("*/monitoring/monitor.py"))


def _run(*command: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3, 4):  # drift / degraded are statuses, not failures
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds


def build(package: str, rows: int, labelled: float, days: int) -> tuple[list[str], list[str]]:
    """The log, its feedback and the same rows as Parquet; (numeric features, classes)."""
    import importlib

    import numpy as np
    import pandas as pd

    data = importlib.import_module(f"{package}.data.prepare")
    predlog = importlib.import_module(f"{package}.serving.predlog")
    monitor = importlib.import_module(f"{package}.monitoring.monitor")
    prepare = [sys.executable, "-m", f"{package}.data.prepare"]
    subprocess.run(prepare, check=True, capture_output=True)
    train, schema = data.load_frame("train")
    rng = np.random.default_rng(0)
    sample = train.iloc[rng.integers(0, len(train), rows)].reset_index(drop=True)
    numeric = [n for n in schema.features if schema.spec.kinds[n] == "numeric"]
    for name in numeric:
        noise = rng.normal(0, 0.05 * float(train[name].std() or 1), rows)
        sample[name] = sample[name] + noise
    labels = sample[schema.target].astype(str).to_numpy()
    predicted = np.where(rng.random(rows) < 0.95, labels, rng.choice(schema.classes, rows))
    log_dir = BUILD / "log"
    if log_dir.exists():
        import shutil

        shutil.rmtree(log_dir)
    # Each day's rows through the project's writer, stamped with that day (its own clock).
    features = sample[schema.features].astype(object).where(sample[schema.features].notna(), None)
    records = features.to_dict(orient="records")
    start = pd.Timestamp.now(tz="UTC").normalize() - pd.Timedelta(days=days - 1)
    targets = np.full(rows, None, dtype=object)
    per_day = -(-rows // days)
    for day in range(days):
        chunk = range(day * per_day, min(rows, (day + 1) * per_day))
        if not chunk:
            break
        log = predlog.PredictionLog(log_dir, categorical=schema.spec.categorical, flush_s=3600)
        stamp = (start + pd.Timedelta(days=day)).isoformat()
        for first in range(chunk.start, chunk.stop, 8):
            last = min(first + 8, chunk.stop)
            request_id = f"{first:032x}"
            answers = [{"label": str(p), "probabilities": {}} for p in predicted[first:last]]
            log._queue(predlog.PREDICTIONS, last - first,
                       (request_id, "1", records[first:last], answers, None))  # fmt: skip
            if rng.random() < labelled:
                log._queue(predlog.FEEDBACK, 1, (request_id, list(labels[first:last])))
                targets[first:last] = labels[first:last]
        log._pending = [(kind, stamp, item) for kind, _, item in log._pending]
        log.close()
    reference = monitor._for_evidently(
        train.assign(**{monitor.PREDICTION: train[schema.target].astype(str)}), schema
    )
    current = monitor._for_evidently(sample.assign(**{monitor.PREDICTION: predicted}), schema)
    current["target"] = targets
    reference.to_parquet(BUILD / "reference.parquet")
    current.to_parquet(BUILD / "current.parquet")
    return numeric, list(schema.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--labelled", type=float, default=0.2, help="share of rows with feedback")
    parser.add_argument("--days", type=int, default=100, help="day partitions of the log")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    package = _package()
    BUILD.mkdir(parents=True, exist_ok=True)
    numeric, classes = build(package, args.rows, args.labelled, args.days)
    since = "2000-01-01"
    monitor = [sys.executable, "-m", f"{package}.monitoring.monitor",
               "--log-dir", str(BUILD / "log"), "--since", since]  # fmt: skip
    alone = [sys.executable, "-c", EVIDENTLY_ALONE, str(BUILD), ",".join(numeric),
             ",".join(classes), package]  # fmt: skip
    env_note = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(env_note)
    times: dict[str, list[float]] = {"monitor": [], "evidently": []}
    for _ in range(args.reps):
        times["evidently"].append(_run(*alone))
        times["monitor"].append(_run(*monitor))
    result = json.loads(Path("reports/monitoring/latest/result.json").read_text())
    medians = {k: statistics.median(v) for k, v in times.items()}
    figures = {
        "rows": result["rows"]["current"],
        "labelled": result["rows"]["labelled"],
        "features": len(result["drift"]["features"]),
        "monitor_s": medians["monitor"],
        "evidently_alone_s": medians["evidently"],
        "ratio": medians["monitor"] / medians["evidently"],
        "runs": times,
    }
    print(
        f"{figures['rows']} rows x {figures['features']} features ({figures['labelled']} "
        f"labelled): monitor {medians['monitor']:.1f} s, Evidently alone "
        f"{medians['evidently']:.1f} s, ratio {figures['ratio']:.2f}x (medians of {args.reps})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
