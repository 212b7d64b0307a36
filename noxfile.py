# /// script
# dependencies = ["nox>=2025.2.9"]
# ///
"""Automation of the template repository itself: lint, tests, the committed example, a demo.

PyTorch in rendered projects: the tests never download CUDA wheels. They pass the generated
project's own override (TORCH_FIND_LINKS / TORCH_INDEX_URL, see the README) through; when neither
is set, a torch wheel found in pip's find-links folder is used, else PyTorch's CPU index.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent.resolve()
EXAMPLE = ROOT / "generated-example"
DEMO = ROOT / "build" / "demo"
PYTHON = "3.11"
# Test workers of `nox -s suite`: one more than the cores, as much of the end-to-end suite waits on
# servers, scrapes and subprocesses (tests/conftest.py groups and orders the work).
WORKERS = str((os.cpu_count() or 1) + 1)

sys.path.insert(0, str(ROOT / "tests"))
from helpers import torch_source_env  # noqa: E402


def _install(session: nox.Session) -> None:
    session.install("--group", "test")


def _render(session: nox.Session, dst: Path) -> None:
    session.run("python", str(ROOT / "tests" / "helpers.py"), "render-example", str(dst))


def _test_env() -> dict[str, str]:
    return {"UV_PYTHON_DOWNLOADS": "never", **torch_source_env()}


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff on the repository and on a freshly rendered default project."""
    _install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # Outside the repository: ruff skips anything under .nox/ and would use our config.
    with tempfile.TemporaryDirectory(prefix="mlops-template-lint-") as tmp:
        rendered = Path(tmp) / "my-ml-project"
        _render(session, rendered)
        with session.chdir(rendered):
            session.run("ruff", "check", ".")
            session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Fast tests of the template: rendering, validators, hooks, example freshness."""
    _install(session)
    session.run("pytest", "-m", "not e2e", *session.posargs, env=_test_env())


@nox.session(python=PYTHON, default=False)
def e2e(session: nox.Session) -> None:
    """End-to-end: render, install, test, train, resume, DDP, gate, MLflow server (minutes)."""
    _install(session)
    session.run("pytest", "-m", "e2e", *session.posargs, env=_test_env())


@nox.session(python=PYTHON, default=False)
def suite(session: nox.Session) -> None:
    """Every test, fast and end-to-end, on parallel workers (`make test`; `-- -n N` for N)."""
    _install(session)
    workers = [] if any(arg.startswith("-n") for arg in session.posargs) else ["-n", WORKERS]
    session.run(
        "pytest", *workers, "--dist", "loadgroup", "--no-loadscope-reorder", "--durations=15",
        *session.posargs, env=_test_env(),
    )  # fmt: skip


@nox.session(python=PYTHON, default=False)
def example(session: nox.Session) -> None:
    """Re-render generated-example/ from the default answers."""
    _install(session)
    _render(session, EXAMPLE)
    session.log(f"rendered {EXAMPLE.relative_to(ROOT)}")


@nox.session(python=PYTHON, default=False)
def demo(session: nox.Session) -> None:
    """Copy the default project into build/demo and run it end to end (install, test, train)."""
    _install(session)
    shutil.rmtree(DEMO, ignore_errors=True)
    # The demo owns its environment (build/demo/.venv), not this session's: nox points
    # UV_PROJECT_ENVIRONMENT and VIRTUAL_ENV at .nox/demo, and the project would follow them.
    env = {**_test_env(), "UV_PROJECT_ENVIRONMENT": None, "VIRTUAL_ENV": None}
    # HEAD (with uncommitted changes), not the latest release tag copier would otherwise take.
    copy = ["copier", "copy", "--trust", "--defaults", "--vcs-ref", "HEAD"]
    session.run(*copy, str(ROOT), str(DEMO), env=env)
    with session.chdir(DEMO):
        session.run("nox", "-s", "install", "lint", "test", "train", env=env)
    session.log(f"demo project ready in {DEMO.relative_to(ROOT)}: cd there and try `nox -l`")


@nox.session(name="bench-serve", python=PYTHON, default=False)
def bench_serve(session: nox.Session) -> None:
    """Serving speed: the generated BentoML service beside FastAPI under wrk (minutes; `-- -h`)."""
    _install(session)
    session.run("python", str(ROOT / "benchmarks" / "serve.py"), *session.posargs, env=_test_env())


@nox.session(name="bench-explain", python=PYTHON, default=False)
def bench_explain(session: nox.Session) -> None:
    """Attribution speed: the test split's, and /explain beside /predict at one client (`-- -h`)."""
    _install(session)
    session.run(
        "python", str(ROOT / "benchmarks" / "explain.py"), *session.posargs, env=_test_env()
    )
