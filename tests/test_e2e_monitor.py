"""End-to-end: a served project's traffic monitored, labelled, retrained from, and rolled back.

One project for the module: trained twice (a champion, then a worse valid model: the challenger),
deployed with shadow scoring, served; each test sends its own traffic with ``nox -s simulate``
and judges its own window of the prediction log with ``nox -s monitor -- --since``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from e2e import MODEL_NAME, PACKAGE, Project, start_service
from helpers import system_tool

MONITOR = f"{PACKAGE}.monitoring.monitor"  # the module, as `python -m` takes it

pytestmark = pytest.mark.e2e

EXIT = {"healthy": 0, "drift": 3, "degraded": 4, "insufficient_data": 5}


@dataclass
class Served:
    project: Project
    url: str
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def served(pristine: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = pristine.copy(tmp_path_factory.mktemp("monitor") / "my-ml-project")
    project.nox("train")
    # A valid model worse than the champion: the challenger, scored in the shadow.
    project.set_params(train={"epochs": 5, "lr": 0.003}, model={"hidden_sizes": [8]})
    project.nox("train")
    project.set_params(serve={"shadow": True})
    deployed = project.nox("deploy")
    assert "shadow scoring: challenger v2" in deployed.stdout, deployed.stdout
    proc, url = start_service(project, SERVE_FEEDBACK_OPEN="yes")  # no token on loopback
    yield Served(project, url, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def traffic(served: Served, *args: str) -> str:
    """Send traffic; the UTC time before the first row (the window of the monitor's check)."""
    since = datetime.now(UTC).isoformat()
    served.project.nox("simulate", "--", "--url", served.url, *args)
    time.sleep(1.5)  # the log's writer flushes every 0.5 s
    return since


def monitor(served: Served, *args: str) -> tuple[int, dict]:
    result = served.project.nox("monitor", "--", *args, check=False)
    path = served.project.path / "reports" / "monitoring" / "latest" / "result.json"
    assert path.exists(), result.stdout + result.stderr
    return result.returncode, json.loads(path.read_text())


def module_exit(served: Served, *args: str) -> int:
    """The monitor module's own exit code (nox reports any failure as 1)."""
    return served.project.py("-m", MONITOR, *args, check=False).returncode


def shifted(served: Served) -> set[str]:
    schema = served.project.json("data/processed/schema.json")
    return set(schema["features"][::2])  # simulate.py's documented subset


def test_unshifted_traffic_is_healthy(served: Served) -> None:
    since = traffic(served, "--rows", "80", "--seed", "1")
    code, result = monitor(served, "--since", since)
    assert result["status"] == "healthy", result["reasons"]
    assert code == 0
    assert result["rows"]["current"] == 80
    assert result["model_versions"] == {"1": 80}
    assert len(result["drift"]["features"]) == 30
    entry = next(iter(result["drift"]["features"].values()))
    assert {"score", "method", "threshold", "effect", "min_effect", "drifted"} <= entry.keys()
    assert entry["method"] == "ks"  # numbers: K-S, whatever the reference's size
    thresholds = [e["threshold"] for e in result["drift"]["features"].values()]
    thresholds.append(result["drift"]["prediction"]["threshold"])
    assert sum(thresholds) == pytest.approx(result["thresholds"]["drift_alpha"])


def test_shifted_traffic_is_drift_and_names_shifted_features(served: Served) -> None:
    since = traffic(served, "--rows", "200", "--drift", "0.5", "--seed", "2")
    code, result = monitor(served, "--since", since)
    assert result["status"] == "drift", result["reasons"]
    assert code != 0
    assert module_exit(served, "--since", since) == EXIT["drift"]
    drifted = set(result["drift"]["drifted_features"])
    assert drifted
    # Only shifted ones: the run's false-alarm rate over all columns is drift_alpha (0.01).
    assert drifted <= shifted(served), drifted - shifted(served)
    assert any("important feature(s) drift" in reason for reason in result["reasons"])


def test_five_rows_are_insufficient_data(served: Served) -> None:
    traffic(served, "--rows", "5", "--seed", "3")
    code, result = monitor(served, "--last", "5")
    assert result["status"] == "insufficient_data"
    assert code != 0  # the session fails on anything but healthy
    assert module_exit(served, "--last", "5") == EXIT["insufficient_data"]
    assert result["rows"]["current"] == 5
    # --no-fail: the same status, for a dashboard, without failing the session.
    assert monitor(served, "--last", "5", "--no-fail")[0] == 0


def test_feedback_brings_quality_and_shadow_comparison(served: Served) -> None:
    since = traffic(served, "--rows", "80", "--seed", "4", "--feedback")
    _, result = monitor(served, "--since", since)
    assert result["status"] == "healthy", result["reasons"]
    quality = result["quality"]["versions"]["1"]
    assert quality["rows"] == 80
    assert quality["accuracy"] > 0.9
    # The served version's own test metrics, as the evaluate stage logged them to its run.
    champion = served.project.registry()
    assert champion["champion"] == 1
    assert quality["test_accuracy"] == pytest.approx(champion["metrics"]["test_accuracy"])
    assert quality["test_f1"] == pytest.approx(champion["metrics"]["test_f1"])
    shadow = result["shadow"]
    assert shadow["rows"] == 80
    assert shadow["shadow_versions"] == ["2"]
    assert 0 <= shadow["agreement"] <= 1
    assert {"champion_accuracy", "challenger_accuracy"} <= shadow.keys()
    assert result["reports"] == {"report": "report.html", "quality": "quality.html"}


def test_flipped_labels_are_degraded(served: Served) -> None:
    since = traffic(served, "--rows", "80", "--seed", "5", "--feedback", "--flip-labels", "0.5")
    code, result = monitor(served, "--since", since)
    assert result["status"] == "degraded", result["reasons"]
    assert code != 0
    assert module_exit(served, "--since", since) == EXIT["degraded"]
    quality = result["quality"]["versions"]["1"]
    assert quality["degraded"] is True
    assert quality["p_value"] < result["thresholds"]["quality_alpha"]


def test_feedback_is_checked(served: Served) -> None:
    body = {"request_id": "0" * 32, "labels": ["x"]}
    request = urllib.request.Request(
        f"{served.url}/feedback", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 404
    assert "request_id" in json.loads(err.value.read())["error"]


def test_report_renders_in_a_browser(served: Served, tmp_path: Path) -> None:
    browser = system_tool("chromium")
    report = served.project.path / "reports" / "monitoring" / "latest" / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "Dataset Drift" in dom
    # The gate's own verdict first in the page, before Evidently's widgets.
    body = dom[dom.index("<body") :]
    assert 0 <= body.find("Monitoring gate: ") < body.find("Dataset Drift")
    assert "mean_radius" in dom
    from PIL import Image

    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram), "the screenshot is almost one colour"


def test_bad_inputs_get_one_line_errors(served: Served, tmp_path: Path) -> None:
    partial = tmp_path / "partial.csv"
    partial.write_text("mean_radius,mean_texture\n1,2\n")
    result = served.project.py("-m", MONITOR, "--current", str(partial), check=False)
    assert result.returncode == 2
    assert "lacks 28 of the 30 feature columns" in result.stderr
    assert "Traceback" not in result.stderr
    empty = served.project.py("-m", MONITOR, "--log-dir", str(tmp_path / "none"), check=False)
    assert empty.returncode == 2
    assert "no prediction log" in empty.stderr
    assert "Traceback" not in empty.stderr
    window = served.project.py("-m", MONITOR, "--since", "2999-01-01", check=False)
    assert window.returncode == EXIT["insufficient_data"]
    assert "no rows in the window" in window.stdout


CURRENT_FILES = """
import json, sys
import pandas as pd
import pyarrow.parquet as pq

test = pq.read_table("data/processed/test.parquet", use_threads=False).to_pandas()
target = json.load(open("data/processed/schema.json"))["target"]
# The test split's own labels stand in for the champion's (mostly right) answers.
folder = sys.argv[1]
test.assign(label=test[target], model_version="1").to_csv(f"{folder}/labelled.csv", index=False)
test.drop(columns=target).to_parquet(f"{folder}/features.parquet")
print(len(test))
"""


def test_current_takes_files_with_and_without_labels(served: Served, tmp_path: Path) -> None:
    project = served.project
    rows = int(project.py("-c", CURRENT_FILES, str(tmp_path)).stdout)
    labelled = project.py("-m", MONITOR, "--current", str(tmp_path / "labelled.csv"), check=False)
    assert labelled.returncode in (EXIT["healthy"], EXIT["drift"]), labelled.stderr
    result = project.json("reports/monitoring/latest/result.json")
    assert (result["rows"]["current"], result["rows"]["labelled"]) == (rows, rows)
    quality = result["quality"]["versions"]["1"]  # judged against v1's card in the log
    assert (quality["judged"], quality["degraded"]) == (True, False)
    assert result["drift"]["prediction"]["method"] == "chi2_homogeneity"
    features = project.py(
        "-m", MONITOR, "--current", str(tmp_path / "features.parquet"), check=False
    )
    assert features.returncode in (EXIT["healthy"], EXIT["drift"]), features.stderr
    result = project.json("reports/monitoring/latest/result.json")
    assert (result["rows"]["labelled"], result["quality"]["versions"]) == (0, {})
    assert result["drift"]["prediction"] is None
    assert len(result["drift"]["features"]) == 30


def test_retrain_adds_a_data_version_and_the_gate_decides(served: Served) -> None:
    project = served.project
    raw = project.path / "data" / "raw" / "breast_cancer.csv"
    dvc_file = raw.with_name(raw.name + ".dvc")
    before_md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    before_rows = len(raw.read_text().splitlines())
    before_versions = project.registry()["versions"]
    result = project.nox("retrain")
    output = result.stdout + result.stderr
    state = project.json("data/retrain.json")
    added = state["history"][-1]["rows"]
    assert added == 160  # the two feedback tests' rows
    assert f"added {added} labelled production rows" in output
    assert len(raw.read_text().splitlines()) == before_rows + added
    after_md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    assert after_md5 != before_md5
    # The previous version is recoverable: in git history and in DVC's cache.
    committed = project.run("git", "show", "HEAD~1:data/raw/breast_cancer.csv.dvc").stdout
    assert yaml.safe_load(committed)["outs"][0]["md5"] == before_md5
    assert (project.path / ".dvc/cache/files/md5" / before_md5[:2] / before_md5[2:]).exists()
    assert project.registry()["versions"] == [*before_versions, before_versions[-1] + 1]
    gate = project.json("metrics/gate.json")
    assert gate["decision"] in ("promoted", "not_promoted"), gate
    assert f"gate: {gate['decision']}" in output
    again = project.nox("retrain")
    assert "nothing added" in again.stdout + again.stderr
    assert project.registry()["versions"] == [*before_versions, before_versions[-1] + 1]


PROMOTE = f"""
import sys
from {PACKAGE}.registry import store as registry
from {PACKAGE}.core.config import load_params

params = load_params().mlflow
registry.configure(params)
registry.promote(params.model_name, sys.argv[1])
"""


def test_rollback_restores_the_previous_champion(served: Served) -> None:
    project = served.project
    registry = project.registry()
    if registry["champion"] == 1:  # the retrain's model lost: nothing to roll back to yet
        refused = project.nox("rollback", check=False)
        assert refused.returncode != 0
        assert "nothing to roll back to" in refused.stdout + refused.stderr
        assert project.registry()["champion"] == 1
        # What the gate does when a model wins: promote it (the history records it).
        project.py("-c", PROMOTE, str(registry["versions"][-1]))
    newest = project.registry()["champion"]
    assert newest == registry["versions"][-1]
    result = project.nox("rollback")
    output = result.stdout + result.stderr
    assert f"ROLLED BACK: '{MODEL_NAME}' champion v{newest} -> v1" in output
    assert "bento: my-ml-project:" in output
    assert project.registry()["champion"] == 1
    # The rollback sticks: the same candidate evaluated again (CI, a retrain) stays out...
    evaluated = project.nox("evaluate")
    gate = project.json("metrics/gate.json")
    assert gate["decision"] == "blocked", gate
    assert f"nox -s unblock -- {newest}" in evaluated.stdout + evaluated.stderr
    assert project.registry()["champion"] == 1
    # ...and reaches the service: restarted, it serves the champion's Bento, not the newest.
    proc, url = start_service(project)
    try:
        row = project.json("data/processed/schema.json")["features"]
        body = json.dumps({"rows": [dict.fromkeys(row, 1.0)]}).encode()
        request = urllib.request.Request(
            f"{url}/predict", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["model_version"] == "1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    again = project.nox("rollback", check=False)
    assert again.returncode != 0
    assert "nothing to roll back to" in again.stdout + again.stderr
    # Unblocked on purpose, the version competes again.
    project.nox("unblock", "--", str(newest))
    project.nox("evaluate")
    assert project.json("metrics/gate.json")["decision"] in ("promoted", "not_promoted")
