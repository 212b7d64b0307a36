"""Post-copy task: version the sample dataset with DVC and make the first git commit.

Copier runs this with its own Python, often from an isolated tool environment (`uvx copier`),
where neither DVC nor the project's packages can be imported. So it uses the standard library
only, writes DVC's files itself byte for byte as `dvc add` would (DVC 3: plain md5 of the bytes;
the `.dvc` file as DVC's ruamel.yaml dumps it, see ruamel_scalar.py), and needs nothing but `git`
on PATH. The template already renders `.dvc/config`, `.dvc/.gitignore` and `.dvcignore`, the
files `dvc init` creates.

Run again, it changes nothing: a tracked dataset and a repository with commits are left alone.

    python hooks/post_copy.py [--dataset data/raw/breast_cancer.csv] [--project-dir DIR] [--no-git]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# The helper module beside this file; its folder is on sys.path when run as a script, but not
# under `python -P` / PYTHONSAFEPATH or when a test loads this file by path.
if str(HERE := Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(HERE))
import ruamel_scalar

DEFAULT_DATASET = "data/raw/breast_cancer.csv"
COMMIT_MESSAGE = "Initial commit from mlops-template"
BRANCH = "main"
FALLBACK_NAME = "mlops-template"
FALLBACK_EMAIL = "mlops-template@users.noreply.localhost"
CHUNK = 1 << 20
# Set when copier itself runs under git (a hook, pre-commit): they would point git elsewhere.
REPO_LOCATION_VARS = frozenset(
    {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR"}
)
KEEP_PROJECT = (
    "copier deletes a new project when a task fails: pass --no-cleanup to keep it, "
    "or --skip-tasks and run these steps yourself"
)


class HookError(Exception):
    """An expected failure; the message says what failed and how to finish by hand."""


# --- DVC: pure helpers ------------------------------------------------------------------------


def file_md5(path: Path) -> str:
    """Return the md5 DVC 3 records for a file: the md5 of its bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(md5: str, cache_dir: Path = Path(".dvc/cache")) -> Path:
    """Return where DVC 3 keeps the content with this md5 in its cache."""
    return cache_dir / "files" / "md5" / md5[:2] / md5[2:]


def dvc_file_text(md5: str, size: int, name: str) -> str:
    """Return the text `dvc add` writes to ``<name>.dvc`` (``name`` relative to that file)."""
    # Each value follows its key's colon at that column; folded lines start at column 4.
    return (
        f"outs:\n- md5:{ruamel_scalar.scalar(md5, column=6, indent=4)}\n"
        f"  size: {size}\n  hash: md5\n"
        f"  path:{ruamel_scalar.scalar(name, column=7, indent=4)}\n"
    )


