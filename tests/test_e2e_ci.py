"""The generated pipelines on a project's very first run, run rather than read.

A new project is cloned the way a CI runner clones it (no dvc.lock, no outputs, no DVC cache,
no prediction log): its data pushed once to a local folder remote (the README's first step),
its git remote a bare repository, a real ``mlflow server`` as the tracking URI. Then:

- GitLab: gitlab-ci-local (shell executor) runs the train job as a `train` schedule does, then
  the monitor and retrain jobs as a `monitor` schedule does (no traffic yet; then labelled,
  drifted traffic, which it retrains on);
- GitHub: a small harness runs the `run:` steps of the Train and Monitor workflows' jobs in
  order, in bash, with each job's `env:` (its `${{ }}` expressions evaluated);

and both must leave a model version on the server, a dvc.lock committed back to the branch with
its outputs in the DVC remote, and "no data yet" from monitoring. Without MLFLOW_TRACKING_URI the
train job fails in one line naming it. Cloud remotes: each kind's DVC plugin is in the lock and
reaches its URL scheme.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e import MODEL_NAME, PACKAGE, Project
from e2e import mlflow_server as start_mlflow_server
from helpers import EXAMPLE, render, system_tool

pytestmark = pytest.mark.e2e

TRACKING_UNSET = "error: MLFLOW_TRACKING_URI is not set: set it to the MLflow tracking server"


@dataclass
class Clone:
    """A runner's checkout of a new project, and where its pipeline pushes."""

    project: Project
    origin: Path  # the bare repository: the branch commit-back pushes to
    remote: Path  # the DVC remote (a local folder)

    def committed(self, *args: str) -> str:
        return self.project.run("git", "-C", str(self.origin), *args).stdout


@pytest.fixture
def clone(pristine: Project, tmp_path: Path) -> Clone:
    """A new project as a runner checks it out: committed files only, data in the DVC remote."""
    work = tmp_path / "work"
    seed = pristine.copy(work / "my-ml-project")
    dvc = str(pristine.venv / "bin" / "dvc")
    seed.run(dvc, "push")  # the README's first step: the data to the remote
    origin = tmp_path / "origin.git"
    seed.run("git", "clone", "--quiet", "--bare", str(seed.path), str(origin))
    path = work / "runner"
    seed.run("git", "clone", "--quiet", str(origin), str(path))
    project = Project(path, pristine.venv)
    assert not (path / "dvc.lock").exists()
    assert not (path / "data" / "raw" / "breast_cancer.csv").exists()
    remote = work / "my-ml-project-dvc-storage"
    assert any(remote.rglob("*")), "the seed's dvc push left nothing in the remote"
    return Clone(project, origin, remote)


@pytest.fixture
def tracking(pristine: Project, tmp_path: Path) -> Iterator[str]:
    with start_mlflow_server(pristine, tmp_path / "mlflow") as url:
        yield url


def assert_first_training_landed(clone: Clone, tracking: str) -> None:
    """A champion on the server; dvc.lock and the metrics committed back, outputs pushed."""
    registry = clone.project.registry(tracking)
    assert registry["versions"] == [1]
    assert registry["champion"] == 1
    message = clone.committed("log", "-1", "--format=%an|%s", "main").strip()
    assert message == "ct-bot|Training: model v1 promoted (dvc.lock, metrics) [skip ci]"
    changed = clone.committed("show", "--name-only", "--format=", "main").split()
    assert {"dvc.lock", "metrics/gate.json", "metrics/evaluate.json"} <= set(changed)
    lock = yaml.safe_load(clone.committed("show", "main:dvc.lock"))
    assert set(lock["stages"]) >= {"prepare", "train", "evaluate"}
    gate = json.loads(clone.committed("show", "main:metrics/gate.json"))
    assert gate["decision"] == "promoted"
    # What was pushed is whole: a fresh checkout of the branch pulls every output (no
    # --allow-missing), so the next job (and a person) starts from this training.
    check = clone.project.path.parent / "check"
    clone.project.run("git", "clone", "--quiet", str(clone.origin), str(check))
    fresh = Project(check, clone.project.venv)
    fresh.run(str(clone.project.venv / "bin" / "dvc"), "pull")
    assert (check / "models" / "model.pt").stat().st_size > 0


