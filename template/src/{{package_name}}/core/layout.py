"""The package's own layout, read from its imports: which subpackages a module needs.

The lists that must name "all the code this uses" are derived from here rather than kept by
hand: the source fingerprint a training checkpoint must match, the code shipped with a logged
MLflow model, and the files a Bento includes. A module added to a subpackage is covered at once,
and code a stage does not import (``monitoring/`` for training, say) never invalidates it.
``dvc.yaml`` lists the same folders as stage dependencies; a generated test checks the two agree.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the package's folder


def _module_file(dotted: str) -> Path:
    """``training.train`` -> its file; a subpackage -> its ``__init__.py``."""
    path = ROOT.joinpath(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)
    return nodes


def _imports(dotted: str) -> set[str]:
    """Modules of the package ``dotted`` imports at run time, anywhere in it (functions too)."""
    tree = ast.parse(_module_file(dotted).read_text(encoding="utf-8"))
    is_package = _module_file(dotted).name == "__init__.py"
    here = dotted.split(".") if is_package else dotted.split(".")[:-1]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = here[: len(here) - node.level + 1]
        stem = [*base, *(node.module.split(".") if node.module else [])]
        for alias in node.names:
            candidate = ".".join([*stem, alias.name])
            if _module_file(candidate).exists() and candidate:
                found.add(candidate)
            elif stem:
                found.add(".".join(stem))
    return found


@functools.cache
def closure(entry: str) -> frozenset[str]:
    """``entry`` and every module of the package it imports, directly or not."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(name) - seen
    return frozenset(seen)


def external_imports(entry: str) -> frozenset[str]:
    """The top-level modules outside the package and the standard library that ``entry`` and
    the package's modules it imports import at run time (``{"numpy", "torch", ...}``)."""
    found: set[str] = set()
    for name in closure(entry):
        tree = ast.parse(_module_file(name).read_text(encoding="utf-8"))
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.partition(".")[0])
    return frozenset(found - set(sys.stdlib_module_names) - {"__future__", ROOT.name})


def subpackages(entry: str) -> tuple[str, ...]:
    """The subpackages (folder names) that ``entry`` needs, sorted: ``("core", "data", ...)``."""
    return tuple(sorted({name.split(".")[0] for name in closure(entry)}))


def source_files(entry: str) -> list[Path]:
    """Every file of the subpackages ``entry`` needs, and the package's ``__init__.py``, sorted."""
    files = [ROOT / "__init__.py"]
    for folder in subpackages(entry):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def source_digest(entry: str) -> str:
    """Hash of ``source_files(entry)``: their paths (relative to the package) and contents."""
    digest = hashlib.sha256()
    for path in source_files(entry):
        name = path.relative_to(ROOT).as_posix().encode()
        digest.update(name + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
