"""The generated project's uv.lock and PyTorch build: the copy-time lock, the plan, the install.

Fast tests check the lock task, the committed example's lock and the noxfile's choice of PyTorch
build with a fake driver probe; the ``e2e`` ones install from the lock (the shared ``pristine``
environment, CPU torch from the wheel folder) and check what is in the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import nox
import pytest
import yaml
from e2e import PACKAGE, Project
from helpers import EXAMPLE, ROOT

HOOK = ROOT / "hooks" / "lock.py"
VERSION = "2.9.1"
# What PyPI's Linux torch brings for its CUDA build, and what a CPU install must never hold.
# NVML's bindings (nvidia-ml-py: pure Python, for GPU monitoring) are no CUDA runtime.
CUDA_PREFIXES = ("nvidia-", "cuda-")
NOT_CUDA = {"nvidia-ml-py"}


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = load(HOOK, "lock_hook")


def is_cuda_runtime(name: str) -> bool:
    return (name.startswith(CUDA_PREFIXES) or name == "triton") and name not in NOT_CUDA


def lock_packages(path: Path) -> list[dict]:
    return tomllib.loads(path.read_text(encoding="utf-8"))["package"]


# --- the copy-time task -----------------------------------------------------------------------


def test_lock_task_runs_on_copy_before_the_first_commit() -> None:
    tasks = yaml.safe_load((ROOT / "copier.yml").read_text(encoding="utf-8"))["_tasks"]
    scripts = [Path(task["command"][1]).name for task in tasks]
    assert scripts.index("lock.py") < scripts.index("post_copy.py")
    lock_task = tasks[scripts.index("lock.py")]
    assert lock_task["command"][0] == "{{ _copier_python }}"
    assert "copy" in lock_task["when"]


def test_torch_is_locked_at_the_wheel_folders_newest_version(tmp_path: Path) -> None:
    for name in (
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch-2.9.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torchvision-0.30.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    ):
        (tmp_path / name).touch()
    assert hook.folder_torch_version(tmp_path) == "2.13.0"
    assert hook.lock_command({"TORCH_FIND_LINKS": str(tmp_path)}) == [
        "uv", "lock", "--upgrade-package", "torch==2.13.0",
    ]  # fmt: skip
    assert hook.lock_command({"TORCH_FIND_LINKS": str(tmp_path / "missing")}) == ["uv", "lock"]
    assert hook.lock_command({}) == ["uv", "lock"]


def fake_program(folder: Path, name: str, script: str) -> str:
    """Write an executable ``name`` running ``script`` (sh) into ``folder``; return the folder."""
    folder.mkdir(exist_ok=True)
    program = folder / name
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    return str(folder)


def run_hook(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HOOK)], cwd=project, env=env, capture_output=True, text=True
    )


def test_without_uv_the_copy_goes_on_with_a_message(tmp_path: Path) -> None:
    result = run_hook(tmp_path, {**os.environ, "PATH": str(tmp_path / "empty")})
    assert result.returncode == 0
    assert "uv.lock not made: uv is not on PATH" in result.stdout
    assert "nox -s install" in result.stdout


def test_offline_the_copy_goes_on_with_uvs_reason(tmp_path: Path) -> None:
    uv_offline = (
        "echo 'Using CPython 3.11' >&2; echo 'error: Failed to fetch: https://pypi.org/simple/mlflow/'"
        " >&2; echo '  Caused by: dns error' >&2; exit 2"
    )
    path = fake_program(tmp_path / "bin", "uv", uv_offline)
    result = run_hook(tmp_path, {**os.environ, "PATH": path})
    assert result.returncode == 0
    assert "uv.lock not made" in result.stdout
    assert "error: Failed to fetch: https://pypi.org/simple/mlflow/ / Caused by: dns error" in (
        result.stdout
    )
    assert not (tmp_path / "uv.lock").exists()


# --- the committed example's lock -------------------------------------------------------------


def test_example_lock_matches_its_pyproject(tmp_path: Path) -> None:
    """`uv sync --locked` accepts it: `uv lock --locked` fails on any mismatch (offline)."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    result = subprocess.run(
        ["uv", "lock", "--locked", "--offline"],
        cwd=tmp_path,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_example_lock_is_portable() -> None:
    """Every package comes from PyPI (torch included), or is the project itself."""
    packages = lock_packages(EXAMPLE / "uv.lock")
    sources = {p["name"]: p["source"] for p in packages}
    assert sources.pop("my-ml-project") == {"editable": "."}
    assert "torch" in sources
    assert all(source == {"registry": "https://pypi.org/simple"} for source in sources.values())


# --- the noxfile's choice of PyTorch build (tools/environment.py; a fake driver probe) ---------


def unregistered_session(*args, **kwargs):
    """`nox.session` registering nothing: three noxfiles define the same sessions."""
    return args[0] if args and callable(args[0]) else (lambda func: func)


