"""Helpers shared by the template's tests and noxfile (stdlib only at import time).

Also a small CLI for the noxfile: ``python tests/helpers.py render-example DST``.
"""

from __future__ import annotations

import fcntl
import filecmp
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "generated-example"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What legitimately differs between two renders of the same answers.
VOLATILE = {".git", ".venv", ".nox", "__pycache__", ".pytest_cache", ".ruff_cache"}
ANSWERS = ".copier-answers.yml"


def torch_source_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The generated project's PyTorch wheel-source override to use in tests: never CUDA wheels.

    An explicit TORCH_FIND_LINKS / TORCH_INDEX_URL wins; else a folder of pip's find-links
    holding a torch wheel; else PyTorch's CPU index.
    """
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_FIND_LINKS") or environ.get("TORCH_INDEX_URL"):
        return {}
    for folder in environ.get("PIP_FIND_LINKS", "").split():
        folder = folder.removeprefix("file://")
        if Path(folder).is_dir() and any(Path(folder).glob("torch-*.whl")):
            return {"TORCH_FIND_LINKS": folder}
    return {"TORCH_INDEX_URL": CPU_INDEX}


# System tools the tests run, with the Debian package that brings each (.ci/run installs them).
SYSTEM_TOOLS = {
    "rsync": "rsync",
    "chromium": "chromium",
    "npm": "npm",
    "promtool": "prometheus",
    "prometheus": "prometheus",
}
# Tools no Debian package brings in a usable version: how to get each.
OTHER_TOOLS = {
    # kustomize 5 (tests/test_release.py renders with `kubectl kustomize`); Debian's
    # kubernetes-client is too old.
    "kubectl": "install kubectl 1.27+ (Kubernetes' own apt repository, pkgs.k8s.io)",
}


# A kubeconfig naming a server nothing listens on: kubectl answers "connection refused" at once
# (the release tests' "no cluster reachable").
NO_CLUSTER = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
users: [{name: none, user: {}}]
current-context: none
"""


def system_tool(name: str) -> str:
    """The path of a system tool the tests need; a missing one fails the test in one line.

    Never a skip: a suite that is green only where someone installed a tool by hand hides it.
    """
    path = shutil.which(name)
    if path is None:
        import pytest

        if name in OTHER_TOOLS:
            pytest.fail(f"{name} is missing: {OTHER_TOOLS[name]}", False)
        package = SYSTEM_TOOLS[name]
        pytest.fail(f"{name} is missing: apt-get install {package} (.ci/run installs it)", False)
    return path


# npm linters of the generated pipelines, installed on first use into a cache folder. Pinned:
# gitlab-ci-local 4.74+ and npm-groovy-lint 17+ need Node 22; Node 20 is what CI images carry.
NPM_TOOLS = ("gitlab-ci-local@4.73", "npm-groovy-lint@16.2")


def npm_tools(cache: Path | None = None) -> Path:
    """The bin folder holding NPM_TOOLS (installed there now if missing)."""
    npm = system_tool("npm")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    prefix = cache or base / "mlops-template" / "npm"
    bin_dir = prefix / "node_modules" / ".bin"
    stamp = prefix / "installed.txt"  # what was installed: a new pin reinstalls
    prefix.mkdir(parents=True, exist_ok=True)
    # Parallel test workers install at most once, one at a time.
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists() or stamp.read_text() != " ".join(NPM_TOOLS):
            install = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
            subprocess.run(
                [*install, *NPM_TOOLS], check=True, capture_output=True, stdin=subprocess.DEVNULL
            )
            stamp.write_text(" ".join(NPM_TOOLS))
    return bin_dir


