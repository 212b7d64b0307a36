"""The benchmarks import the generated project's modules by name, at run time, so a module that
moves breaks them only when someone runs them (three did after the layout change): every
module they name exists in the template, and the names they call from it are defined there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "template" / "src" / "{{package_name}}"
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
# f"{pkg}.a.b", f"{package}.a.b", f"{_package()}.a.b", f"{package(project)}.a.b"
PREFIX = r"\{(?:pkg|package|_package\(\)|package\(project\))\}"
DYNAMIC = re.compile(PREFIX + r"\.([a-z_]+(?:\.[a-z_]+)*)")


def module_file(dotted: str) -> Path:
    """The module's file: ``a/b.py``, or ``a/b/__init__.py`` for a package."""
    path = PACKAGE.joinpath(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def named_modules() -> set[tuple[str, str]]:
    found = set()
    for path in BENCHMARKS:
        text = path.read_text(encoding="utf-8")
        found |= {(path.name, m) for m in DYNAMIC.findall(text)}
        tree = ast.parse(text)
        for node in ast.walk(tree):  # MODULES = {"role": "dotted.path", ...}
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets
            ):
                found |= {(path.name, v.value) for v in node.value.values}  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize(("script", "dotted"), sorted(named_modules()))
def test_each_module_a_benchmark_names_exists(script: str, dotted: str) -> None:
    target = module_file(dotted)
    # "a.b.name": the module a.b with its attribute name (from ... import name)
    if not target.is_file() and module_file(dotted.rpartition(".")[0]).is_file():
        module, _, name = dotted.rpartition(".")
        tree = ast.parse(module_file(module).read_text(encoding="utf-8"))
        defined = {
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        } | {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        assert name in defined, f"{script}: {module} defines no {name}"
        return
    assert target.is_file(), f"{script} imports {dotted}: no {target.relative_to(ROOT)}"


def test_the_benchmarks_name_modules_at_all() -> None:
    scripts = {script for script, _ in named_modules()}
    assert {"predict.py", "train_loop.py", "serve_fastapi.py", "monitor.py"} <= scripts
