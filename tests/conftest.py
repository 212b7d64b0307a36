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


# Parallel runs (pytest-xdist, `--dist loadgroup`): which tests must share one worker, and the
# order the work is handed out in. A module whose tests share a module-scoped fixture stays
# whole; the tests that read or change the session's ``trained`` project stay on one worker, in
# their file order (tests/test_e2e.py edits it: a no-op retrain, a worse model); every other test
# is scheduled on its own. The slowest work is handed out first (seconds on a 2-core machine),
# so that no worker is left with a long test at the end while the others wait.
WHOLE_MODULES = {"test_e2e_monitor"}
SLOW_FIRST = {
    "test_e2e_monitor": 250,
    "trained": 240,
    "test_project_lint_and_unit_tests_pass_in_gitlab_ci": 150,
    "test_canary_analysis_against_prometheus": 120,
    "test_answer_matrix": 65,
    "test_gitlab_first_train_then_monitor_are_green_and_drift_retrains": 80,
    "test_racing_evaluations_decide_one_after_the_other": 50,
    "test_deleted_artefacts_and_a_worse_model_keep_the_champion": 50,
}


def _group(item: pytest.Item) -> str | None:
    module = item.module.__name__ if item.module else ""
    if module in WHOLE_MODULES:
        return module
    if "trained" in getattr(item, "fixturenames", ()):
        return "trained"
    return None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each test's xdist group as it is collected: xdist reads the marks in its own
    ``pytest_collection_modifyitems``, which runs before any conftest's on a worker."""
    if (group := _group(item)) and not item.get_closest_marker("xdist_group"):
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest work first (a stable sort: file order within a group and among the rest)."""

    def cost(item: pytest.Item) -> float:
        name = getattr(item, "originalname", item.name)
        return -max(SLOW_FIRST.get(_group(item) or "", 0), SLOW_FIRST.get(name, 0))

    items.sort(key=cost)