@pytest.fixture(scope="module")
def noxfiles(renderer, tmp_path_factory) -> dict[str, ModuleType]:
    """The rendered noxfile of each accelerator answer, imported."""
    answers = {"auto": {}, "cpu": {"accelerator": "cpu"}, "cuda": {"accelerator": "cuda"}}
    modules = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nox, "session", unregistered_session)
        for name, given in answers.items():
            path = renderer(tmp_path_factory.mktemp(name) / "project", **given)
            modules[name] = load(path / "noxfile.py", f"noxfile_{name}")
    return modules


def plan(noxfile: ModuleType, driver: bool, platform: str = "linux", **environ: str) -> list[str]:
    probe: Callable[[], bool] = lambda: driver  # noqa: E731
    backend = noxfile.TORCH_BACKEND
    return noxfile.environment.torch_install(VERSION, environ, backend, probe, platform)


def test_auto_takes_cuda_where_a_driver_is_found(noxfiles) -> None:
    """uv picks the CUDA version the driver supports; any CUDA build of the locked version."""
    assert plan(noxfiles["auto"], driver=True) == ["--torch-backend", "auto", f"torch=={VERSION}"]


def test_auto_takes_the_cpu_build_without_a_driver(noxfiles) -> None:
    cpu = ["--torch-backend", "cpu", f"torch=={VERSION}+cpu"]
    assert plan(noxfiles["auto"], driver=False) == cpu
    assert plan(noxfiles["auto"], driver=False, platform="win32") == cpu


def test_cpu_and_cuda_answers_stay_explicit(noxfiles) -> None:
    for driver in (True, False):
        assert plan(noxfiles["cpu"], driver) == ["--torch-backend", "cpu", f"torch=={VERSION}+cpu"]
        assert plan(noxfiles["cuda"], driver) == [
            "--torch-backend", "cu128", f"torch=={VERSION}+cu128",
        ]  # fmt: skip


def test_macos_keeps_the_locked_pypi_build(noxfiles) -> None:
    for noxfile in noxfiles.values():
        assert plan(noxfile, driver=False, platform="darwin") == []


def test_overrides_win_and_keep_the_locked_version(noxfiles) -> None:
    auto = noxfiles["auto"]
    assert plan(auto, driver=True, UV_TORCH_BACKEND="cpu")[-1] == f"torch=={VERSION}+cpu"
    assert plan(noxfiles["cpu"], driver=False, UV_TORCH_BACKEND="cu126")[:2] == [
        "--torch-backend", "cu126",
    ]  # fmt: skip
    folder = ["--no-index", "--find-links", "/wheels", f"torch=={VERSION}"]
    assert plan(auto, driver=True, platform="darwin", TORCH_FIND_LINKS="/wheels") == folder
    index = "https://mirror.example/whl/cpu"
    assert plan(auto, driver=True, TORCH_INDEX_URL=index) == [
        "--index", index, f"torch=={VERSION}",
    ]  # fmt: skip


def test_driver_probe_finds_nvidia_smi(noxfiles, tmp_path: Path, monkeypatch) -> None:
    noxfile = noxfiles["auto"]
    monkeypatch.setenv("PATH", str(tmp_path))
    if noxfile.environment.nvidia_driver():
        pytest.skip("a driver is loaded here: no machine without one to compare with")
    monkeypatch.setenv("PATH", fake_program(tmp_path, "nvidia-smi", "exit 0"))
    assert noxfile.environment.nvidia_driver()


def test_cuda_only_packages_of_the_example_lock(noxfiles) -> None:
    """PyPI's CUDA build brings nvidia-*, cuda-* and triton; the CPU build needs none of them."""
    packages = lock_packages(EXAMPLE / "uv.lock")
    left_out = noxfiles["auto"].environment.cuda_only(packages)
    names = {p["name"] for p in packages}
    assert left_out == {name for name in names if is_cuda_runtime(name)}
    assert "triton" in left_out
    assert not {"torch", "sympy", "filelock", "mlflow", "my-ml-project"} & left_out


def test_cuda_only_keeps_what_another_package_needs(noxfiles) -> None:
    packages = [
        {"name": "app", "dependencies": [{"name": "torch"}, {"name": "monitor"}]},
        {
            "name": "torch",
            "dependencies": [
                {"name": "sympy"},
                {"name": "nvidia-ml-py", "marker": "sys_platform == 'linux'"},
                {"name": "nvidia-cublas", "marker": "sys_platform == 'linux'"},
            ],
        },
        {"name": "monitor", "dependencies": [{"name": "nvidia-ml-py"}]},
        {"name": "nvidia-cublas", "dependencies": [{"name": "nvidia-cuda-runtime"}]},
        {"name": "nvidia-cuda-runtime"},
        {"name": "nvidia-ml-py"},
        {"name": "sympy"},
    ]
    left_out = noxfiles["auto"].environment.cuda_only(packages)
    assert left_out == {"nvidia-cublas", "nvidia-cuda-runtime"}