def read_dvc_md5(text: str) -> str | None:
    """Return the md5 recorded in a single-output .dvc file, or None."""
    match = re.search(r"^-?\s*md5:\s*[\"']?([0-9a-f]{32})[\"']?\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def gitignore_entry(name: str) -> str:
    """Return the line DVC adds to the .gitignore beside a tracked file (escaped like DVC)."""
    return "/" + "".join(f"\\{c}" if c in "\\[]!*#?" else c for c in name)


def gitignore_addition(text: str, entry: str) -> str:
    """Return what DVC appends to a .gitignore holding ``text`` to add ``entry`` ('' if there).

    ``text`` is read in text mode (newlines as "\\n"); a last line without one gets one first.
    DVC adds nothing when git already ignores the file; here, only the entry itself counts.
    """
    if entry in text.split("\n"):
        return ""
    prefix = "\n" if text and not text.endswith("\n") else ""
    return f"{prefix}{entry}\n"


# --- DVC: effects -----------------------------------------------------------------------------


def store_in_cache(data: Path, md5: str, cache_dir: Path) -> Path:
    """Copy ``data`` into the DVC cache (read-only, as DVC leaves it); return the cache file."""
    target = cache_path(md5, cache_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial")
    partial.unlink(missing_ok=True)  # read-only leftover of an interrupted run
    shutil.copyfile(data, partial)
    partial.chmod(0o444)
    os.replace(partial, target)
    return target


def track_dataset(root: Path, dataset: str) -> str:
    """Track ``dataset`` (relative to ``root``) with DVC as `dvc add` would; return a report."""
    if not (root / ".dvc").is_dir():
        raise HookError(
            f"{root / '.dvc'} is missing: this is not a DVC project. "
            f"Run `dvc init` in the project, then `dvc add {dataset}`."
        )
    data = root / dataset
    dvc_file = data.with_name(data.name + ".dvc")
    if dvc_file.exists():
        recorded = read_dvc_md5(dvc_file.read_text(encoding="utf-8"))
        if not data.is_file() or recorded != file_md5(data):
            return f"{dataset}: already tracked by {dvc_file.name}; left as it is"
    elif not data.is_file():
        raise HookError(f"{dataset}: no such file, so it cannot be tracked with DVC.")
    md5 = file_md5(data)
    store_in_cache(data, md5, root / ".dvc" / "cache")
    text = dvc_file_text(md5, data.stat().st_size, data.name)
    changed = not dvc_file.exists() or dvc_file.read_text(encoding="utf-8") != text
    if changed:
        dvc_file.write_text(text, encoding="utf-8")
    ignore = data.parent / ".gitignore"
    old = ignore.read_text(encoding="utf-8") if ignore.exists() else ""
    if addition := gitignore_addition(old, gitignore_entry(data.name)):
        with ignore.open("a", encoding="utf-8") as f:  # appends as DVC does, newlines included
            f.write(addition)
        changed = True
    return f"{dataset}: {'tracked with DVC' if changed else 'already tracked'} (md5 {md5})"


# --- git --------------------------------------------------------------------------------------


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run git in ``root``; on failure raise HookError with git's own message."""
    env = {k: v for k, v in os.environ.items() if k not in REPO_LOCATION_VARS}
    try:
        result = subprocess.run(
            ["git", *args], cwd=root, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise HookError("git is not installed or not on PATH.") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise HookError(f"`git {' '.join(args)}` failed: {detail}")
    return result


def is_repo_root(root: Path) -> bool:
    """Tell whether ``root`` is the top of a git work tree (not merely inside another one)."""
    result = git(root, "rev-parse", "--show-toplevel", check=False)
    return result.returncode == 0 and Path(result.stdout.strip()).resolve() == root.resolve()


def has_commits(root: Path) -> bool:
    """Tell whether the repository at ``root`` has a commit on HEAD."""
    return git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode == 0


def missing_identity(configured: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """Return the ``-c`` settings a commit needs: fallbacks only for what git cannot find.

    ``configured`` maps ``user.name``/``user.email`` to the values git config has (if any).
    """
    fallbacks: dict[str, str] = {}
    if not configured.get("user.name") and not (
        env.get("GIT_AUTHOR_NAME") and env.get("GIT_COMMITTER_NAME")
    ):
        fallbacks["user.name"] = FALLBACK_NAME
    if not configured.get("user.email") and not (
        env.get("EMAIL") or (env.get("GIT_AUTHOR_EMAIL") and env.get("GIT_COMMITTER_EMAIL"))
    ):
        fallbacks["user.email"] = FALLBACK_EMAIL
    return fallbacks


def configured_identity(root: Path) -> dict[str, str]:
    """Read user.name and user.email as git sees them in ``root`` (any config level)."""
    values = {}
    for key in ("user.name", "user.email"):
        result = git(root, "config", "--get", key, check=False)
        if result.returncode == 0 and result.stdout.strip():
            values[key] = result.stdout.strip()
    return values


def initial_commit(root: Path) -> str:
    """Create the repository (branch main) and commit everything; return a report."""
    create = not is_repo_root(root)
    if not create and has_commits(root):
        return "git: already a repository with commits; nothing committed (commit yourself)"
    if create:
        # DVC wants the project root to be the git root, even inside another repository.
        git(root, "init", "--quiet")
        git(root, "symbolic-ref", "HEAD", f"refs/heads/{BRANCH}")
    git(root, "add", "--all")
    fallbacks = missing_identity(configured_identity(root), dict(os.environ))
    settings = [arg for key, value in fallbacks.items() for arg in ("-c", f"{key}={value}")]
    git(root, *settings, "commit", "--quiet", "-m", COMMIT_MESSAGE)
    report = f"git: {'repository created, ' if create else ''}first commit {COMMIT_MESSAGE!r}"
    if fallbacks:
        who = f"{fallbacks.get('user.name', '')} <{fallbacks.get('user.email', '')}>"
        report += (
            f"\ngit: no identity configured, so this one commit used {', '.join(fallbacks)} "
            f"from the fallback {who.strip()}; your git config is unchanged. Set yours with "
            '`git config --global user.name "..."` and `git config --global user.email ...`, '
            "then `git commit --amend --reset-author --no-edit`."
        )
    return report


# --- entry point ------------------------------------------------------------------------------


def manual_steps(datasets: Sequence[str]) -> str:
    """Return the commands that do this hook's work by hand."""
    adds = "".join(f"  dvc add {d}\n" for d in datasets)
    return (
        "To finish by hand, in the project folder:\n"
        f"{adds}"
        f"  git init -b {BRANCH} && git add --all && git commit -m '{COMMIT_MESSAGE}'\n"
        f"({KEEP_PROJECT}.)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="PATH",
        help=f"file to track with DVC, from the project root; repeatable ({DEFAULT_DATASET})",
    )
    parser.add_argument(
        "--project-dir", type=Path, default=Path(), help="the new project (default: cwd)"
    )
    parser.add_argument(
        "--no-git", action="store_true", help="track the data only: no repository, no commit"
    )
    args = parser.parse_args(argv)
    args.dataset = args.dataset or [DEFAULT_DATASET]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root: Path = args.project_dir.resolve()
    try:
        for dataset in args.dataset:
            print(f"post-copy: {track_dataset(root, dataset)}")
        if not args.no_git:
            print(f"post-copy: {initial_commit(root)}")
    except (HookError, OSError) as exc:
        print(f"error: post-copy task failed: {exc}", file=sys.stderr)
        print(manual_steps(args.dataset), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