def assert_no_data_yet(project: Project, output: str) -> None:
    assert "no data yet" in output
    result = project.json("reports/monitoring/latest/result.json")
    assert result["status"] == "no_data"
    assert "monitoring status: no_data; retraining not due" in output


# Served traffic, labelled and shifted, as the service's prediction log holds it: the test split's
# rows moved as `nox -s simulate -- --drift 2` moves them, written by the log's own writer.
DRIFTED_TRAFFIC = f"""
import sys
import numpy as np
from {PACKAGE}.data.prepare import load_frame
from {PACKAGE}.serving.predlog import PredictionLog
from {PACKAGE}.monitoring.simulate import draw, shift
test, schema = load_frame("test")
train, _ = load_frame("train")
rng = np.random.default_rng(7)
rows = shift(draw(test, 200, rng), train, schema, 2.0, rng)
log = PredictionLog(sys.argv[1])
for start in range(0, len(rows), 20):
    chunk, request = rows.iloc[start : start + 20], f"request-{{start}}"
    labels = [str(value) for value in chunk[schema.target]]
    answers = [{{"label": label, "probabilities": {{}}}} for label in labels]
    log.record(request, "1", chunk[schema.features].to_dict("records"), answers)
    log.feedback(request, labels)
log.close()
"""


# --- GitLab, under gitlab-ci-local ----------------------------------------------------------