def test_lock_facts_are_kept_per_lock_and_read_again_when_it_changes(
    noxfiles, tmp_path: Path
) -> None:
    environment = noxfiles["auto"].environment
    lock, venv = tmp_path / "uv.lock", tmp_path / "venv"
    shutil.copy(EXAMPLE / "uv.lock", lock)
    packages = lock_packages(lock)
    torch = next(p["version"] for p in packages if p["name"] == "torch")
    expected = (torch, sorted(environment.cuda_only(packages)))
    assert environment.lock_facts(lock, venv) == expected  # no environment yet: nothing kept
    assert not venv.exists()
    venv.mkdir()
    assert environment.lock_facts(lock, venv) == expected
    kept = json.loads((venv / ".lock-facts.json").read_text())
    assert (kept["torch"], kept["cuda_only"]) == expected
    # The kept answer is what is read while the lock is the same...
    (venv / ".lock-facts.json").write_text(json.dumps({**kept, "torch": "0.0.1"}))
    assert environment.lock_facts(lock, venv)[0] == "0.0.1"
    # ...and a changed lock (another torch) is parsed again; so is an unreadable cache.
    entry = f'name = "torch"\nversion = "{torch}"'
    lock.write_text(lock.read_text().replace(entry, 'name = "torch"\nversion = "9.9.9"'))
    assert environment.lock_facts(lock, venv)[0] == "9.9.9"
    (venv / ".lock-facts.json").write_text("{not json")
    assert environment.lock_facts(lock, venv)[0] == "9.9.9"
    assert json.loads((venv / ".lock-facts.json").read_text())["torch"] == "9.9.9"
    # A cache that cannot be written (here: a folder in its place) costs a parse, nothing else.
    (venv / ".lock-facts.json").unlink()
    (venv / ".lock-facts.json").mkdir()
    (venv / ".lock-facts.json" / "x").touch()
    assert environment.lock_facts(lock, venv)[0] == "9.9.9"
    assert sorted(p.name for p in venv.iterdir()) == [".lock-facts.json"]  # no partial file left


# --- installing from the lock (e2e) -----------------------------------------------------------


def installed(project: Project) -> dict[str, str]:
    listing = project.run("uv", "pip", "list", "--format", "json", "--python", project.python)
    return {p["name"]: p["version"] for p in json.loads(listing.stdout)}


@pytest.mark.e2e
def test_cpu_install_has_no_cuda_packages(pristine: Project) -> None:
    packages = installed(pristine)
    assert packages["torch"].endswith("+cpu")
    assert not [name for name in packages if is_cuda_runtime(name)]


@pytest.mark.e2e
def test_the_whole_stack_imports(pristine: Project) -> None:
    """A dependency check is not an import check: import what the project uses."""
    modules = "torch, mlflow, mlflow.pytorch, dvc.repo, sklearn, pandas, pyarrow, pydantic, yaml"
    result = pristine.py("-c", f"import {modules}, tqdm, {PACKAGE}; print(torch.__version__)")
    assert result.stdout.strip() == installed(pristine)["torch"]


@pytest.mark.e2e
def test_copy_time_lock_is_committed_current_and_installed(pristine: Project) -> None:
    assert pristine.run("git", "ls-files", "uv.lock").stdout.strip() == "uv.lock"
    pristine.run("uv", "lock", "--locked", "--offline")
    locked: dict[str, set[str]] = {}  # a package may have a version per Python version
    for package in lock_packages(pristine.path / "uv.lock"):
        locked.setdefault(package["name"], set()).add(package["version"])
    have = installed(pristine)
    # The wheel folder's torch, which the copy-time lock pinned; the rest exactly as locked.
    assert {have["torch"].split("+")[0]} == locked["torch"]
    for name in ("mlflow", "dvc", "pandas", "numpy", "pydantic", "sympy", "pytest"):
        assert have[name] in locked[name], name


@pytest.mark.e2e
def test_an_up_to_date_install_changes_nothing(pristine: Project, tmp_path: Path) -> None:
    project = pristine.copy(tmp_path / "again")
    project.nox("install")  # the copy's own editable install of the project
    again = project.nox("install")
    output = again.stdout + again.stderr
    assert "Installed" not in output
    assert "Uninstalled" not in output


@pytest.mark.e2e
def test_a_stale_lock_is_refused(pristine: Project, tmp_path: Path) -> None:
    project = pristine.copy(tmp_path / "stale")
    pyproject = project.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm>=4.66",', '"tqdm>=4.66", "pyjokes",'))
    result = project.nox("install", check=False)
    assert result.returncode != 0
    assert "uv lock" in result.stdout + result.stderr
    assert "pyjokes" not in installed(project)


@pytest.mark.e2e
def test_first_install_makes_the_lock(pristine: Project, tmp_path: Path) -> None:
    project = pristine.copy(tmp_path / "unlocked")
    (project.path / "uv.lock").unlink()
    project.nox("install")
    made, copied = lock_packages(project.path / "uv.lock"), lock_packages(pristine.path / "uv.lock")
    # The same resolution, torch at the same version; other versions may have moved forward
    # since the copy-time lock (a release on PyPI in between: fonttools did, in one CI run).
    assert [p["name"] for p in made] == [p["name"] for p in copied]
    torch = [next(p["version"] for p in lock if p["name"] == "torch") for lock in (made, copied)]
    assert torch[0] == torch[1]
    project.run("uv", "lock", "--check")  # and it is what pyproject.toml asks for
