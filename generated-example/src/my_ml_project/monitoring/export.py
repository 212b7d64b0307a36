"""The monitor's verdict as Prometheus metrics (``nox -s monitor-export -- [--push URL]``).

Reads ``reports/monitoring/latest/result.json`` (written by ``nox -s monitor``) and prints, in
Prometheus' text format: ``model_monitor_status{status=...}`` (1 for the verdict, 0 for the
others), ``model_monitor_last_run_timestamp_seconds``, ``model_monitor_rows`` (rows judged)
and ``model_monitor_drift_share``. With ``--push URL``, PUTs them to a Prometheus Pushgateway
under ``job="model-monitor", service="<model name>"``, which Prometheus scrapes
(``honor_labels: true``); deploy/prometheus/alerts.yml alerts on them.

Why pushed: the monitor is a scheduled batch job, gone before any scrape could reach it; the
Pushgateway keeps its last verdict, which is what it is for. Publishing it from the model server
would need the report inside every replica, and each would report the same verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.config import ProjectError, cli_errors
from ..core.paths import MODEL_NAME, REPORTS_DIR

RESULT = REPORTS_DIR / "latest" / "result.json"
STATUSES = ("healthy", "drift", "degraded", "insufficient_data")  # monitor.py's verdicts
JOB = "model-monitor"
SERVICE = MODEL_NAME  # the model server's name (serving/service.py)


class ExportError(ProjectError):
    """The verdict cannot be read or pushed (the message says why)."""


def exposition(result: dict[str, Any]) -> str:
    """The verdict of a ``result.json``, in Prometheus' text exposition format."""
    status = result.get("status")
    if status not in STATUSES:
        raise ExportError(f"unknown monitoring status {status!r}: expected one of {STATUSES}")
    try:
        when = datetime.fromisoformat(result["generated_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        raise ExportError("result.json has no valid generated_at time") from None
    share = (result.get("drift") or {}).get("share")
    rows = (result.get("rows") or {}).get("current", 0)
    lines = [
        "# HELP model_monitor_status The monitor's latest verdict (1) among its possible ones.",
        "# TYPE model_monitor_status gauge",
        *(f'model_monitor_status{{status="{s}"}} {int(s == status)}' for s in STATUSES),
        "# HELP model_monitor_last_run_timestamp_seconds When the latest verdict was made.",
        "# TYPE model_monitor_last_run_timestamp_seconds gauge",
        f"model_monitor_last_run_timestamp_seconds {when:.0f}",
        "# HELP model_monitor_rows Served rows the latest verdict judged.",
        "# TYPE model_monitor_rows gauge",
        f"model_monitor_rows {int(rows)}",
        "# HELP model_monitor_drift_share Share of features found drifting (NaN: not judged).",
        "# TYPE model_monitor_drift_share gauge",
        f"model_monitor_drift_share {'NaN' if share is None or math.isnan(share) else share}",
    ]
    return "\n".join(lines) + "\n"


def push(text: str, gateway: str, timeout_s: float = 10) -> None:
    """PUT the metrics to the Pushgateway's group of this job and service (replacing it)."""
    url = f"{gateway.rstrip('/')}/metrics/job/{JOB}/service/{SERVICE}"
    request = urllib.request.Request(url, data=text.encode(), method="PUT")
    request.add_header("Content-Type", "text/plain; version=0.0.4")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ExportError(f"push to {url} failed: {exc}") from None


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s monitor-export --", description=__doc__)
    parser.add_argument("--result", type=Path, default=RESULT, help="the monitor's result.json")
    parser.add_argument(
        "--push", metavar="URL", help="the Pushgateway, e.g. http://pushgateway:9091"
    )
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"no monitoring result in {args.result}: {exc} (run `nox -s monitor`)"
        ) from None
    text = exposition(result)
    print(text, end="")
    if args.push:
        push(text, args.push)
        print(f"pushed to {args.push} (job={JOB}, service={SERVICE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
