"""`copier update` from an older release: user changes kept, template changes arrive, conflicts
reported the Copier way, migrations run, post-copy tasks do not.

The older and newer releases are built here, as tagged commits of a copy of the template's
working tree, so these tests depend on no tag of this repository.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import copier
import pytest
import yaml
from helpers import ROOT

OLD, NEW = "v1.0.0", "v1.1.0"
# What the older release had differently: the help of two Makefile targets, LICENSE under its
# old name, and the author answer under its old name. The newer one migrates both names.
OLD_LINT = "lint: ## Ruff"
NEW_LINT = "lint: ## Ruff, mypy on src/ and the secret scan"
OLD_TEST = "test: ## Lint and tests"
NEW_TEST = "test: ## Lint and unit tests"
# 9.3+ migrations: a list of {version, command, when}. Before the update, the answer is renamed
# (the update then renders with it); after it, the user's LICENSE.txt, which the update kept with
# their changes, replaces the template's new LICENSE: their text wins, under the new name.
MIGRATIONS = """
_migrations:
  - version: v1.1.0
    when: "{{ _stage == 'before' }}"
    command:
      - "{{ _copier_python }}"
      - -c
      - |
        import pathlib, yaml
        answers = pathlib.Path(".copier-answers.yml")
        data = yaml.safe_load(answers.read_text())
        if "author" in data:
            data["author_name"] = data.pop("author")
        answers.write_text(yaml.safe_dump(data, sort_keys=False))
  - version: v1.1.0
    when: "{{ _stage == 'after' }}"
    command:
      - "{{ _copier_python }}"
      - -c
      - |
        import pathlib
        old = pathlib.Path("LICENSE.txt")
        if old.exists():
            old.replace("LICENSE")
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template repository with two tagged releases: OLD (edited back) and NEW (this tree)."""
    repo = tmp_path_factory.mktemp("template") / "mlops-template"
    repo.mkdir()
    # What git would version in this working tree (the test renders uncommitted work too),
    # less the committed example.
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in listed.split("\0"):
        if rel and not rel.startswith("generated-example/") and (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "Release Bot")
    git(repo, "config", "user.email", "release@example.com")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "newer, staged")
    # The older release: edits on top of a copy, committed and tagged first.
    makefile = repo / "template" / "Makefile"
    _replace(makefile, NEW_LINT, OLD_LINT)
    _replace(makefile, NEW_TEST, OLD_TEST)
    (repo / "template" / "LICENSE.jinja").rename(repo / "template" / "LICENSE.txt.jinja")
    texts = [repo / "copier.yml", *(repo / "template").rglob("*"), *(repo / "licenses").rglob("*")]
    for path in texts:
        if path.is_file() and "author_name" in path.read_text(encoding="utf-8", errors="ignore"):
            _replace(path, "author_name", "author")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "older release")
    git(repo, "tag", OLD)
    # The newer release: this tree, plus its migrations.
    git(repo, "checkout", "-q", "HEAD~1", "--", ".")
    git(repo, "clean", "-qfd")
    (repo / "copier.yml").write_text(
        (repo / "copier.yml").read_text(encoding="utf-8") + MIGRATIONS, encoding="utf-8"
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "newer release")
    git(repo, "tag", NEW)
    return repo


def _project(releases: Path, dst: Path) -> Path:
    """A project copied from OLD (tasks skipped: they are not under test), committed."""
    copier.run_copy(
        str(releases), dst, vcs_ref=OLD, defaults=True, unsafe=True, skip_tasks=True, quiet=True
    )
    git(dst, "init", "-q")
    git(dst, "config", "user.name", "User")
    git(dst, "config", "user.email", "user@example.com")
    git(dst, "add", "-A")
    git(dst, "commit", "-qm", "from the template")
    return dst


def _update(project: Path, **options: Any) -> None:
    copier.run_update(
        project, vcs_ref=NEW, defaults=True, unsafe=True, overwrite=True, quiet=True, **options
    )


def test_update_keeps_user_changes_brings_template_changes(releases: Path, tmp_path: Path):
    project = _project(releases, tmp_path / "project")
    assert (project / "LICENSE.txt").exists()
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["author"] == "Jane Doe"
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\n## Our notes\n\nKept across updates.\n")
    license_txt = project / "LICENSE.txt"
    license_txt.write_text(license_txt.read_text() + "\nThird-party notices: NOTICE.\n")
    git(project, "commit", "-qam", "our changes")
    commits = git(project, "rev-list", "--count", "HEAD")

    _update(project)  # tasks not skipped: they must not run on update

    assert readme.read_text().endswith("## Our notes\n\nKept across updates.\n")
    makefile = (project / "Makefile").read_text()
    assert NEW_TEST in makefile
    assert NEW_LINT in makefile
    # The migrations: LICENSE under its new name, the user's line with it; the answer renamed.
    assert not license_txt.exists()
    license_text = (project / "LICENSE").read_text()
    assert license_text.endswith("\nThird-party notices: NOTICE.\n")
    assert "<<<<<<<" not in license_text
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["author_name"] == "Jane Doe"
    assert "author" not in answers
    assert answers["_commit"] == NEW
    # Post-copy tasks did not run: no lock, no DVC tracking, no commit of theirs.
    assert not (project / "uv.lock").exists()
    assert not (project / "data" / "raw" / "breast_cancer.csv.dvc").exists()
    assert git(project, "rev-list", "--count", "HEAD") == commits


@pytest.mark.parametrize("conflict", ["inline", "rej"])
def test_update_reports_a_conflicting_change(releases: Path, tmp_path: Path, conflict: str):
    project = _project(releases, tmp_path / "project")
    makefile = project / "Makefile"
    _replace(makefile, OLD_LINT, "lint: ## Ruff, our way")
    git(project, "commit", "-qam", "our lint help")

    _update(project, conflict=conflict, skip_tasks=True)

    text = makefile.read_text()
    if conflict == "inline":
        assert "<<<<<<< before updating" in text
        assert "lint: ## Ruff, our way" in text
        assert NEW_LINT in text
        assert ">>>>>>> after updating" in text
    else:  # the template's version in the file, the user's hunk beside it
        assert NEW_LINT in text
        assert "+lint: ## Ruff, our way" in (project / "Makefile.rej").read_text()
    assert NEW_TEST in text  # the rest of the file still took the template's change
