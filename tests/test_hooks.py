"""The post-copy hook: its pure helpers, then the real thing on rendered projects."""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import copier
import pytest
import yaml

HOOK = Path(__file__).resolve().parents[1] / "hooks" / "post_copy.py"
DATASET = "data/raw/breast_cancer.csv"
# `dvc add data/raw/breast_cancer.csv` with DVC 3.67 wrote exactly this.
DVC_ADD_OUTPUT = (
    "outs:\n- md5: e6529e621f438c3873f9c263ee667ef5\n  size: 123865\n  hash: md5\n"
    "  path: breast_cancer.csv\n"
)


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("post_copy", HOOK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = load_hook()


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def run_hook(project: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the hook as copier does: its own interpreter, cwd = the new project."""
    return subprocess.run(
        [sys.executable, str(HOOK), "--dataset", DATASET],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


IDENTITY_ENV = {
    f"GIT_{role}_{part}": "v" for role in ("AUTHOR", "COMMITTER") for part in ("NAME", "EMAIL")
}


def tree_bytes(root: Path) -> dict[Path, bytes]:
    """Every file of the work tree (not .git) with its content."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}


def without_identity(home: Path) -> dict[str, str]:
    """An environment where git finds no user.name / user.email anywhere."""
    hidden = ("GIT_AUTHOR_", "GIT_COMMITTER_", "EMAIL", "GIT_CONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(hidden)}
    home.mkdir(exist_ok=True)
    env |= {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    return env


# --- pure helpers -----------------------------------------------------------------------------


def test_file_md5_is_md5_of_bytes(tmp_path: Path) -> None:
    data = tmp_path / "x.csv"
    data.write_bytes(b"a,b\r\n1,2\r\n")  # CRLF kept: DVC 3 hashes the bytes as they are
    assert hook.file_md5(data) == hashlib.md5(data.read_bytes()).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert hook.file_md5(tmp_path / "empty") == "d41d8cd98f00b204e9800998ecf8427e"


def test_cache_path_splits_md5() -> None:
    md5 = "e6529e621f438c3873f9c263ee667ef5"
    assert hook.cache_path(md5) == Path(".dvc/cache/files/md5/e6/529e621f438c3873f9c263ee667ef5")
    assert hook.cache_path(md5, Path("c")) == Path("c/files/md5/e6/529e621f438c3873f9c263ee667ef5")


def test_dvc_file_text_is_what_dvc_add_writes() -> None:
    text = hook.dvc_file_text("e6529e621f438c3873f9c263ee667ef5", 123865, "breast_cancer.csv")
    assert text == DVC_ADD_OUTPUT
    assert hook.read_dvc_md5(text) == "e6529e621f438c3873f9c263ee667ef5"


def test_read_dvc_md5_without_md5() -> None:
    assert hook.read_dvc_md5("outs:\n- path: x\n") is None


@pytest.mark.parametrize("name", ["plain.csv", "we[ird]#1!.csv", "star*?.csv"])
def test_gitignore_entry_ignores_exactly_that_file(tmp_path: Path, name: str) -> None:
    git(tmp_path, "init", "--quiet")
    (tmp_path / ".gitignore").write_text(hook.gitignore_entry(name) + "\n")
    (tmp_path / name).write_text("x")
    (tmp_path / "other.csv").write_text("x")
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", name, "other.csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.splitlines() == [name]


def test_gitignore_addition_adds_once() -> None:
    assert hook.gitignore_addition("", "/a") == "/a\n"
    assert hook.gitignore_addition("/b", "/a") == "\n/a\n"
    assert hook.gitignore_addition("/a\n/b\n", "/a") == ""
    assert hook.gitignore_addition("/b\n/a", "/a") == ""


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        ({"user.name": "N", "user.email": "e@x.io"}, {}, set()),
        ({}, {}, {"user.name", "user.email"}),
        ({"user.name": "N"}, {}, {"user.email"}),
        ({"user.name": "N"}, {"EMAIL": "e@x.io"}, set()),
        ({}, {"GIT_AUTHOR_NAME": "N", "GIT_AUTHOR_EMAIL": "e@x.io"}, {"user.name", "user.email"}),
        ({}, IDENTITY_ENV, set()),
    ],
)
def test_missing_identity(configured, env, expected) -> None:
    assert set(hook.missing_identity(configured, env)) == expected


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / ".dvc").mkdir()
    assert hook.main(["--project-dir", str(tmp_path), "--dataset", "nope.csv"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: post-copy task failed: nope.csv: no such file")
    assert "dvc add nope.csv" in err
    assert "Traceback" not in err


def test_not_a_dvc_project_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert hook.main(["--project-dir", str(tmp_path), "--dataset", "x.csv"]) == 1
    assert "not a DVC project" in capsys.readouterr().err


# --- the hook against real `dvc add` ---------------------------------------------------------

# Names that `dvc add` writes in every style DVC's YAML dumper has: plain, single- or
# double-quoted, escaped, and folded past 80 columns; each file holds its own name.
ODD_NAMES = [
    *("my data.csv", "a:b", "it's.csv", 'say "hi".csv', "back\\slash", "star*?.csv", ".hidden"),
    *("yes", "no", "on", "off", "y", "null", "Null", "~", "true", "False", "=", "<<"),
    *("1.5", "1e3", "0x1f", "0o17", "1_000", "-1", ".5", ".inf", ".nan", "2024-01-01"),
    *("-x.csv", "- dash", "#x.csv", "a #b", "a: b.csv", ": c", "? q", "! bang", "@at"),
    *("%pct", "&amp", "*star", "|bar", ">gt", "`tick`", "[x].csv", "{x}", "a, b", "---x"),
    *("...x", " lead", "trail ", "tab\tx", "bell\x07", "nbsp\xa0x", "line\u2028sep", "café.csv"),
    *("日本語.csv", "emoji😀.csv", "bom\ufeff"),
    # Folded over several lines: plain, single-quoted, double-quoted (with and without "\\").
    *("word " * 30 + "x", "#" + "word " * 30, "'q' " + "word " * 30, "tab\t " + "word  " * 30),
    # Either side of the 80-column limit, in each style.
    *(f"{'a' * n} bbbbb" for n in (71, 72, 73)),
    *(f"#{'a' * n} bbbbb" for n in (70, 71)),
    *(f"'{'a' * n} bbbbb" for n in (70, 71)),
    *(f"\t{'a' * n}  bbbbb" for n in (68, 69, 70)),
    *("x" * 72, "x" * 73),  # a word too long for the line gets a line of its own
]
# Contents whose md5 reads as a number, so DVC quotes the md5 too.
ODD_CONTENTS = {
    "md5 an int": b"682577\n",  # 61230315635059227299115225839792
    "md5 a float": b"574565\n",  # 630334416415623642455915400846e6
} | {name: name.encode() for name in ODD_NAMES}
# A user's .gitignore, CRLF and no newline at the end: DVC appends to it (a newline first).
PRIOR_GITIGNORE = b"/kept\r\n/also"


def tracked_twice(root: Path) -> tuple[Path, Path]:
    """Track ODD_CONTENTS under ``root``/dvc with real `dvc add`, under ``root``/hook with the hook.

    DVC comes from the test environment (`dvc` is in the test dependency group).
    """
    by_dvc, by_hook = root / "dvc", root / "hook"
    for project in (by_dvc, by_hook):
        (project / "data").mkdir(parents=True)
        (project / "data" / ".gitignore").write_bytes(PRIOR_GITIGNORE)
        for name, content in ODD_CONTENTS.items():
            (project / "data" / name).write_bytes(content)
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root / "site")}

    def dvc(*args: str) -> None:
        command = [sys.executable, "-m", "dvc", *args]
        result = subprocess.run(
            command, cwd=by_dvc, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"dvc {args[0]}: {result.stderr}"

    git(by_dvc, "init", "--quiet")
    dvc("init", "--quiet")
    dvc("add", "--quiet", "--", *(f"data/{name}" for name in ODD_CONTENTS))
    (by_hook / ".dvc").mkdir()
    for name in ODD_CONTENTS:
        hook.track_dataset(by_hook, f"data/{name}")
    return by_dvc, by_hook


@pytest.fixture(scope="module")
def odd_tracked(tmp_path_factory) -> tuple[Path, Path]:
    return tracked_twice(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("name", ODD_CONTENTS)
def test_dvc_file_is_what_dvc_add_writes(odd_tracked, name: str) -> None:
    by_dvc, by_hook = odd_tracked
    dvc_file = Path("data", f"{name}.dvc")
    assert (by_hook / dvc_file).read_bytes() == (by_dvc / dvc_file).read_bytes()


def test_gitignore_is_what_dvc_add_writes(odd_tracked) -> None:
    by_dvc, by_hook = odd_tracked
    written = (by_hook / "data" / ".gitignore").read_bytes()
    assert written == (by_dvc / "data" / ".gitignore").read_bytes()
    assert written.startswith(PRIOR_GITIGNORE + b"\n/")


def test_cache_is_what_dvc_add_leaves(odd_tracked) -> None:
    """Same files, bytes and modes (read-only) under .dvc/cache/files."""

    def cache(project: Path) -> dict[Path, tuple[bytes, int]]:
        files = project / ".dvc" / "cache" / "files"
        return {
            p.relative_to(files): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in files.rglob("*")
            if p.is_file()
        }

    by_dvc, by_hook = odd_tracked
    assert cache(by_hook) == cache(by_dvc)
    assert len(cache(by_hook)) == len(ODD_CONTENTS)


def test_dvc_file_text_is_what_dvcs_dumper_writes() -> None:
    """Random names and md5s through DVC's own YAML dumper, beyond the table above."""
    from dvc.utils.serialize import dumps_yaml

    pieces = [*" \t'\"\\:#-?!&*,[]{}|>%@`~=<.0129eExabnoyNTF\x07\x85\xa0\u2028\ufeffé日😀"]
    pieces += ["  ", "word ", "---", "...", "0x", ".inf", "null", "true", "2024-01-01"]
    rng = random.Random(0)
    for _ in range(2000):
        name = "".join(rng.choices(pieces, k=rng.choice([1, 2, 3, 8, 30, 60])))
        hexdigits = "0123456789e" if rng.random() < 0.5 else "0123456789abcdef"  # numbers too
        md5 = "".join(rng.choices(hexdigits, k=32))
        data = {"outs": [{"md5": md5, "size": 1, "hash": "md5", "path": name}]}
        assert hook.dvc_file_text(md5, 1, name) == dumps_yaml(data), repr(name)


# --- on rendered projects ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(renderer, tmp_path_factory) -> Path:
    """The default project, rendered with the post-copy task, as `copier copy --trust` does."""
    return renderer(tmp_path_factory.mktemp("generated") / "project", tasks=True)


@pytest.fixture(scope="module")
def skeleton(renderer, tmp_path_factory) -> Path:
    """The default project rendered with tasks skipped; copy it before changing it."""
    return renderer(tmp_path_factory.mktemp("skeleton") / "project")


def test_one_commit_and_clean_tree(generated: Path) -> None:
    assert git(generated, "rev-list", "--count", "HEAD") == "1"
    assert git(generated, "log", "-1", "--format=%s") == hook.COMMIT_MESSAGE
    assert git(generated, "branch", "--show-current") == "main"
    assert git(generated, "status", "--porcelain", "--untracked-files=all") == ""


def test_dvc_config_has_the_remote(generated: Path) -> None:
    config = configparser.ConfigParser()
    config.read(generated / ".dvc" / "config", encoding="utf-8")
    remote = config["core"]["remote"]
    assert config[f"'remote \"{remote}\"'"]["url"] == "../../my-ml-project-dvc-storage"
    tracked = git(generated, "ls-files", ".dvc", ".dvcignore").splitlines()
    assert sorted(tracked) == [".dvc/.gitignore", ".dvc/config", ".dvcignore"]


def test_dataset_tracked_by_dvc_not_git(generated: Path) -> None:
    data = generated / DATASET
    md5 = hashlib.md5(data.read_bytes()).hexdigest()
    outs = yaml.safe_load((generated / f"{DATASET}.dvc").read_text())["outs"]
    assert outs == [{"md5": md5, "size": data.stat().st_size, "hash": "md5", "path": data.name}]
    cached = generated / hook.cache_path(md5)
    assert cached.read_bytes() == data.read_bytes()
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444  # read-only, as DVC leaves it
    committed = git(generated, "ls-files").splitlines()
    assert f"{DATASET}.dvc" in committed
    assert DATASET not in committed
    assert not [f for f in committed if f.startswith(".dvc/cache")]
    git(generated, "check-ignore", "--quiet", DATASET)  # raises if not ignored


def test_hook_again_changes_nothing(generated: Path) -> None:
    head = git(generated, "rev-parse", "HEAD")
    before = tree_bytes(generated)
    result = run_hook(generated)
    assert result.returncode == 0, result.stderr
    assert "already" in result.stdout
    assert git(generated, "rev-parse", "HEAD") == head
    assert git(generated, "status", "--porcelain", "--untracked-files=all") == ""
    assert tree_bytes(generated) == before


def test_works_without_git_identity(skeleton: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(skeleton, project)
    env = without_identity(tmp_path / "home")
    result = run_hook(project, env)
    assert result.returncode == 0, result.stderr
    assert "no identity configured" in result.stdout
    author = git(project, "log", "-1", "--format=%an <%ae>|%cn <%ce>", env=env)
    fallback = f"{hook.FALLBACK_NAME} <{hook.FALLBACK_EMAIL}>"
    assert author == f"{fallback}|{fallback}"
    # Only that commit used it: no configuration was written anywhere.
    assert not list((tmp_path / "home").iterdir())
    local = subprocess.run(
        ["git", "config", "--local", "--get-regexp", "^user\\."], cwd=project, env=env, check=False
    )
    assert local.returncode == 1


def test_project_inside_another_repository_gets_its_own(skeleton: Path, tmp_path: Path) -> None:
    git(tmp_path, "init", "--quiet")
    project = tmp_path / "project"
    shutil.copytree(skeleton, project)
    result = run_hook(project)
    assert result.returncode == 0, result.stderr
    assert Path(git(project, "rev-parse", "--show-toplevel")).resolve() == project.resolve()
    assert git(project, "rev-list", "--count", "HEAD") == "1"


def test_existing_repository_is_not_committed_to(skeleton: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(skeleton, project)
    git(project, "init", "--quiet")
    git(
        project,
        "-c",
        "user.name=U",
        "-c",
        "user.email=u@x.io",
        "commit",
        "-qm",
        "mine",
        "--allow-empty",
    )
    result = run_hook(project)
    assert result.returncode == 0, result.stderr
    assert git(project, "log", "--format=%s") == "mine"
    assert (project / f"{DATASET}.dvc").exists()  # tracked, left for the user to commit


def test_no_git_tracks_the_default_dataset_only(skeleton: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(skeleton, project)
    assert hook.main(["--project-dir", str(project), "--no-git"]) == 0
    assert hook.read_dvc_md5((project / f"{DATASET}.dvc").read_text()) == hook.file_md5(
        project / DATASET
    )
    assert not (project / ".git").exists()


def test_git_missing_is_a_clear_error(skeleton: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    shutil.copytree(skeleton, project)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert hook.main(["--project-dir", str(project)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: post-copy task failed: git is not installed")
    assert "git init -b main" in err


def test_update_does_not_run_the_hook(tmp_path: Path, capfd) -> None:
    """`copier update` brings template changes but never re-runs the post-copy task."""
    template = tmp_path / "template"
    root = HOOK.parents[1]
    listed = git(root, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for name in filter(None, listed.split("\0")):
        if (root / name).is_file() and not name.startswith("generated-example/"):
            (template / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, template / name)
    me = ["-c", "user.name=T", "-c", "user.email=t@example.com"]

    def release(tag: str) -> None:
        git(template, "add", "--all")
        git(template, *me, "commit", "--quiet", "--allow-empty", "-m", tag)
        git(template, "tag", tag)

    git(template, "init", "--quiet")
    release("1.0.0")
    project = tmp_path / "project"
    copier.run_copy(str(template), project, defaults=True, unsafe=True, quiet=True)
    assert "post-copy: git: repository created" in capfd.readouterr().out
    with (template / "template" / ".gitignore").open("a") as f:
        f.write("added-in-1.0.1/\n")
    release("1.0.1")

    copier.run_update(project, defaults=True, overwrite=True, unsafe=True, quiet=True)
    assert "post-copy" not in capfd.readouterr().out
    assert "added-in-1.0.1/" in (project / ".gitignore").read_text()
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"] == "1.0.1"
    assert git(project, "rev-list", "--count", "HEAD") == "1"
