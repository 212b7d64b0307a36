"""The default project passes Scientific Python's repo-review; `nox` alone runs lint, test."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def default_project(renderer, tmp_path_factory) -> Path:
    path = renderer(tmp_path_factory.mktemp("hygiene") / "project")
    # repo-review reads what git would version.
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def test_repo_review_passes_every_check_not_ignored(default_project: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "repo_review", ".", "--format", "json"],
        cwd=default_project,
        capture_output=True,
        text=True,
        check=False,
    )
    checks = json.loads(out.stdout)["checks"]
    failed = {name: c["err_msg"].splitlines()[0] for name, c in checks.items() if not c["result"]}
    assert not failed
    assert len(checks) > 30  # the sp-repo-review plugin ran, not an empty set of checks
    # Each ignored check carries its reason beside it (a comment on the same line).
    text = (default_project / "pyproject.toml").read_text()
    ignored = tomllib.loads(text)["tool"]["repo-review"]["ignore"]
    for name in ignored:
        (line,) = [x for x in text.splitlines() if f'"{name}",' in x]
        reason = line.partition("#")[2].strip()
        assert len(reason) > 20, f"{name} is ignored without a reason: {line}"


def test_nox_alone_runs_lint_and_test(default_project: Path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "nox", "-l", "--json"],
        cwd=default_project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert [s["name"] for s in json.loads(listed.stdout)] == ["lint", "test"]
