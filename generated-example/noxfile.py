"""Every command of the project, once. The Makefile and the CI pipelines only call these sessions.

All sessions share ONE environment (``.venv``, or ``$UV_PROJECT_ENVIRONMENT``), created by uv on
first use and refreshed only when ``pyproject.toml`` or the PyTorch wheel source changes.

PyTorch wheel source (see README, "Choosing the PyTorch build"):
  TORCH_INDEX_URL   a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cu128
  TORCH_FIND_LINKS  a folder of wheels (air-gapped machines, CI caches); no index is asked for torch
Without either, uv follows ``[tool.uv.sources]`` in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tomllib
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "test"]

ROOT = Path(__file__).parent.resolve()
PACKAGE = "my_ml_project"
PYTHON = "3.11"
VENV = Path(os.environ.get("UV_PROJECT_ENVIRONMENT", ROOT / ".venv")).resolve()
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
STAMP = VENV / ".env-fingerprint"


def _torch_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.replace(" ", "").startswith("torch"))


def _fingerprint() -> str:
    parts = [
        (ROOT / "pyproject.toml").read_text(),
        PYTHON,
        os.environ.get("TORCH_INDEX_URL", ""),
        os.environ.get("TORCH_FIND_LINKS", ""),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def project_env(session: nox.Session) -> dict[str, str]:
    """Create or refresh the shared environment; return the variables that activate it."""
    env = {
        "VIRTUAL_ENV": str(VENV),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return env
    uv = ["uv", "pip", "install", "--python", str(VENV)]
    if not (BIN / "python").exists() and not (BIN / "python.exe").exists():
        session.run("uv", "venv", "--clear", "--python", PYTHON, str(VENV), external=True)
    find_links = os.environ.get("TORCH_FIND_LINKS")
    index_url = os.environ.get("TORCH_INDEX_URL")
    torch = _torch_requirement()
    if find_links:
        session.log(f"PyTorch from the wheel folder {find_links} (TORCH_FIND_LINKS)")
        session.run(
            *uv, "--no-deps", "--no-index", "--find-links", find_links, torch, external=True
        )
    elif index_url:
        session.log(f"PyTorch from the index {index_url} (TORCH_INDEX_URL)")
        session.run(*uv, "--index", index_url, torch, external=True)
    # With an override, the torch just installed satisfies the requirement and stays.
    no_sources = ["--no-sources"] if (find_links or index_url) else []
    session.run(*uv, *no_sources, "-e", f"{ROOT}[dev]", external=True)
    STAMP.write_text(_fingerprint())
    return env


def _in_env(program: str) -> str:
    """Absolute path of a program of the project environment (nox would look on its own PATH)."""
    for candidate in (BIN / program, BIN / f"{program}.exe"):
        if candidate.exists():
            return str(candidate)
    return program


def run(session: nox.Session, *args: str, env: dict[str, str], **kwargs) -> str | bool | None:
    return session.run(_in_env(args[0]), *args[1:], env=env, external=True, **kwargs)


@nox.session
def install(session: nox.Session) -> None:
    """Create (or refresh) the project environment shared by every session."""
    env = project_env(session)
    run(
        session,
        "python",
        "-c",
        f"import torch, {PACKAGE}; print('torch', torch.__version__)",
        env=env,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Check code style and formatting with ruff."""
    env = project_env(session)
    run(session, "ruff", "check", ".", env=env)
    run(session, "ruff", "format", "--check", ".", env=env)


@nox.session
def test(session: nox.Session) -> None:
    """Run the unit tests (seconds, CPU)."""
    env = project_env(session)
    run(session, "pytest", *session.posargs, env=env)


@nox.session
def train(session: nox.Session) -> None:
    """Run the DVC pipeline (prepare -> train -> evaluate); only changed stages re-run."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.registry", "init", env=env)
    run(session, "dvc", "repro", *session.posargs, env=env)
    run(session, "dvc", "metrics", "show", env=env)


@nox.session
def evaluate(session: nox.Session) -> None:
    """Re-run the evaluation stage only (metrics, plots and the promotion gate)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.registry", "init", env=env)
    run(session, "dvc", "repro", "--force", "--single-item", "evaluate", env=env)


@nox.session(name="mlflow-ui")
def mlflow_ui(session: nox.Session) -> None:
    """Start the MLflow UI for the project's tracking store on http://127.0.0.1:5000."""
    env = project_env(session)
    uri = run(session, "python", "-m", f"{PACKAGE}.registry", "uri", env=env, silent=True).strip()
    port = session.posargs[0] if session.posargs else "5000"
    run(
        session,
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        env=env,
    )


@nox.session
def push(session: nox.Session) -> None:
    """Push data and models to the DVC remote."""
    run(session, "dvc", "push", *session.posargs, env=project_env(session))


@nox.session
def pull(session: nox.Session) -> None:
    """Pull data and models from the DVC remote."""
    run(session, "dvc", "pull", *session.posargs, env=project_env(session))
