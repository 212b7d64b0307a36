"""`copier update` from an older release: user changes kept, template changes arrive, conflicts
reported the Copier way, migrations run, post-copy tasks do not.

The older and newer releases are built here, as tagged commits of a copy of the template's
working tree, so these tests depend on no tag of this repository.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import copier
import pytest
import yaml
from helpers import ROOT

OLD, NEW = "v1.0.0", "v1.1.0"
# What the older release had differently: the help of two Makefile targets, LICENSE under its
# old name, and the author answer under its old name. The newer one migrates both names.
OLD_LINT = "lint: ## Ruff"
NEW_LINT = "lint: ## The pre-commit hooks: ruff, mypy, codespell, the secret scan, the CI files"
OLD_TEST = "test: ## Lint and tests"
NEW_TEST = "test: ## Lint and unit tests"
# 9.3+ migrations: a list of {version, command, when}, added to copier.yml's own. Before the
# update, the answer is renamed (the update then renders with it); after it, the user's
# LICENSE.txt, which the update kept with their changes, replaces the template's new LICENSE:
# their text wins, under the new name.
MIGRATIONS = """
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
# The layout release: v0.2.0, the last with the flat package, is this commit of this repository;
# the next one, with the subpackages and their migration (hooks/migrate_layout.py), is this tree.
FLAT_RELEASE, FLAT_COMMIT, LAYOUT_RELEASE = "v0.2.0", "8bb703f", "v0.3.0"
PACKAGE = "my_ml_project"  # the default answers'
MIGRATE = ROOT / "hooks" / "migrate_layout.py"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _copy_tree(repo: Path) -> None:
    """Copy into ``repo`` what git would version in this working tree (the tests render
    uncommitted work too), less the committed example."""
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in listed.split("\0"):
        if rel and not rel.startswith("generated-example/") and (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)


def _init_repo(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "Release Bot")
    git(repo, "config", "user.email", "release@example.com")


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template repository with two tagged releases: OLD (edited back) and NEW (this tree)."""
    repo = tmp_path_factory.mktemp("template") / "mlops-template"
    _init_repo(repo)
    _copy_tree(repo)
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
    config = (repo / "copier.yml").read_text(encoding="utf-8")
    assert config.count("\n_migrations:\n") == 1
    config = config.replace("\n_migrations:\n", "\n_migrations:" + MIGRATIONS)
    (repo / "copier.yml").write_text(config, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "newer release")
    git(repo, "tag", NEW)
    return repo


def _project(releases: Path, dst: Path, ref: str = OLD) -> Path:
    """A project copied from ``ref`` (tasks skipped: they are not under test), committed."""
    copier.run_copy(
        str(releases), dst, vcs_ref=ref, defaults=True, unsafe=True, skip_tasks=True, quiet=True
    )
    git(dst, "init", "-q")
    git(dst, "config", "user.name", "User")
    git(dst, "config", "user.email", "user@example.com")
    git(dst, "add", "-A")
    git(dst, "commit", "-qm", "from the template")
    return dst


def _update(project: Path, ref: str = NEW, **options: Any) -> None:
    copier.run_update(
        project, vcs_ref=ref, defaults=True, unsafe=True, overwrite=True, quiet=True, **options
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


# --- v0.2.0 -> v0.3.0: the flat package's modules moved into subpackages -----------------------


@pytest.fixture(scope="module")
def layout_releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template repository with FLAT_RELEASE (this repository at FLAT_COMMIT) and
    LAYOUT_RELEASE (this tree), tagged."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", FLAT_COMMIT], cwd=ROOT, capture_output=True, check=False
    )
    if archive.returncode:
        pytest.fail(
            f"commit {FLAT_COMMIT} (release {FLAT_RELEASE}) is missing from this clone: "
            "fetch the full history (git fetch --unshallow)",
            pytrace=False,
        )
    repo = tmp_path_factory.mktemp("template") / "mlops-template"
    _init_repo(repo)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(repo, filter="data")
    shutil.rmtree(repo / "generated-example", ignore_errors=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "flat release")
    git(repo, "tag", FLAT_RELEASE)
    git(repo, "rm", "-rqf", ".")
    _copy_tree(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "layout release")
    git(repo, "tag", LAYOUT_RELEASE)
    return repo


def _flat_project(layout_releases: Path, dst: Path) -> tuple[Path, Path]:
    """A project copied from FLAT_RELEASE, committed; and its package folder."""
    project = _project(layout_releases, dst, FLAT_RELEASE)
    return project, project / "src" / PACKAGE


def _layout_update(project: Path, capfd: pytest.CaptureFixture[str], **options: Any) -> str:
    """Update ``project`` to LAYOUT_RELEASE; return the migration's report."""
    capfd.readouterr()
    _update(project, LAYOUT_RELEASE, skip_tasks=True, **options)
    return capfd.readouterr().out


