"""Post-copy task: lock the new project's dependencies into uv.lock, before its first commit.

Copier runs this with its own Python (often `uvx copier`), so it uses the standard library only
and needs nothing but `uv` on PATH. It never fails the copy: without uv, or offline, it says so
and `nox -s install` makes the lock on first use instead (commit it then).

uv.lock comes from PyPI alone, so it is portable; the PyTorch build is chosen per machine at
install time (the project's noxfile says why). With TORCH_FIND_LINKS naming a folder of torch
wheels (air-gapped machines, CI caches), torch is locked at the newest version that folder
holds, so the folder can install what the lock pins: the project's `nox -s lock` does the same.

    python hooks/lock.py [--project-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# The release part of a torch wheel's version: torch-2.13.0+cpu-cp311-...whl -> 2.13.0
TORCH_WHEEL = re.compile(r"^torch-(\d+(?:\.\d+)*)[-+]")
LATER = "`nox -s install` locks on first use (then commit uv.lock)"


def folder_torch_version(folder: Path) -> str | None:
    """Return the newest torch release among the wheels in ``folder``, or None."""
    if not folder.is_dir():
        return None
    versions = [m.group(1) for p in folder.iterdir() if (m := TORCH_WHEEL.match(p.name))]
    return max(versions, key=lambda v: tuple(map(int, v.split("."))), default=None)


def lock_command(environ: Mapping[str, str]) -> list[str]:
    """Return the `uv lock` command line for this environment."""
    folder = Path(environ.get("TORCH_FIND_LINKS", "").removeprefix("file://"))
    version = folder_torch_version(folder) if folder != Path() else None
    return ["uv", "lock", *(["--upgrade-package", f"torch=={version}"] if version else [])]


def uv_error(result: subprocess.CompletedProcess[str]) -> str:
    """Return uv's error in one line: its first error line and its deepest cause."""
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith("error")), None)
    said = " / ".join(dict.fromkeys(x for x in (first, lines[-1] if lines else None) if x))
    return f"failed ({said or f'exit status {result.returncode}'})"


def lock(root: Path, environ: Mapping[str, str]) -> str:
    """Lock the project at ``root``; return a one-line report (failures included)."""
    if shutil.which("uv") is None:
        return f"uv.lock not made: uv is not on PATH; {LATER}"
    command = lock_command(environ)
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"uv.lock not made: `{' '.join(command)}` {uv_error(result)}; {LATER}"
    return f"uv.lock made: `{' '.join(command)}`"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project-dir", type=Path, default=Path(), help="the new project (default: cwd)"
    )
    args = parser.parse_args(argv)
    print(f"post-copy: {lock(args.project_dir.resolve(), os.environ)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
