"""Continuous training: labelled production rows become a new version of the raw data.

``python -m <package>.retrain [--log-dir DIR] [--dry-run] [--no-commit]`` (``nox -s retrain``
runs it, then the pipeline, whose gate decides), from the project root.

The rows: every logged prediction with ground truth from ``/feedback`` received since the last
retrain (``data/retrain.json`` keeps that point, the history and the rows already added: a
(request, row) is added once), the true class as the target. Each row is checked against the
model's own schema first: a class it does not know (unless ``--allow-new-classes``), a feature
the logged request lacks, a gap where ``data.missing: error`` refuses one, or a non-finite
number sends the row to ``reports/retrain/<UTC time>-rejects.csv`` with its reason, never to
the data. With no valid row, nothing is written (exit code 2).
They are appended to ``data.raw_path`` in its own column order (columns the model does not read
are left empty), then ``dvc add`` records the new version and git commits the ``.dvc`` file with
``data/retrain.json``: the previous version stays in git history and DVC's cache (``git checkout
<commit> -- <raw>.dvc && dvc checkout --force`` brings it back). Fails closed: the raw file must
be the version its ``.dvc`` file records, in DVC's cache, and committed; else nothing is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..core.config import ProjectError, cli_errors, load_params
from ..core.features import NUMERIC
from ..core.fileio import atomic_write, atomic_write_text, file_md5
from ..core.paths import (
    DVC_CACHE,
    PROCESSED_DIR,
    RETRAIN_REJECTS_DIR,
    RETRAIN_STATE,
    SCHEMA_FILE,
)
from ..data.prepare import Schema
from ..serving.predlog import log_folder
from .monitor import read_feedback, read_log


class RetrainError(ProjectError):
    """Retraining cannot add the rows safely (nothing was written): the message says why."""


def validate(
    rows: pd.DataFrame, schema: Schema, missing: str, allow_new_classes: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(valid rows, rejected rows with a ``reason``): each row checked against the schema the
    model was trained with. A row has one reason, the first problem found."""
    reasons = pd.Series("", index=rows.index, dtype=object)

    def reject(mask: pd.Series, reason: str) -> None:
        fresh = mask & (reasons == "")
        reasons[fresh] = reason

    labels = rows[schema.target].astype(str)
    if not allow_new_classes:
        unknown = ~labels.isin(schema.classes)
        for label in sorted(labels[unknown].unique()):
            reject(labels == label, f"class {label!r} is not one of the model's "
                   f"({', '.join(schema.classes)}); --allow-new-classes admits it")  # fmt: skip
    for name in schema.features:
        if name not in rows:
            reject(pd.Series(True, index=rows.index), f"feature {name!r} is not in the log")
            continue
        column = rows[name]
        if schema.kinds.get(name) == NUMERIC:
            numbers = pd.to_numeric(column, errors="coerce")
            reject(column.notna() & ~np.isfinite(numbers.fillna(0.0)), f"{name} is not finite")
            reject(column.notna() & numbers.isna(), f"{name} is not a number")
        if missing == "error":
            reject(column.isna(), f"no value for {name} (data.missing: error)")
    bad = reasons != ""
    return rows[~bad], rows[bad].assign(reason=reasons[bad])


