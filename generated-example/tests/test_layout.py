"""The package's layout: imports flow one way down the loop, every dependency list is derived
from the imports (DVC's stage deps, the Bento, the MLflow model's code, the resume fingerprint),
and every module imports without side effects."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import my_ml_project
from my_ml_project.core import layout
from my_ml_project.core.fileio import atomic_path, atomic_write_text
from my_ml_project.core.paths import PACKAGE, module

ROOT = Path(__file__).resolve().parents[1]
# The loop, bottom to top: a subpackage imports only from its own floor or floors below.
FLOORS = {
    "core": 0,
    "data": 1,
    "model": 2,
    "registry": 3,
    "training": 4,
    "evaluation": 4,
    "serving": 5,
    "monitoring": 6,
}
MODULES = sorted(
    info.name.removeprefix(f"{PACKAGE}.")
    for info in pkgutil.walk_packages(my_ml_project.__path__, f"{PACKAGE}.")
    if not info.ispkg
)


def test_every_module_sits_in_a_known_subpackage() -> None:
    assert MODULES, "no modules found"
    assert {name.split(".")[0] for name in MODULES} == set(FLOORS)


@pytest.mark.parametrize("name", MODULES)
def test_imports_flow_one_way_down(name: str) -> None:
    floor = FLOORS[name.split(".")[0]]
    for imported in layout.closure(name):
        assert FLOORS[imported.split(".")[0]] <= floor, f"{name} imports {imported}, a floor above"


def _stage_deps() -> dict[str, tuple[str, set[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    prefix = f"src/{PACKAGE}/"
    out = {}
    for name, stage in stages.items():
        entry = stage["cmd"].split(" -m ", 1)[1].split()[0].removeprefix(f"{PACKAGE}.")
        folders = {d.removeprefix(prefix) for d in stage["deps"] if d.startswith(prefix)}
        out[name] = (entry, folders)
    return out


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate"])
def test_dvc_stage_deps_are_the_subpackages_the_stage_imports(stage: str) -> None:
    """Neither fewer (a stale `dvc repro`) nor more (code the stage never runs re-running it)."""
    entry, folders = _stage_deps()[stage]
    assert folders == {"__init__.py", *layout.subpackages(entry)}


def test_the_bento_and_the_mlflow_model_ship_only_what_they_import() -> None:
    assert layout.subpackages("serving.service") == ("core", "model", "serving")
    assert layout.subpackages("model.pyfunc") == ("core", "model")
    shipped = {p.relative_to(layout.ROOT).parts[0] for p in layout.source_files("serving.service")}
    assert shipped == {"__init__.py", "core", "model", "serving"}


def test_the_resume_fingerprint_ignores_code_training_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / PACKAGE
    shutil.copytree(layout.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(layout, "ROOT", copy)
    layout.closure.cache_clear()
    before = layout.source_digest("training.train")
    with (copy / "monitoring" / "monitor.py").open("a") as fh:
        fh.write("\n# an edit training never runs\n")
    assert layout.source_digest("training.train") == before
    with (copy / "training" / "loop.py").open("a") as fh:
        fh.write("\n# an edit to the loop\n")
    assert layout.source_digest("training.train") != before
    layout.closure.cache_clear()


@pytest.mark.slow
def test_every_module_imports_without_side_effects(tmp_path: Path) -> None:
    """Importing writes no file, reads no model, and needs no params.yaml or store."""
    names = [module(name) for name in MODULES]
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)\n"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["HOME"] = str(tmp_path / "home")  # tools that write to ~ on import would show there too
    result = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_files_get_the_mode_an_ordinary_write_would(tmp_path: Path, umask: int) -> None:
    """Mode bits, not access: tests often run as root, where every permission check passes."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "written.json", "{}\n")
        with atomic_path(tmp_path / "chunked.parquet") as tmp:
            tmp.write_bytes(b"data")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("written.json", "chunked.parquet"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
