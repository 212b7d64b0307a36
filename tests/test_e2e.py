"""End to end: a real project is rendered, installed, tested, trained, resumed, scaled and gated.

Nothing is mocked: real copier, uv, nox, DVC, PyTorch (CPU build), MLflow (embedded SQLite and a
real ``mlflow server``). The fixtures and the ``Project`` driver live in conftest.py / e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from e2e import MODEL_NAME, PACKAGE, Project, free_port, wait_until_healthy
from e2e import mlflow_server as start_mlflow_server
from helpers import system_tool

pytestmark = pytest.mark.e2e


def test_post_copy_tasks_leave_a_clean_repo_with_the_data_tracked_by_dvc(pristine, tmp_path):
    project = pristine.copy(tmp_path / "dvc-check")
    dataset = "data/raw/breast_cancer.csv"
    dvc = str(project.venv / "bin" / "dvc")
    assert "up to date" in project.run(dvc, "status", f"{dataset}.dvc").stdout
    original = (project.path / dataset).read_bytes()
    (project.path / dataset).unlink()
    project.run(dvc, "checkout", f"{dataset}.dvc")
    assert (project.path / dataset).read_bytes() == original
    project.run(dvc, "add", dataset)  # the same file again: DVC rewrites nothing
    assert project.run("git", "status", "--porcelain", "--untracked-files=all").stdout == ""
    assert project.run("git", "rev-list", "--count", "HEAD").stdout.strip() == "1"


def test_project_lint_and_unit_tests_pass_in_gitlab_ci(
    pristine: Project, npm_bin: Path, tmp_path: Path
) -> None:
    """The generated .gitlab-ci.yml's lint and test jobs, run by gitlab-ci-local (shell executor).

    They share the installed environment through UV_PROJECT_ENVIRONMENT, as a CI cache would;
    the test job's JUnit and coverage reports are read back.
    """
    system_tool("rsync")  # gitlab-ci-local copies the work tree with it
    project = pristine.copy(tmp_path / "gitlab")
    # gitlab-ci-local reads the remote's default branch (CI_DEFAULT_BRANCH, `changes:` rules).
    project.run("git", "remote", "add", "origin", "https://gitlab.example.com/team/project.git")
    project.run("git", "update-ref", "refs/remotes/origin/main", "HEAD")
    project.run("git", "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    python = yaml.safe_load((project.path / ".gitlab-ci.yml").read_text())["variables"]["UV_PYTHON"]
    passed = ("UV_PROJECT_ENVIRONMENT", "TORCH_FIND_LINKS", "TORCH_INDEX_URL")
    variables = {k: project.env[k] for k in passed if project.env.get(k)}
    variables["UV_PYTHON_DOWNLOADS"] = "never"
    jobs = ["lint", f"test: [{python}]"]
    result = project.run(
        str(npm_bin / "gitlab-ci-local"),
        "--force-shell-executor",  # the jobs' image: this machine itself
        *(f"--variable={k}={v}" for k, v in variables.items()),
        *jobs,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"PASS\s+lint", output)
    assert re.search(rf"PASS\s+test: \[{re.escape(python)}\]", output)
    # The shell executor runs the jobs in the project folder: their reports are there.
    reports = project.path / "reports"
    suite = ElementTree.parse(reports / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 50
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    # The data is there in a fresh copy: the check of the real CSV runs rather than skips.
    case = suite.find("testcase[@name='test_project_raw_data_is_valid']")
    assert case is not None
    assert case.find("skipped") is None
    coverage = ElementTree.parse(reports / "coverage.xml").getroot()
    assert float(coverage.get("line-rate")) > 0.5


@pytest.mark.parametrize(
    ("status", "due"),
    [("drift", True), ("degraded", True), ("healthy", False), ("insufficient_data", False)],
)
def test_retrain_check_reads_the_monitoring_status(
    pristine: Project, tmp_path: Path, status: str, due: bool
) -> None:
    """What the CI monitor jobs branch on: step outputs / dotenv lines, and a failure when due."""
    project = pristine.copy(tmp_path / "monitor")
    latest = project.path / "reports" / "monitoring" / "latest"
    latest.mkdir(parents=True)
    (latest / "result.json").write_text(json.dumps({"status": status}))
    out = tmp_path / "out.env"
    project.nox("retrain-check", "--", "--output", str(out))
    lines = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert lines == {"status": status, "retrain": str(due).lower()}
    failed = project.nox("retrain-check", "--", "--fail-when-due", check=False)
    assert (failed.returncode != 0) == due
    if due:
        assert f"retraining due: monitoring found {status}" in failed.stdout + failed.stderr


def test_retrain_check_without_a_report_fails_in_one_line(pristine: Project, tmp_path) -> None:
    project = pristine.copy(tmp_path / "no-report")
    result = project.nox("retrain-check", check=False)
    assert result.returncode != 0
    assert "no monitoring status in reports/monitoring/latest/result.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_trained_project_passes_the_secrets_hook(trained: Project) -> None:
    """What training writes for git (data/processed/schema.json holds the data's md5) commits
    without a false secret; the same hex under another key is still caught."""
    schema = trained.json("data/processed/schema.json")
    md5 = schema["raw"]["md5"]
    assert len(md5) == 32
    trained.nox("secrets")
    # What a retrain writes for git beside them (data/retrain.json's history), then a leak.
    after = trained.json("models/run.json")["data_md5"]["train"]
    history = {"history": [{"md5_before": md5, "md5_after": after}], "added": [f"{after}:0"]}
    leak = trained.path / "leak.json"
    retrain = trained.path / "data" / "retrain.json"
    assert not retrain.exists()
    retrain.write_text(json.dumps(history, indent=1) + "\n")  # as monitoring/retrain.py does
    try:
        trained.nox("secrets")
        leak.write_text(json.dumps({"token": md5}) + "\n")
        found = trained.nox("secrets", check=False)
    finally:
        leak.unlink(missing_ok=True)
        retrain.unlink()
    assert found.returncode != 0
    assert "leak.json" in found.stdout + found.stderr


def test_metrics_session_writes_the_gate_decision(trained: Project, tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    trained.nox("metrics", "--", str(summary))
    text = summary.read_text()
    gate = trained.json("metrics/gate.json")
    assert f"**Gate: {gate['decision']}**" in text
    accuracy = trained.json("metrics/evaluate.json")["accuracy"]
    assert f"| accuracy | {accuracy:.4f} |" in text


def test_train_registers_a_champion_that_beats_the_baseline(trained: Project) -> None:
    registry = trained.registry()
    assert registry["versions"] == [1]
    assert registry["champion"] == 1
    evaluation = trained.json("metrics/evaluate.json")
    assert evaluation["accuracy"] > evaluation["baseline_accuracy"]
    assert evaluation["accuracy"] > 0.9
    assert trained.json("metrics/gate.json")["decision"] == "promoted"


def test_logged_data_version_matches_dvc_lock(trained: Project) -> None:
    lock = yaml.safe_load((trained.path / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["prepare"]["outs"]}
    tags = trained.registry()["tags"]
    assert tags["data.train_md5"] == outs["data/processed/train.parquet"]
    assert tags["data.val_md5"] == outs["data/processed/val.parquet"]
    head = trained.run("git", "rev-parse", "HEAD").stdout.strip()
    assert tags["git.commit"] == head


def test_second_train_is_a_no_op(trained: Project) -> None:
    result = trained.nox("train")
    assert "Data and pipelines are up to date" in result.stdout + result.stderr
    assert trained.registry()["versions"] == [1]


def test_worse_model_is_registered_but_not_promoted(trained: Project) -> None:
    # Fewer epochs on a narrower net: better than the majority class, worse than the champion.
    trained.set_params(train={"epochs": 5, "lr": 0.003}, model={"hidden_sizes": [8]})
    result = trained.nox("train")
    registry = trained.registry()
    assert registry["versions"] == [1, 2]
    assert registry["champion"] == 1
    gate = trained.json("metrics/gate.json")
    assert gate["decision"] == "not_promoted", gate
    assert "NOT PROMOTED" in result.stdout + result.stderr
    # `nox -s evaluate` re-runs the gate alone: same decision, no new version.
    again = trained.nox("evaluate")
    assert "Running stage 'train'" not in again.stdout + again.stderr
    assert "NOT PROMOTED" in again.stdout + again.stderr
    assert trained.registry()["versions"] == [1, 2]
    # The attributions of both models, side by side in the DVC plots, per feature column.
    shown = trained.run(str(trained.venv / "bin" / "dvc"), "plots", "show", "--json").stdout
    values = json.loads(shown)["data"]["attributions"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in values} == {"attributions.csv", "attributions_champion.csv"}
    features = trained.json("data/processed/schema.json")["features"]
    assert sorted(v["feature"] for v in values) == sorted(features * 2)
    assert "attributions of champion v1: " in again.stdout + again.stderr
    rendered = trained.run(str(trained.venv / "bin" / "dvc"), "plots", "show").stdout
    assert Path(rendered.strip().splitlines()[-1].removeprefix("file://")).is_file()


def test_killed_training_resumes_to_the_configured_epochs(pristine: Project, tmp_path: Path):
    project = pristine.copy(tmp_path / "resume")
    epochs = 150
    project.set_params(train={"epochs": epochs, "patience": 0, "batch_size": 8})
    project.py("-m", f"{PACKAGE}.data.prepare")
    project.py("-m", f"{PACKAGE}.registry.store", "init")
    checkpoint = project.path / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [project.python, "-m", f"{PACKAGE}.training.train"],
        cwd=project.path,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert not (project.path / "metrics" / "train.json").exists()
    read_epoch = (
        "import torch; print(torch.load('checkpoints/last.pt', weights_only=False)['epoch'])"
    )
    killed_at = int(project.py("-c", read_epoch).stdout)
    assert 1 <= killed_at < epochs

    result = project.py("-m", f"{PACKAGE}.training.train", "--resume")
    assert "resum" in (result.stdout + result.stderr).lower()
    assert project.json("metrics/train.json")["epochs_run"] == epochs
    history = (project.path / "metrics" / "history.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(1, epochs + 1))
    assert project.registry()["versions"] == [1]


def test_ddp_on_two_cpu_processes_registers_one_model(pristine: Project, tmp_path: Path):
    project = pristine.copy(tmp_path / "ddp")
    project.set_params(train={"epochs": 5})
    project.py("-m", f"{PACKAGE}.data.prepare")
    project.py("-m", f"{PACKAGE}.registry.store", "init")
    torchrun = str(project.venv / "bin" / "torchrun")
    train = f"{PACKAGE}.training.train"
    project.run(torchrun, "--standalone", "--nproc_per_node", "2", "-m", train)
    registry = project.registry()
    assert registry["versions"] == [1]
    run = project.json("models/run.json")
    assert run["model_version"] in ("1", 1)


WINE = """
import pandas as pd
from sklearn.datasets import load_wine
data = load_wine(as_frame=True)
frame = data.frame.rename(columns={"target": "cultivar"})
frame.columns = [c.replace("/", "_") for c in frame.columns]
frame.to_csv("data/raw/wine.csv", index=False)
"""


def test_bring_your_own_multiclass_csv(pristine: Project, tmp_path: Path) -> None:
    project = pristine.copy(tmp_path / "wine")
    project.py("-c", WINE)
    # The shipped slice columns are the sample data's: bringing a CSV means naming its own.
    project.set_params(
        data={"raw_path": "data/raw/wine.csv", "target": "cultivar"},
        evaluate={"slices": {"columns": ["alcohol"], "bins": 2}},
    )
    project.nox("train")
    schema = project.json("data/processed/schema.json")
    assert len(schema["classes"]) == 3
    evaluation = project.json("metrics/evaluate.json")
    assert evaluation["accuracy"] > evaluation["baseline_accuracy"]
    assert project.registry()["champion"] == 1


@pytest.fixture
def mlflow_server(pristine: Project, tmp_path: Path) -> Iterator[str]:
    with start_mlflow_server(pristine, tmp_path / "server") as url:
        yield url


def test_pipeline_against_a_real_mlflow_server(pristine: Project, mlflow_server: str, tmp_path):
    project = pristine.copy(tmp_path / "server-project")
    project.set_params(train={"epochs": 10})
    project.nox("train", MLFLOW_TRACKING_URI=mlflow_server)
    registry = project.registry(mlflow_server)
    assert registry["versions"] == [1]
    assert registry["champion"] == 1
    assert not (project.path / "mlflow.db").exists()


def test_mlflow_ui_session_serves_the_project_store(trained: Project) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nox", "-s", "mlflow-ui", "--", str(port)],
        cwd=trained.path,
        env=trained.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/registered-models/get?name={MODEL_NAME}"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            model = json.load(answer)["registered_model"]
        assert {a["alias"] for a in model.get("aliases", [])} >= {"champion"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
