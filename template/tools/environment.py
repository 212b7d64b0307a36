"""The one environment every Nox session shares: ``uv sync --locked`` from ``uv.lock``, with the
PyTorch build this machine wants. Imported by ``noxfile.py`` (with Nox's own Python, before the
environment exists: standard library, nox and packaging only).

Why `uv sync` alone does not install torch. A lock holding each build (uv's documented `cpu` /
`cu128` extras, each from its PyTorch index) can only be made where download.pytorch.org
answers, and a wheel-folder override would be written into it as a path no other machine has.
So uv.lock resolves torch from PyPI like the rest and stays portable: it pins torch's version
and everything else, with hashes. PyPI's Linux build is the CUDA one (GBs of nvidia-* wheels,
listed in the lock), so outside macOS the sync leaves out torch and what only that build needs,
and torch==<locked> comes in the build this machine wants, through uv's `--torch-backend` or an
override. The cost: the build itself is not hash-locked, only its version. On macOS PyPI's
build (MPS) is the right one and comes from the lock. torch is the `torch` extra, so that a
bare `uv run` (which syncs without extras, keeping what is there) never swaps the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import nox
from packaging.utils import parse_wheel_filename

# For the commands. Bytecode caches stay on even where PYTHONDONTWRITEBYTECODE is set (CI images
# often set it): without them every stage compiles torch and mlflow from source, 10-20 s a time.
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": None}


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is installed: what uv's own `--torch-backend auto` looks for."""
    files = ("/sys/module/nvidia/version", "/proc/driver/nvidia/version")
    return any(Path(f).exists() for f in files) or shutil.which("nvidia-smi") is not None


def torch_install(
    version: str,
    environ: Mapping[str, str],
    backend: str,
    driver: Callable[[], bool] = nvidia_driver,
    platform: str = sys.platform,
) -> list[str]:
    """`uv pip install` arguments for torch ``version`` in this machine's build ([]: the locked).

    ``backend``: the accelerator answer, as uv's ``--torch-backend`` names it.
    """
    if folder := environ.get("TORCH_FIND_LINKS"):
        return ["--no-index", "--find-links", folder, f"torch=={version}"]
    if index := environ.get("TORCH_INDEX_URL"):
        return ["--index", index, f"torch=={version}"]
    if platform == "darwin":
        return []
    backend = environ.get("UV_TORCH_BACKEND") or backend
    if backend == "auto" and not driver():
        backend = "cpu"
    # With a local tag (2.9.1+cpu) uv replaces a torch of another build; auto keeps any build.
    build = "" if backend == "auto" else f"+{backend}"
    return ["--torch-backend", backend, f"torch=={version}{build}"]