def gitlab_ci_local(
    clone: Clone, npm_bin: Path, schedule: str, *jobs: str, **variables: str
) -> tuple[int, str]:
    """The jobs, as a pipeline schedule described ``schedule`` runs them (shell executor)."""
    system_tool("rsync")  # gitlab-ci-local copies the work tree with it
    project = clone.project
    passed = ("UV_PROJECT_ENVIRONMENT", "TORCH_FIND_LINKS", "TORCH_INDEX_URL")
    given = {k: project.env[k] for k in passed if project.env.get(k)}
    given |= {
        "UV_PYTHON_DOWNLOADS": "never",
        "CI_PIPELINE_SOURCE": "schedule",
        "CI_PIPELINE_SCHEDULE_DESCRIPTION": schedule,
        # The bare repository stands for the project on the GitLab server.
        "CT_GIT_PUSH_URL": str(clone.origin),
        **variables,
    }
    result = project.run(
        str(npm_bin / "gitlab-ci-local"),
        "--force-shell-executor",  # the jobs' image: this machine itself
        "--ignore-predefined-vars",
        "CI_PIPELINE_SOURCE",
        *(f"--variable={k}={v}" for k, v in given.items()),
        *jobs,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def gitlab_clone(clone: Clone) -> Clone:
    # gitlab-ci-local reads the project's path and default branch from the remote's URL.
    clone.project.run(
        "git", "remote", "set-url", "origin", "https://gitlab.example.com/team/project.git"
    )
    return clone


def test_gitlab_first_train_then_monitor_are_green_and_drift_retrains(
    gitlab_clone: Clone, npm_bin: Path, tracking: str
) -> None:
    code, output = gitlab_ci_local(
        gitlab_clone, npm_bin, "train", "train", MLFLOW_TRACKING_URI=tracking
    )
    assert code == 0, output[-5000:]
    assert re.search(r"PASS\s+train", output)
    assert_first_training_landed(gitlab_clone, tracking)
    project = gitlab_clone.project
    dotenv = dict(
        line.split("=", 1)
        for line in (project.path / "reports" / "training.env").read_text().split()
    )
    assert dotenv == {"promoted": "true", "model_version": "1"}
    assert "### Training" in (project.path / "reports" / "training.md").read_text()

    code, output = gitlab_ci_local(
        gitlab_clone, npm_bin, "monitor", "monitor", "retrain", MLFLOW_TRACKING_URI=tracking
    )
    assert code == 0, output[-5000:]
    assert re.search(r"PASS\s+monitor", output)
    assert re.search(r"PASS\s+retrain", output)
    assert_no_data_yet(project, output)
    assert "retraining not due: nothing to do" in output
    assert project.registry(tracking)["versions"] == [1]  # nothing trained again

    # Served, labelled, drifted traffic: the monitor pipeline retrains on it, and the gate
    # decides; a promotion is committed back with the new data version.
    log = project.path.parent / "predictions"
    project.py("-c", DRIFTED_TRAFFIC, str(log))
    head = gitlab_clone.committed("rev-parse", "main").strip()
    code, output = gitlab_ci_local(
        gitlab_clone,
        npm_bin,
        "monitor",
        "monitor",
        "retrain",
        MLFLOW_TRACKING_URI=tracking,
        PREDICTION_LOG_DIR=str(log),
    )
    assert code == 0, output[-5000:]
    status = project.json("reports/monitoring/latest/result.json")["status"]
    assert status in ("drift", "degraded"), status
    assert "added 200 labelled production rows" in output
    assert project.registry(tracking)["versions"] == [1, 2]
    gate = project.json("metrics/gate.json")
    dotenv = dict(
        line.split("=", 1)
        for line in (project.path / "reports" / "training.env").read_text().split()
    )
    if gate["decision"] == "promoted":
        assert dotenv == {"promoted": "true", "model_version": "2"}
        assert gitlab_clone.committed("rev-parse", "main~1").strip() == head
        changed = gitlab_clone.committed("show", "--name-only", "--format=", "main").split()
        assert {"dvc.lock", "data/raw/breast_cancer.csv.dvc", "data/retrain.json"} <= set(changed)
    else:
        assert gate["decision"] == "not_promoted", gate
        assert dotenv == {"promoted": "false", "model_version": "2"}
        assert gitlab_clone.committed("rev-parse", "main").strip() == head


def test_gitlab_train_without_tracking_uri_fails_in_one_line(
    gitlab_clone: Clone, npm_bin: Path
) -> None:
    code, output = gitlab_ci_local(gitlab_clone, npm_bin, "train", "train")
    assert code != 0
    assert re.search(r"FAIL\s+train", output)
    said = [line for line in output.splitlines() if "MLFLOW_TRACKING_URI" in line]
    assert any(TRACKING_UNSET in line for line in said), output[-3000:]
    assert "Traceback" not in output
    # It stopped before anything: no pull, no store of its own.
    assert not (gitlab_clone.project.path / "data" / "raw" / "breast_cancer.csv").exists()
    assert not (gitlab_clone.project.path / "mlflow.db").exists()


# --- GitHub Actions, by a harness that runs the jobs' `run:` steps ----------------------------


class Context(dict):
    """An expression context (vars, secrets, inputs, github): a missing name is empty."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name, "")


EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def evaluate(text: str, contexts: dict[str, Context]) -> str:
    """``${{ ... }}`` in ``text``, evaluated as GitHub does for the operators the workflows use
    (``&&``, ``||``, ``==``, property access); booleans become 'true'/'false'."""

    def value(match: re.Match[str]) -> str:
        code = match.group(1).replace("&&", " and ").replace("||", " or ")
        result = eval(code, {"__builtins__": {}}, contexts)  # the workflows' own expressions
        if isinstance(result, bool):
            return str(result).lower()
        return "" if result is None else str(result)

    return EXPRESSION.sub(value, text)


@dataclass
class JobRun:
    code: int
    output: str
    outputs: dict[str, str]
    summary: str


def run_job(
    project: Project,
    workflow: str,
    job: str,
    tmp_path: Path,
    *,
    inputs: dict[str, Any],
    variables: dict[str, str],
    environ: dict[str, str],
    secrets: dict[str, str] | None = None,
) -> JobRun:
    """The `run:` steps of ``job`` in order, each in bash -eo pipefail (GitHub's default shell)
    with the workflow's, the job's and the step's `env:`; `uses:` steps are what the harness
    stands for (checkout: the clone; setup-uv: uv on PATH; artifacts: not kept)."""
    flow = yaml.safe_load((project.path / ".github" / "workflows" / workflow).read_text())
    spec = flow["jobs"][job]
    contexts = {
        "vars": Context(variables),
        "secrets": Context(secrets or {}),
        "inputs": Context(inputs),
        "github": Context(
            event_name="workflow_dispatch",
            ref_name="main",
            repository="team/project",
            token="",
            workflow=flow["name"],
        ),
    }
    files = {n: tmp_path / f"{job}-{n}" for n in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
    for path in files.values():
        path.write_text("")
    base = {**project.env, **environ, **{k: str(v) for k, v in files.items()}}
    env = {k: evaluate(str(v), contexts) for k, v in {**flow.get("env", {}), **spec["env"]}.items()}
    output = ""
    for step in spec["steps"]:
        if "run" not in step:
            continue
        step_env = {k: evaluate(str(v), contexts) for k, v in step.get("env", {}).items()}
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=project.path,
            env={**base, **env, **step_env},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        output += f"--- {step.get('name', step['run'])}\n{done.stdout}{done.stderr}"
        if done.returncode:
            return JobRun(done.returncode, output, {}, files["GITHUB_STEP_SUMMARY"].read_text())
    text = files["GITHUB_OUTPUT"].read_text()
    outputs = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return JobRun(0, output, outputs, files["GITHUB_STEP_SUMMARY"].read_text())


def test_github_first_train_then_monitor_are_green(
    clone: Clone, tracking: str, tmp_path: Path
) -> None:
    project = clone.project
    tracked = {"MLFLOW_TRACKING_URI": tracking}
    # Deploy before any training (a push to main): nothing to ship, green.
    deploy = run_job(
        project, "deploy.yml", "deploy", tmp_path, inputs={}, variables=tracked, environ={}
    )
    assert deploy.code == 0, deploy.output[-5000:]
    assert "deploy: no champion yet (train first): nothing to deploy" in deploy.output
    assert deploy.outputs == {}  # no image: the attestation and SBOM steps are skipped
    push = {"CT_GIT_PUSH_URL": str(clone.origin)}  # the bare repository stands for GitHub
    train = run_job(
        project,
        "train.yml",
        "train",
        tmp_path,
        inputs={"reason": "first run", "retrain": False, "runner": "cpu", "force": False},
        variables={"MLFLOW_TRACKING_URI": tracking},
        environ=push,
    )
    assert train.code == 0, train.output[-5000:]
    assert train.outputs["promoted"] == "true"
    assert train.outputs["model_version"] == "1"
    assert "**Gate: promoted**" in train.summary
    assert_first_training_landed(clone, tracking)
    # The job that starts Deploy runs on that output.
    flow = yaml.safe_load((project.path / ".github" / "workflows" / "train.yml").read_text())
    needs = Context(train=Context(outputs=Context(train.outputs)))
    condition = flow["jobs"]["deploy"]["if"]
    assert evaluate(condition, {"needs": needs}) == "true"

    monitor = run_job(
        project,
        "monitor.yml",
        "monitor",
        tmp_path,
        inputs={},
        variables={"MLFLOW_TRACKING_URI": tracking},
        environ={},
    )
    assert monitor.code == 0, monitor.output[-5000:]
    assert_no_data_yet(project, monitor.output)
    assert monitor.outputs == {"status": "no_data", "retrain": "false"}
    assert "**no_data**: no retraining" in monitor.summary
    retrain = yaml.safe_load((project.path / ".github" / "workflows" / "monitor.yml").read_text())
    needs = Context(monitor=Context(outputs=Context(monitor.outputs)))
    assert evaluate(retrain["jobs"]["retrain"]["if"], {"needs": needs}) == "false"

    # The champion shipped already (alias `deployed`): Deploy has nothing to do.
    alias = "from mlflow import MlflowClient; import sys; "
    alias += "MlflowClient(sys.argv[1]).set_registered_model_alias(sys.argv[2], 'deployed', '1')"
    project.py("-c", alias, tracking, MODEL_NAME)
    deploy = run_job(
        project, "deploy.yml", "deploy", tmp_path, inputs={}, variables=tracked, environ={}
    )
    assert deploy.code == 0, deploy.output[-5000:]
    assert "deploy: champion v1 is deployed already: nothing to do" in deploy.output
    # Rollback with one champion on record: refused in one line, nothing moved.
    rollback = run_job(
        project,
        "rollback.yml",
        "rollback",
        tmp_path,
        inputs={"reason": "test"},
        variables=tracked,
        environ={},
        secrets={"KUBE_CONFIG": "apiVersion: v1\nkind: Config\n"},  # the cluster's, set
    )
    assert rollback.code != 0
    assert "nothing to roll back to: v1 is the only champion" in rollback.output
    assert "Traceback" not in rollback.output
    assert project.registry(tracking)["champion"] == 1


def test_github_train_without_tracking_uri_fails_in_one_line(clone: Clone, tmp_path: Path) -> None:
    train = run_job(
        clone.project,
        "train.yml",
        "train",
        tmp_path,
        inputs={"retrain": False, "runner": "gpu", "force": False},
        variables={},
        environ={},
    )
    assert train.code != 0
    said = [line for line in train.output.splitlines() if "MLFLOW_TRACKING_URI" in line]
    assert said == [f'{TRACKING_UNSET} (a CI/CD variable or secret; README, "Pipelines")'], (
        train.output[-3000:]
    )
    assert "Traceback" not in train.output
    assert not (clone.project.path / "mlflow.db").exists()


# --- Cloud DVC remotes: the plugin of each kind, locked and working ----------------------------


@pytest.mark.parametrize(
    ("url", "plugin"),
    [
        ("s3://bucket/dvc", "dvc-s3"),
        ("gs://bucket/dvc", "dvc-gs"),
        ("azure://box/dvc", "dvc-azure"),
    ],
)
def test_cloud_remote_plugin_is_locked_and_reaches_its_scheme(
    tmp_path: Path, url: str, plugin: str
) -> None:
    """The rendered project's uv.lock holds the plugin; installed at its locked version (with
    the lock as constraints), DVC builds a file system for the remote's URL."""
    project = render(tmp_path / "project", dvc_remote=url)
    # From the example's lock, as `tests/helpers.py render-example` does: only the plugin moves.
    shutil.copy(EXAMPLE / "uv.lock", project / "uv.lock")
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH"
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_FIND_LINKS", "VIRTUAL_ENV")}
    subprocess.run([uv, "lock"], cwd=project, env=environ, check=True, capture_output=True)
    lock = tomllib.loads((project / "uv.lock").read_text(encoding="utf-8"))
    locked = {package["name"]: package["version"] for package in lock["package"]}
    assert plugin in locked, sorted(locked)
    export = [uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project"]
    constraints = tmp_path / "constraints.txt"
    text = subprocess.run(
        export, cwd=project, env=environ, check=True, capture_output=True, text=True
    ).stdout
    constraints.write_text(text)
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", str(venv)], env=environ, check=True)
    python = str(venv / "bin" / "python")
    install = [uv, "pip", "install", "--quiet", "--python", python, "-c", str(constraints)]
    subprocess.run([*install, f"{plugin}=={locked[plugin]}"], env=environ, check=True)
    probe = (
        "import sys; from dvc.fs import get_cloud_fs; "
        "cls, config, path = get_cloud_fs({}, url=sys.argv[1]); print(cls.__name__, path)"
    )
    shown = subprocess.run([python, "-c", probe, url], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    scheme = url.partition("://")[0]
    assert shown.stdout.split()[0].lower() == f"{scheme}filesystem", shown.stdout