def write_rejects(rejected: pd.DataFrame, folder: Path = RETRAIN_REJECTS_DIR) -> Path:
    """The rejected rows, their request id, row and reason first: a CSV to read and fix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}-rejects.csv"
    first = ["request_id", "row", "reason"]
    ordered = rejected[[*first, *[c for c in rejected.columns if c not in first]]]
    atomic_write_text(path, ordered.to_csv(index=False))
    return path


def labelled_rows(log_dir: Path, schema: Schema, after: str | None) -> tuple[pd.DataFrame, int]:
    """Logged rows whose feedback arrived after ``after`` (an ISO time), with their true class
    as ``schema.target``; and how many feedback rows had no logged prediction."""
    feedback = _feedback_since(log_dir, after)
    if feedback.empty:
        return pd.DataFrame(), 0
    # One record per (request, row): a request logged twice (a retried write) counts once.
    logged = read_log(log_dir, schema).drop_duplicates(["request_id", "row"], keep="last")
    rows = feedback.merge(logged, on=["request_id", "row"], how="left", indicator=True)
    orphans = int((rows["_merge"] == "left_only").sum())
    rows = rows[rows["_merge"] == "both"]
    kept = [
        c for c in ("request_id", "row", *schema.features, "target", "ts_feedback") if c in rows
    ]
    return rows[kept].rename(columns={"target": schema.target}), orphans


def _feedback_since(log_dir: Path, after: str | None) -> pd.DataFrame:
    """Feedback rows received after ``after``, with the time they arrived (``ts_feedback``)."""
    frame = read_feedback(log_dir, keep_ts=True)
    if after is not None:
        frame = frame[frame["ts"] > after]
    return frame.rename(columns={"ts": "ts_feedback"})


def check_versioned(raw: Path) -> str:
    """The raw file's md5, once sure it is the version its .dvc file records, cached by DVC
    and committed to git (else RetrainError: the append could lose an unversioned file)."""
    dvc_file = raw.with_name(raw.name + ".dvc")
    if not dvc_file.exists():
        raise RetrainError(
            f"{raw} is not tracked by DVC ({dvc_file} missing): `dvc add {raw}` first"
        )
    recorded = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"][0]["md5"]
    actual = file_md5(raw)
    if actual != recorded:
        raise RetrainError(
            f"{raw} differs from the version {dvc_file} records: `dvc add {raw}` and commit "
            f"it (or `dvc checkout --force {raw}` to drop the change) before retraining"
        )
    if not (DVC_CACHE / actual[:2] / actual[2:]).exists():
        raise RetrainError(f"{raw} is not in DVC's cache: `dvc commit {dvc_file}` first")
    if _git("status", "--porcelain", "--", str(dvc_file)).strip():
        raise RetrainError(f"{dvc_file} has uncommitted changes: commit it before retraining")
    return actual


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise RetrainError(f"git {' '.join(args)} failed: {detail.strip()}") from None
    return done.stdout


def csv_lines(rows: pd.DataFrame, header: list[str]) -> str:
    """The rows as CSV text in the raw file's column order (absent columns left empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for record in rows.to_dict(orient="records"):
        writer.writerow([_cell(record.get(column)) for column in header])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same number
    return str(value)


def _header(raw: Path) -> tuple[list[str], bytes]:
    data = raw.read_bytes()
    first = data.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    return next(csv.reader([first])), data


