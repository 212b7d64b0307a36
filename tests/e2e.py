"""What the end-to-end tests share: a rendered project and the commands a user types in it.

One environment is installed once (the ``pristine`` fixture, `nox -s install`: ``uv sync --locked``
and the CPU torch from the wheel folder) and shared by every copy of the project through
``UV_PROJECT_ENVIRONMENT``, as a user's CI cache would; a copy's sessions find it up to date.
Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import torch_source_env

PACKAGE = "my_ml_project"
MODEL_NAME = "my-ml-project"
# Outputs of a pipeline run: never copied between projects.
RUN_OUTPUTS = (".venv", ".nox", "dvc.lock", "processed", "models", "metrics", "plots")
RUN_STATE = ("mlflow.db", "mlartifacts", "mlruns", "checkpoints", "__pycache__")

# Fake credentials the `trained` fixture trains with: tests/test_e2e_hygiene.py checks that the
# marker reaches no file, log or MLflow record (secrets are read from the environment only).
SECRET_MARKER = "fake-secret-7f3c9e1d2b"
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIA{SECRET_MARKER}",
    "AWS_SECRET_ACCESS_KEY": SECRET_MARKER,
    "MLFLOW_TRACKING_TOKEN": SECRET_MARKER,
    "MLFLOW_TRACKING_PASSWORD": SECRET_MARKER,
    "SERVICE_API_TOKEN": SECRET_MARKER,
    "AZURE_STORAGE_KEY": SECRET_MARKER,
}

QUERY = """
import json, sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
name = sys.argv[2]
out = {"versions": sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))}
try:
    champion = client.get_model_version_by_alias(name, "champion")
except Exception:
    champion = None
if champion is not None:
    run = client.get_run(champion.run_id)
    out |= {"champion": int(champion.version), "tags": run.data.tags,
            "metrics": run.data.metrics, "params": run.data.params}
print(json.dumps(out))
"""


class Project:
    """A rendered project and the commands a user would type in it."""

    def __init__(self, path: Path, venv: Path) -> None:
        self.path, self.venv = path, venv
        self.train_log = ""  # the `trained` fixture's `nox -s train` output
        self.env = {
            **os.environ,
            **torch_source_env(),
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_PROJECT_ENVIRONMENT": str(venv),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        # Set by nox for its own session (pytest's): uv would warn that it is not this project's.
        self.env.pop("VIRTUAL_ENV", None)
        # Also nox's: its uv environments set UV_PYTHON to themselves, which the project's
        # noxfile would take for the Python version CI asks for.
        self.env.pop("UV_PYTHON", None)

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            args,
            cwd=self.path,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def nox(self, *sessions: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "nox", "-s", *sessions, check=check, **env)

    def py(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return self.run(self.python, *args, check=check, **env)

    def copy(self, dst: Path) -> Project:
        shutil.copytree(self.path, dst, ignore=shutil.ignore_patterns(*RUN_OUTPUTS, *RUN_STATE))
        return Project(dst, self.venv)

    def set_params(self, **sections: dict) -> None:
        """Edit params.yaml and commit it, as a user does: the gate promotes only from a
        committed workspace."""
        path = self.path / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        self.commit("params.yaml", message=f"params: {', '.join(sections)}")

    def commit(self, *paths: str, message: str) -> None:
        """Commit ``paths`` (nothing outside a git repository)."""
        if not (self.path / ".git").exists():
            return
        identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
        self.run("git", "add", "--", *paths)
        self.run("git", *identity, "commit", "-q", "--allow-empty", "-m", message, "--", *paths)

    def json(self, rel: str) -> dict:
        return json.loads((self.path / rel).read_text())

    def registry(self, uri: str | None = None) -> dict:
        uri = uri or f"sqlite:///{self.path / 'mlflow.db'}"
        return json.loads(self.py("-c", QUERY, uri, MODEL_NAME).stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(
    project: Project, port: int | None = None, **env: str
) -> tuple[subprocess.Popen, str]:
    """``nox -s serve`` on ``port`` (default: a free one) of loopback, in a session of its own;
    (process, URL) once ``/readyz`` answers 200 (the test fails if it exits first or takes over
    two minutes)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nox", "-s", "serve", "--", "--port", str(port)],
        cwd=project.path,
        env={**project.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not _ready(url):
        assert proc.poll() is None, "the service exited before it was ready"
        assert time.monotonic() < deadline, "the service never got ready"
        time.sleep(0.3)
    return proc, url


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no healthy server at {url} (exit code {proc.poll()})")
            time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(project: Project, store: Path) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port, over a SQLite store in ``store``."""
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            str(project.venv / "bin" / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination", str(store / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        # MLflow 3's server-side jobs (GenAI evaluation) start seven polling job runners, which
        # took 0.26 core of an idle server: no test uses them (nor the project's `mlflow-ui`).
        env={**project.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
