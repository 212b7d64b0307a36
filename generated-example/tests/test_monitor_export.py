"""The monitor's verdict as Prometheus metrics (what `nox -s monitor-export` prints and pushes)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from my_ml_project.monitoring.export import (
    JOB,
    SERVICE,
    STATUSES,
    ExportError,
    exposition,
    main,
    push,
)

RESULT = {
    "status": "drift",
    "generated_at": "2026-12-01T06:00:00+00:00",
    "rows": {"current": 500, "reference": 399, "labelled": 0},
    "drift": {"share": 0.25},
}


def samples(text: str) -> dict[str, float]:
    """Sample name (with its labels) -> value, from the text format."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}


def test_one_status_is_set() -> None:
    values = samples(exposition(RESULT))
    statuses = {s: values['model_monitor_status{status="' + s + '"}'] for s in STATUSES}
    assert statuses == {"healthy": 0, "drift": 1, "degraded": 0, "insufficient_data": 0}
    assert values["model_monitor_last_run_timestamp_seconds"] == 1796104800
    assert values["model_monitor_rows"] == 500
    assert values["model_monitor_drift_share"] == 0.25


def test_unjudged_drift_is_nan() -> None:
    text = exposition({**RESULT, "status": "insufficient_data", "drift": {"share": None}})
    assert samples(text)["model_monitor_drift_share"] != samples(text)["model_monitor_drift_share"]


@pytest.mark.parametrize(
    ("result", "said"),
    [
        ({**RESULT, "status": "fine"}, "unknown monitoring status"),
        ({k: v for k, v in RESULT.items() if k != "generated_at"}, "no valid generated_at"),
    ],
)
def test_bad_results_are_refused(result: dict, said: str) -> None:
    with pytest.raises(ExportError, match=said):
        exposition(result)


def test_cli_reads_the_result_and_fails_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "result.json"
    path.write_text(json.dumps(RESULT))
    assert main(["--result", str(path)]) == 0
    assert 'model_monitor_status{status="drift"} 1' in capsys.readouterr().out
    assert main(["--result", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no monitoring result in")
    assert err.count("\n") == 1


def test_push_puts_the_group_of_this_job_and_service() -> None:
    """A PUT to a Pushgateway's group URL (a local HTTP server stands in for the gateway)."""
    got: list[tuple[str, str, bytes]] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        push(exposition(RESULT), f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    ((method, path, body),) = got
    assert (method, path) == ("PUT", f"/metrics/job/{JOB}/service/{SERVICE}")
    assert body.decode() == exposition(RESULT)


def test_unreachable_gateway_is_an_error() -> None:
    with pytest.raises(ExportError, match=r"push to http://127\.0\.0\.1:9/metrics/job/"):
        push(exposition(RESULT), "http://127.0.0.1:9", timeout_s=2)