def cuda_only(packages: Iterable[dict]) -> set[str]:
    """Names in uv.lock that only PyPI's CUDA build of torch needs (nvidia-*, triton, ...).

    Those are torch's dependencies under a platform marker, and theirs, less whatever the
    project also needs another way (its other dependencies, the CPU build's own).
    """
    edges: dict[str, list[dict]] = {}
    for package in packages:
        groups = [
            package.get("dependencies", []),
            *package.get("optional-dependencies", {}).values(),
            *package.get("dev-dependencies", {}).values(),
        ]
        edges.setdefault(package["name"], []).extend(dep for group in groups for dep in group)

    def gated(name: str, dep: dict) -> bool:
        return name == "torch" and "platform" in dep.get("marker", "")

    def reach(names: Iterable[str], skip: Callable[[str, dict], bool]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += [d["name"] for d in edges.get(name, []) if not skip(name, d)]
        return seen

    cuda = reach([d["name"] for d in edges.get("torch", []) if gated("torch", d)], lambda *_: False)
    others = reach([n for n in edges if n != "torch" and n not in cuda], gated)
    return cuda - others


def lock(session: nox.Session, *args: str) -> None:
    """`uv lock`; with TORCH_FIND_LINKS, torch at the newest version its folder holds."""
    if folder := os.environ.get("TORCH_FIND_LINKS"):
        wheels = Path(folder.removeprefix("file://")).glob("torch-*.whl")
        if versions := [parse_wheel_filename(w.name)[1] for w in wheels]:
            args = ("--upgrade-package", f"torch=={max(versions).public}", *args)
    session.run("uv", "lock", *args, external=True)


def sync(
    session: nox.Session, venv: Path, python: str, backend: str, compile: bool = False
) -> dict[str, str | None]:
    """Bring the environment ``venv`` up to date (uv.lock, this machine's torch); return its env.

    ``compile``: write the bytecode of every installed package now (uv compiles the whole
    environment, ~0.5 s even when nothing changed, so only `nox -s install` asks for it).
    """
    lock_file = Path("uv.lock")
    if not lock_file.exists():
        session.log("No uv.lock yet: locking the dependencies (commit uv.lock afterwards)")
        lock(session)
    version, cuda = lock_facts(lock_file, venv)
    torch = torch_install(version, os.environ, backend)
    # uv compiles the whole environment whichever command asks: the last one does.
    compiled = ["--compile-bytecode"] if compile else []
    command = ["uv", "sync", "--locked", "--python", python, "--extra", "torch"]
    if torch:
        # --inexact: keep the torch installed below (and a CUDA build's own nvidia-* wheels).
        skip = ["torch", *cuda]
        command += ["--inexact", *(f"--no-install-package={name}" for name in skip)]
    session.run(*command, *([] if torch else compiled), external=True)
    if torch and (compile or not torch_installed(venv, torch[-1])):
        pip = ["uv", "pip", "install", "--python", str(venv), *compiled]
        session.run(*pip, *torch, external=True)
    return ENV


def lock_facts(lock_file: Path, venv: Path) -> tuple[str, list[str]]:
    """torch's locked version and :func:`cuda_only`'s names, read from ``lock_file``.

    Parsing uv.lock (1.5 MB, pure-Python TOML) took 0.2-0.35 s, before every session's first
    command: the answer is kept in the environment, keyed by the lock's SHA-256 (2 ms).
    """
    data = lock_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache = venv / ".lock-facts.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        kept = json.loads(cache.read_text(encoding="utf-8"))
        if kept["sha256"] == digest:
            return str(kept["torch"]), [str(name) for name in kept["cuda_only"]]
    packages = tomllib.loads(data.decode("utf-8"))["package"]
    version = next(p["version"] for p in packages if p["name"] == "torch")
    cuda = sorted(cuda_only(packages))
    if venv.is_dir():  # `uv sync` makes it; the next session keeps the answer
        facts = {"sha256": digest, "torch": version, "cuda_only": cuda}
        partial = cache.with_name(f"{cache.name}.{os.getpid()}")
        try:
            partial.write_text(json.dumps(facts), encoding="utf-8")
            os.replace(partial, cache)
        except OSError:  # a full disk or a read-only environment: parsed again next time
            partial.unlink(missing_ok=True)
    return version, cuda


def torch_installed(venv: Path, requirement: str) -> bool:
    """Whether ``torch==V`` (or ``V+build``) is what the environment holds: `uv pip install`
    would change nothing (it answers in ~0.15 s, this in ~1 ms: it runs before every command)."""
    wanted = requirement.partition("==")[2]
    dists = [*venv.glob("*/*/torch-*.dist-info"), *venv.glob("*/*/*/torch-*.dist-info")]
    found = [p.name.removeprefix("torch-").removesuffix(".dist-info") for p in dists]
    return any(v == wanted or ("+" not in wanted and v.split("+")[0] == wanted) for v in found)


def run(
    session: nox.Session, venv: Path, *args: str, env: dict[str, str | None], **kwargs
) -> str | bool | None:
    """Run a program of the project environment, activated (its bin folder first on PATH).

    As `uv run --no-sync` would, without a uv process before each command.
    """
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    active = {"VIRTUAL_ENV": str(venv), "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    program = shutil.which(args[0], path=str(bin_dir)) or args[0]
    return session.run(program, *args[1:], env={**env, **active}, external=True, **kwargs)