def append_version(raw: Path, rows: pd.DataFrame) -> str:
    """Append ``rows`` to ``raw`` and `dvc add` it; the new md5."""
    header, data = _header(raw)
    missing = [c for c in rows.columns if c not in header]
    if missing:
        raise RetrainError(f"{raw} has no columns {', '.join(missing)}: the model's data differs")
    text = csv_lines(rows, header).encode("utf-8")
    sep = b"" if data.endswith(b"\n") else b"\n"
    atomic_write(raw, lambda fh: fh.write(data + sep + text))
    try:
        subprocess.run(["dvc", "add", "--quiet", str(raw)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RetrainError(
            f"`dvc add {raw}` failed ({exc}); the previous version is intact in DVC's cache: "
            f"`dvc checkout --force {raw}` restores it"
        ) from None
    return file_md5(raw)


def _commit(raw: Path, rows: int) -> None:
    dvc_file = raw.with_name(raw.name + ".dvc")
    _git("add", "--", str(dvc_file), str(RETRAIN_STATE))
    message = f"retrain: {rows} labelled production rows added to {raw}"
    _git("commit", "--quiet", "-m", message, "--", str(dvc_file), str(RETRAIN_STATE))


def _added_key(rows: pd.DataFrame) -> pd.Series:
    return rows["request_id"].astype(str) + ":" + rows["row"].astype(str)


def retrain(
    log_dir: Path, dry_run: bool, commit: bool, allow_new_classes: bool = False
) -> dict[str, Any]:
    params = load_params()
    raw = Path(params.data.raw_path)
    schema = Schema.load(PROCESSED_DIR / SCHEMA_FILE)
    state = (
        json.loads(RETRAIN_STATE.read_text(encoding="utf-8"))
        if RETRAIN_STATE.exists()
        else {"history": []}
    )
    after = state.get("feedback_until")
    rows, orphans = labelled_rows(log_dir, schema, after)
    summary: dict[str, Any] = {
        "rows": 0,
        "orphans": orphans,
        "since": after,
        "raw": str(raw),
        "rejected": 0,
        "repeated": 0,
    }
    if rows.empty:
        return summary
    added_before = set(state.get("added", []))
    repeated = _added_key(rows).isin(added_before)
    summary["repeated"] = int(repeated.sum())
    rows = rows[~repeated]
    valid, rejected = validate(rows, schema, params.data.missing, allow_new_classes)
    summary |= {"rows": len(valid), "rejected": len(rejected)}
    if len(rejected):
        summary["rejects"] = str(write_rejects(rejected))
    if valid.empty:
        return summary
    summary["classes"] = valid[schema.target].value_counts().sort_index().to_dict()
    if dry_run:
        return summary
    before = check_versioned(raw)
    until = str(rows["ts_feedback"].max())
    data = valid.drop(columns=["ts_feedback", "request_id", "row"])
    after_md5 = append_version(raw, data)
    entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "rows": len(valid),
             "rejected": len(rejected), "feedback_until": until, "md5_before": before,
             "md5_after": after_md5}  # fmt: skip
    added = sorted(added_before | set(_added_key(valid)))
    state = {"feedback_until": until, "history": [*state.get("history", []), entry],
             "added": added}  # fmt: skip
    atomic_write_text(RETRAIN_STATE, json.dumps(state, indent=1) + "\n")
    if commit:
        _commit(raw, len(valid))
    summary |= {"md5_before": before, "md5_after": after_md5}
    return summary


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, help="the prediction log (PREDICTION_LOG_DIR)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be added")
    parser.add_argument("--no-commit", action="store_true", help="leave the git commit to you")
    parser.add_argument(
        "--allow-new-classes", action="store_true", help="admit labels the model does not know"
    )
    args = parser.parse_args(argv)
    log_dir = log_folder(args.log_dir)
    summary = retrain(log_dir, args.dry_run, not args.no_commit, args.allow_new_classes)
    since = f" since {summary['since']}" if summary["since"] else ""
    if summary["repeated"]:
        print(f"retrain: {summary['repeated']} labelled rows were added before: skipped")
    if summary["rejected"]:
        print(f"retrain: {summary['rejected']} labelled rows rejected, each with its reason: "
              f"{summary['rejects']}")  # fmt: skip
        if not summary["rows"]:
            raise RetrainError(
                f"none of the {summary['rejected']} new labelled rows is valid (see "
                f"{summary['rejects']}): nothing added, {summary['raw']} untouched"
            )
    if not summary["rows"]:
        print(f"retrain: no new labelled production rows{since} in {log_dir}: nothing added")
        return 0
    classes = ", ".join(f"{k}: {v}" for k, v in summary["classes"].items())
    if summary["orphans"]:
        print(f"retrain: {summary['orphans']} feedback rows have no logged prediction: skipped")
    verb = "would add" if args.dry_run else "added"
    print(
        f"retrain: {verb} {summary['rows']} labelled production rows{since} ({classes}) "
        f"to {summary['raw']}"
    )
    if not args.dry_run:
        print(
            f"retrain: {summary['raw']} md5 {summary['md5_before']} -> {summary['md5_after']} "
            "(the previous version: git history of its .dvc file + DVC's cache)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