def render(dst: Path, *, tasks: bool = False, pretend: bool = False, **answers: Any) -> Path:
    """Render the template's working tree (uncommitted changes included) into ``dst``.

    Unanswered questions take their defaults; ``tasks=True`` runs the post-copy hook as
    `copier copy --trust` does; ``pretend=True`` asks and validates but writes nothing.
    """
    import copier
    from copier.errors import DirtyLocalWarning

    with warnings.catch_warnings():
        # Expected while developing: the working tree is what is under test.
        warnings.simplefilter("ignore", DirtyLocalWarning)
        copier.run_copy(
            str(ROOT),
            dst,
            data=answers,
            defaults=True,
            unsafe=True,
            skip_tasks=not tasks,
            pretend=pretend,
            # HEAD and the dirty working tree, not the latest tag copier would pick.
            vcs_ref="HEAD",
            quiet=True,
        )
    return dst


def render_example(dst: Path) -> Path:
    """Render the default project as committed in generated-example/: DVC set up, no git repo.

    ``dst`` is emptied first. Its uv.lock starts from generated-example's, so a pin moves only
    where pyproject.toml asks (delete generated-example/uv.lock to move them all forward), and
    it is locked from PyPI alone, whatever wheel folder TORCH_FIND_LINKS names here.
    """
    committed = EXAMPLE / "uv.lock"
    seed = committed.read_bytes() if committed.exists() else None
    shutil.rmtree(dst, ignore_errors=True)
    render(dst)
    # The template is the example's parent folder, wherever the repository is cloned.
    answers = dst / ".copier-answers.yml"
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(
        "".join("_src_path: ..\n" if x.startswith("_src_path:") else x for x in lines)
    )
    subprocess.run(
        [sys.executable, str(ROOT / "hooks" / "post_copy.py"), "--no-git"],
        cwd=dst,
        check=True,
        capture_output=True,
    )
    if seed is not None:
        (dst / "uv.lock").write_bytes(seed)
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_FIND_LINKS"}
    locked = subprocess.run(
        [sys.executable, str(ROOT / "hooks" / "lock.py")],
        cwd=dst,
        env=environ,
        check=True,
        capture_output=True,
        text=True,
    )
    if not (dst / "uv.lock").exists():
        raise RuntimeError(f"the example must carry a uv.lock: {locked.stdout.strip()}")
    return dst


def parse_structured(top: Path) -> int:
    """Parse every YAML, TOML and JSON file under ``top`` (an error names the file); the count."""
    import configparser
    import json
    import tomllib

    import yaml

    def yaml_documents(text: str) -> list:  # Kubernetes manifests hold several
        return list(yaml.safe_load_all(text))

    parsers = {
        ".yml": yaml_documents,
        ".yaml": yaml_documents,
        ".dvc": yaml.safe_load,
        ".toml": tomllib.loads,
        ".json": json.loads,
        ".baseline": json.loads,
        "config": configparser.ConfigParser().read_string,  # .dvc/config: INI
    }
    parsed = 0
    for rel in sorted(tree_files(top)):
        path = top / rel
        parse = parsers.get(path.suffix or path.name)
        if parse is None or (path.name == "config" and path.parent.name != ".dvc"):
            continue
        try:
            parse(path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise AssertionError(f"{path}: {exc}") from exc
        parsed += 1
    return parsed


def tree_files(top: Path) -> set[str]:
    """Relative paths of the files under ``top``, minus what varies between renders."""
    files = set()
    for path in top.rglob("*"):
        rel = path.relative_to(top)
        if path.is_file() and not VOLATILE.intersection(rel.parts):
            files.add(rel.as_posix())
    return files


def tree_diff(expected: Path, actual: Path, ignored: set[str] = frozenset()) -> list[str]:
    """Human-readable differences between two rendered trees."""
    want, have = tree_files(expected) - ignored, tree_files(actual) - ignored
    diff = [f"missing: {p}" for p in sorted(want - have)]
    diff += [f"unexpected: {p}" for p in sorted(have - want)]
    diff += [
        f"differs: {p}"
        for p in sorted(want & have)
        if not filecmp.cmp(expected / p, actual / p, shallow=False)
    ]
    return diff


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "render-example":
        render_example(Path(sys.argv[2]))
    else:
        sys.exit("usage: python tests/helpers.py render-example DST")
