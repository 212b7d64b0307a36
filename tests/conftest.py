"""Fixtures for the template's tests: render the template with chosen answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e import FAKE_SECRETS, Project
from helpers import npm_tools, render

TEMPLATE = Path(__file__).resolve().parents[1]

Render = Callable[..., Path]


@pytest.fixture(scope="session")
def renderer() -> Render:
    """``render(dst, tasks=False, pretend=False, **answers) -> dst``, for wider fixtures."""
    return render


@pytest.fixture
def render_project(tmp_path: Path) -> Render:
    """``render_project(tasks=False, pretend=False, **answers)``: render into a new tmp folder."""
    count = 0

    def _render(*, tasks: bool = False, pretend: bool = False, **answers: Any) -> Path:
        nonlocal count
        count += 1
        return render(tmp_path / f"project{count}", tasks=tasks, pretend=pretend, **answers)

    return _render


@pytest.fixture(scope="session")
def npm_bin() -> Path:
    """Folder of the npm linters (gitlab-ci-local, npm-groovy-lint), installed once."""
    return npm_tools()


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The default project, copied with its post-copy tasks, its environment installed once."""
    path = render(tmp_path_factory.mktemp("e2e") / "my-ml-project", tasks=True)
    project = Project(path, path / ".venv")
    project.nox("install")
    return project


@pytest.fixture(scope="session")
def trained(pristine: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of ``pristine`` after ``nox -s train``: a champion in its MLflow store.

    Trained with fake credentials in the environment (tests/test_e2e_hygiene.py looks for them);
    the run's output is kept in ``train_log``.
    """
    project = pristine.copy(tmp_path_factory.mktemp("trained") / "my-ml-project")
    result = project.nox("train", **FAKE_SECRETS)
    project.train_log = result.stdout + result.stderr
    return project
