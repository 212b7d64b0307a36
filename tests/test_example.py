"""generated-example/ must be exactly what the template renders from the default answers."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import yaml
from helpers import ANSWERS, ROOT, render_example

EXAMPLE = ROOT / "generated-example"
FIX = "run `nox -s example` (or `make example`) and commit generated-example/"


def _visible_files(top: Path, repo: Path) -> set[str]:
    """Files under ``top`` that git would version (tracked or untracked, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", str(top)],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    prefix = top.relative_to(repo).as_posix() + "/" if top != repo else ""
    return {line.removeprefix(prefix) for line in out.splitlines() if (repo / line).is_file()}


def test_generated_example_is_current(tmp_path: Path) -> None:
    fresh = render_example(tmp_path / "example")
    subprocess.run(["git", "init", "-q", str(fresh)], check=True)
    want = _visible_files(fresh, fresh)
    have = _visible_files(EXAMPLE, ROOT)
    assert want, "the default render produced no files"
    assert have == want, f"generated-example/ is stale ({FIX}): {sorted(have ^ want)}"
    stale = [
        p
        for p in sorted(want - {ANSWERS})
        if not filecmp.cmp(fresh / p, EXAMPLE / p, shallow=False)
    ]
    # The answers file records the template's commit, which moves with every commit.
    fresh_answers, example_answers = (
        yaml.safe_load((d / ANSWERS).read_text()) for d in (fresh, EXAMPLE)
    )
    for answers in (fresh_answers, example_answers):
        answers.pop("_commit", None)
    if fresh_answers != example_answers:
        stale.append(ANSWERS)
    assert not stale, f"generated-example/ is stale ({FIX}): {stale}"
