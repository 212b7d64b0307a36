"""Continuous training: labelled production rows become a new version of the raw data.

``python -m <package>.retrain [--log-dir DIR] [--dry-run] [--no-commit]`` (``nox -s retrain``
runs it, then the pipeline, whose gate decides), from the project root.

The rows: every logged prediction with ground truth from ``/feedback`` received since the last
retrain (``data/retrain.json`` keeps that point and the history), the true class as the target.
They are appended to ``data.raw_path`` in its own column order (columns the model does not read
are left empty), then ``dvc add`` records the new version and git commits the ``.dvc`` file with
``data/retrain.json``: the previous version stays in git history and DVC's cache (``git checkout
<commit> -- <raw>.dvc && dvc checkout`` brings it back). Fails closed: the raw file must be the
version its ``.dvc`` file records, in DVC's cache, and committed; otherwise nothing is written.
A correction sent after its row was added adds the row again, with the new class.
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

import pandas as pd
import yaml

from ..core.config import ProjectError, cli_errors, load_params
from ..core.fileio import atomic_write, atomic_write_text, file_md5
from ..core.paths import DVC_CACHE, PROCESSED_DIR, RETRAIN_STATE, SCHEMA_FILE
from ..data.prepare import Schema
from ..serving.predlog import log_folder
from .monitor import read_feedback, read_log


class RetrainError(ProjectError):
    """Retraining cannot add the rows safely (nothing was written): the message says why."""


def labelled_rows(log_dir: Path, schema: Schema, after: str | None) -> tuple[pd.DataFrame, int]:
    """Logged rows whose feedback arrived after ``after`` (an ISO time), with their true class
    as ``schema.target``; and how many feedback rows had no logged prediction."""
    feedback = _feedback_since(log_dir, after)
    if feedback.empty:
        return pd.DataFrame(), 0
    logged = read_log(log_dir, schema)
    rows = feedback.merge(logged, on=["request_id", "row"], how="left", indicator=True)
    orphans = int((rows["_merge"] == "left_only").sum())
    rows = rows[rows["_merge"] == "both"]
    return rows[[*schema.features, "target", "ts_feedback"]].rename(
        columns={"target": schema.target}
    ), orphans


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
            "it (or `dvc checkout` to drop the change) before retraining"
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
            f"`dvc checkout {raw}` restores it"
        ) from None
    return file_md5(raw)


def _commit(raw: Path, rows: int) -> None:
    dvc_file = raw.with_name(raw.name + ".dvc")
    _git("add", "--", str(dvc_file), str(RETRAIN_STATE))
    message = f"retrain: {rows} labelled production rows added to {raw}"
    _git("commit", "--quiet", "-m", message, "--", str(dvc_file), str(RETRAIN_STATE))


def retrain(log_dir: Path, dry_run: bool, commit: bool) -> dict[str, Any]:
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
        "rows": len(rows),
        "orphans": orphans,
        "since": after,
        "raw": str(raw),
    }
    if rows.empty:
        return summary
    summary["classes"] = rows[schema.target].value_counts().sort_index().to_dict()
    if dry_run:
        return summary
    before = check_versioned(raw)
    until = str(rows["ts_feedback"].max())
    after_md5 = append_version(raw, rows.drop(columns="ts_feedback"))
    entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "rows": len(rows),
             "feedback_until": until, "md5_before": before, "md5_after": after_md5}  # fmt: skip
    state = {"feedback_until": until, "history": [*state.get("history", []), entry]}
    atomic_write_text(RETRAIN_STATE, json.dumps(state, indent=2) + "\n")
    if commit:
        _commit(raw, len(rows))
    summary |= {"md5_before": before, "md5_after": after_md5}
    return summary


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, help="the prediction log (PREDICTION_LOG_DIR)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be added")
    parser.add_argument("--no-commit", action="store_true", help="leave the git commit to you")
    args = parser.parse_args(argv)
    log_dir = log_folder(args.log_dir)
    summary = retrain(log_dir, args.dry_run, not args.no_commit)
    since = f" since {summary['since']}" if summary["since"] else ""
    if not summary["rows"]:
        print(f"retrain: no labelled production rows{since} in {log_dir}: nothing added")
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
