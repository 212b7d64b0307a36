"""Fixtures for the template's tests: render the template with chosen answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import render

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