def _assert_new_layout(project: Path) -> None:
    """No module of the flat layout left, no conflict left, every file compiles and every
    relative import of the package names one of its modules."""
    package = project / "src" / PACKAGE
    assert sorted(p.name for p in package.iterdir() if p.suffix in {".py", ".rej"}) == [
        "__init__.py"
    ]
    assert (project / "tools" / "audit.py").is_file()
    sources = [*package.rglob("*.py"), *(project / "tools").glob("*.py")]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert "<<<<<<<" not in text, path
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                folder = path.parents[node.level - 1].joinpath(*node.module.split("."))
                where = f"{path}:{node.lineno}"
                assert folder.with_suffix(".py").is_file() or folder.is_dir(), where
                assert folder.is_relative_to(package), where
    compiled = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-x", r"\.venv", "src", "tools"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr


def _replace_line(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(f"{old}\n") == 1, f"{old!r} not once in {path}"
    path.write_text(text.replace(f"{old}\n", f"{new}\n"), encoding="utf-8")


def _migration() -> ModuleType:
    spec = importlib.util.spec_from_file_location("migrate_layout", MIGRATE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_moves_cover_the_flat_release():
    """Every module of the flat release has a move, to a module of this tree; its relative
    imports, translated for their new place, name modules of this tree."""
    migration = _migration()
    folder = f"template/{migration.PACKAGE_FOLDER}"
    flat = git(ROOT, "ls-tree", "--name-only", FLAT_COMMIT, f"{folder}/").split()
    assert {Path(p).stem for p in flat if p.endswith(".py")} == set(migration.MOVES)
    package = ROOT / folder
    for old, new in migration.MOVES.items():
        if new.startswith("/"):
            assert (ROOT / "template" / new[1:]).is_file(), new
            continue
        path = package / new
        assert path.is_file(), new
        text = git(ROOT, "show", f"{FLAT_COMMIT}:{folder}/{old}.py")
        moved = migration.translate_imports(text, migration.new_parts(old))
        for node in ast.walk(ast.parse(moved)):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = path.parents[node.level - 1]
                target = base.joinpath(*(node.module or "").split("."))
                names = [target / a.name for a in node.names] if not node.module else [target]
                assert all(n.with_suffix(".py").is_file() or n.is_dir() for n in names), (
                    f"{old}.py:{node.lineno} -> {new}: {ast.unparse(node)}"
                )


@pytest.mark.parametrize(
    ("line", "where", "moved"),
    [
        ("from .config import X", "monitoring/monitor", "from ..core.config import X"),
        ("from .loop import (\n", "training/train", "from .loop import (\n"),
        ("  from . import registry", "training/loop", "  from ..registry import store as registry"),
        ("from . import serving as s  # ok", "serving/deploy", "from . import contract as s  # ok"),
        ("from .ours import f\r\n", "core/fileio", "from ..ours import f\r\n"),
        ("from . import registry, loop", "evaluation/evaluate", "from . import registry, loop"),
        ("from .config import X", "audit", "from .config import X"),
    ],
)
def test_layout_migration_translates_relative_imports(line: str, where: str, moved: str):
    assert _migration().translate_imports(line, tuple(where.split("/"))) == moved


def test_layout_update_of_an_unchanged_project(
    layout_releases: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    project, _ = _flat_project(layout_releases, tmp_path / "project")

    report = _layout_update(project, capfd)

    assert report == "layout migration: nothing to move\n"
    _assert_new_layout(project)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == LAYOUT_RELEASE


@pytest.mark.parametrize("conflict", ["inline", "rej"])
def test_layout_update_brings_local_changes_to_the_moved_modules(
    layout_releases: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], conflict: str
):
    project, package = _flat_project(layout_releases, tmp_path / "project")
    monitor = package / "monitor.py"
    ours = "\n\ndef our_checksum(path):\n    from .fileio import file_md5\n\n"
    ours += "    return file_md5(path)\n"
    monitor.write_text(monitor.read_text(encoding="utf-8") + ours, encoding="utf-8")
    _replace_line(package / "registry.py", 'CHAMPION = "champion"', 'CHAMPION = "production"')
    (package / "notify.py").write_text("from .config import ProjectError\n", encoding="utf-8")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "our changes")

    report = _layout_update(project, capfd, conflict=conflict)

    assert "def our_checksum(path):\n    from ..core.fileio import file_md5\n" in (
        package / "monitoring" / "monitor.py"
    ).read_text(encoding="utf-8")
    assert '\nCHAMPION = "production"\n' in (package / "registry" / "store.py").read_text(
        encoding="utf-8"
    )
    top = f"src/{PACKAGE}"
    assert f"{top}/monitor.py -> {top}/monitoring/monitor.py: your changes merged cleanly" in report
    assert f"{top}/registry.py -> {top}/registry/store.py: your changes merged cleanly" in report
    # The project's own module stays, named, with its import of a moved module.
    assert f"{top}/: notify.py not the template's, left where they are" in report
    assert f"naming no module of the new layout: {top}/notify.py:1:" in report
    (package / "notify.py").unlink()
    _assert_new_layout(project)
    # Run again, the migration changes nothing.
    status = git(project, "status", "--porcelain", "--untracked-files=all")
    before = {p: p.read_bytes() for p in (project / "src").rglob("*") if p.is_file()}
    args = ["--package", PACKAGE, "--template", str(layout_releases), "--from", FLAT_RELEASE]
    rerun = subprocess.run(
        [sys.executable, str(MIGRATE), *args], cwd=project, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "merged" not in rerun.stdout
    assert git(project, "status", "--porcelain", "--untracked-files=all") == status
    assert {p: p.read_bytes() for p in (project / "src").rglob("*") if p.is_file()} == before


def test_layout_update_leaves_conflicts_in_the_new_module(
    layout_releases: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    project, package = _flat_project(layout_releases, tmp_path / "project")
    # The template dropped this list (its modules are found from the imports now); we add to it.
    modules = '"__init__.py", "config.py", "features.py", "fileio.py", "model.py", "pyfunc.py"'
    old = f"MODEL_MODULES = ({modules})"
    _replace_line(package / "registry.py", old, old.replace(")", ', "ours.py")'))
    git(project, "commit", "-qam", "our model module")

    report = _layout_update(project, capfd)

    store = f"src/{PACKAGE}/registry/store.py"
    text = (project / store).read_text(encoding="utf-8")
    assert "<<<<<<< before updating" in text
    assert '"pyfunc.py", "ours.py")' in text
    assert ">>>>>>> after updating" in text
    assert f"resolve the markers left in {store}" in report
    # Unmerged in the index, as Copier leaves its own conflicts: base, ours, theirs.
    unmerged = git(project, "ls-files", "--unmerged", "--", store).splitlines()
    assert [line.split()[2] for line in unmerged] == ["1", "2", "3"]
    assert not (package / "registry.py").exists()


def test_layout_migration_where_the_old_modules_are_still_there(
    layout_releases: Path, tmp_path: Path
):
    """Where an update leaves the old modules (a Copier that does not delete them), the migration
    reads the project's version from the file and removes every old module."""
    project, package = _flat_project(layout_releases, tmp_path / "project")
    monitor = package / "monitor.py"
    monitor.write_text(monitor.read_text(encoding="utf-8") + "\n\nOURS = 1\n", encoding="utf-8")
    git(project, "commit", "-qam", "ours")
    # The new release's files over the project, nothing deleted.
    template = layout_releases / "template"
    shutil.copytree(template / "src" / "{{package_name}}", package, dirs_exist_ok=True)
    (package / "__init__.py.jinja").unlink()
    shutil.copytree(template / "tools", project / "tools", dirs_exist_ok=True)
    args = ["--package", PACKAGE, "--template", str(layout_releases), "--from", FLAT_RELEASE]

    result = subprocess.run(
        [sys.executable, str(MIGRATE), *args], cwd=project, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert "monitoring/monitor.py: your changes merged cleanly" in result.stdout
    assert "21 unchanged old module(s) removed" in result.stdout
    assert (
        (package / "monitoring" / "monitor.py").read_text(encoding="utf-8").endswith("\nOURS = 1\n")
    )
    _assert_new_layout(project)


def test_layout_migration_fails_clearly_without_the_old_release(
    layout_releases: Path, tmp_path: Path
):
    args = ["--package", PACKAGE, "--template", str(layout_releases), "--from", "v0.1.9"]
    result = subprocess.run(
        [sys.executable, str(MIGRATE), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("layout migration: failed: cannot read the old release 'v0.1.9'")
