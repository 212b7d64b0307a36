"""The PyTorch wheel-source policy the template's tests rely on."""

from __future__ import annotations

from pathlib import Path

from helpers import CPU_INDEX, torch_source_env


def test_explicit_override_wins(tmp_path: Path) -> None:
    env = {"TORCH_INDEX_URL": "https://mirror/whl/cu128", "PIP_FIND_LINKS": str(tmp_path)}
    assert torch_source_env(env) == {}


def test_find_links_folder_with_a_torch_wheel_is_used(tmp_path: Path) -> None:
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    env = {"PIP_FIND_LINKS": f"/nonexistent {tmp_path}"}
    assert torch_source_env(env) == {"TORCH_FIND_LINKS": str(tmp_path)}


def test_falls_back_to_the_cpu_index(tmp_path: Path) -> None:
    assert torch_source_env({"PIP_FIND_LINKS": str(tmp_path)}) == {"TORCH_INDEX_URL": CPU_INDEX}
    assert torch_source_env({}) == {"TORCH_INDEX_URL": CPU_INDEX}
