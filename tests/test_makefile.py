"""`make` on a machine with only Python, git and make: it installs uv and nox itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_make_bootstraps_uv_and_nox_without_them_on_path(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    path = os.pathsep.join([str(bare), "/usr/bin", "/bin"])
    assert not shutil.which("uv", path=path), "the test needs a PATH without uv"
    assert not shutil.which("nox", path=path), "the test needs a PATH without nox"
    tools = tmp_path / "tools"
    env = {**os.environ, "PATH": path}
    make = ["make", "-s", "-f", str(ROOT / "Makefile"), f"TOOLS={tools}"]

    subprocess.run([*make, "tools"], cwd=tmp_path, env=env, check=True, timeout=600)

    for tool in ("uv", "nox"):
        subprocess.run([tools / "bin" / tool, "--version"], check=True, capture_output=True)
    # The targets call the tools environment's nox, with its uv first on PATH for the sessions.
    planned = subprocess.run(
        [*make, "-n", "test"], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout
    assert planned.split() == [str(tools / "bin" / "nox"), "-s", "lint", "suite"]
    found = subprocess.run(
        [*make, "--eval", "where:\n\t@command -v uv; command -v nox", "where"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert found == [str(tools / "bin" / "uv"), str(tools / "bin" / "nox")]
