"""Migration to v0.3.0: the package's flat modules move into subpackages, local changes with them.

v0.3.0 moved every module of `src/<package>/` into a subpackage (MOVES below) and `audit.py` out
of the package to `tools/audit.py`. On `copier update`, Copier (9.19) renders the new files, then
deletes the files the template dropped: the old modules, local changes included. Copier runs this
afterwards, in the project. For each moved module the project changed, it merges the project's
version into the new file, as Copier merges any file: three ways, base = the module in the release
the project came from (read from the template's git), ours = the project's module (the file where
it is still there, else HEAD's: Copier updates clean repositories only), theirs = the new file.
Conflicts are left inline, between Copier's markers, and the file is marked unmerged in git's
index, as Copier marks its own conflicts. Relative imports in the project's version follow the
move first (`from .config import` in `monitor.py` becomes `from ..core.config import` in
`monitoring/monitor.py`). An unchanged module is removed; a module the template never had stays
where it is, named in a warning. One line per module it acts on.

Run again, it changes nothing. It never drops a change of the project's: what it cannot place
it leaves where it is. Copier runs it with its own Python: standard library and git only.

    python hooks/migrate_layout.py --package NAME --template TEMPLATE_CLONE [--from REV]
        [--project-dir DIR]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Old module (src/<package>/<old>.py) -> its new path, relative to src/<package>/ ("/" first:
# relative to the project, out of the package).
MOVES = {
    "config": "core/config.py",
    "features": "core/features.py",
    "fileio": "core/fileio.py",
    "data": "data/prepare.py",
    "model": "model/network.py",
    "pyfunc": "model/pyfunc.py",
    "registry": "registry/store.py",
    "evaluate": "evaluation/evaluate.py",
    "checkpoint": "training/checkpoint.py",
    "distributed": "training/distributed.py",
    "loop": "training/loop.py",
    "tracking": "training/tracking.py",
    "train": "training/train.py",
    "serving": "serving/contract.py",
    "service": "serving/service.py",
    "predlog": "serving/predlog.py",
    "predict": "serving/batch.py",
    "deploy": "serving/deploy.py",
    "monitor": "monitoring/monitor.py",
    "retrain": "monitoring/retrain.py",
    "simulate": "monitoring/simulate.py",
    "audit": "/tools/audit.py",
}
# The template's files in its repository (`_subdirectory`), and the package's folder there: its
# name is the Jinja variable.
SUBDIRECTORY = "template"
PACKAGE_FOLDER = "src/{{package_name}}"
# Copier's labels for its own inline conflicts: the same markers, the same way to find them.
LABELS = ("before updating", "last update", "after updating")
PREFIX = "layout migration:"
# A relative import written in a flat module: one dot.
FLAT_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from \.(?P<module>\w*) import (?P<names>.*?)(?P<eol>\r?\n?)$"
)
SINGLE_NAME = re.compile(r"^(?P<name>\w+)(?: as (?P<alias>\w+))?(?P<rest>\s*(?:#.*)?)$")


class MigrationError(Exception):
    """What stops the migration: one line, saying what and how to go on."""


def git(
    *args: str, cwd: Path, check: bool = True, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    # Copier may itself run under git (a hook): its variables would point git elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    result = subprocess.run(
        ["git", *args], cwd=cwd, input=stdin, capture_output=True, env=env, check=False
    )
    if check and result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        raise MigrationError(f"`git {' '.join(args)}` failed: {said[-1] if said else result}")
    return result


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def read(path: Path) -> str:
    return decode(path.read_bytes())


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


def show(repo: Path, rev: str, path: str) -> str | None:
    """The file at ``path`` in commit ``rev`` of ``repo``, or None where it has none."""
    result = git("show", f"{rev}:{path}", cwd=repo, check=False)
    return decode(result.stdout) if result.returncode == 0 else None


def new_parts(old: str) -> tuple[str, ...]:
    """The new module of ``old`` as dotted parts below the package (empty: out of it)."""
    new = MOVES[old]
    return () if new.startswith("/") else tuple(new.removesuffix(".py").split("/"))


def relative(from_package: tuple[str, ...], target: tuple[str, ...]) -> str:
    """The relative module name that, in package ``from_package``, names ``target``."""
    common = 0
    while common < min(len(from_package), len(target)) and from_package[common] == target[common]:
        common += 1
    return "." * (len(from_package) - common + 1) + ".".join(target[common:])


def translate_imports(text: str, new_module: tuple[str, ...]) -> str:
    """``text`` (a flat module) with its one-dot relative imports rewritten for ``new_module``.

    `from .config import X` -> `from ..core.config import X`; `from . import registry` ->
    `from ..registry import store as registry`; a module the template never had stays at the
    package's top (`from .ours import f` -> `from ..ours import f`). Anything else is kept as is.
    """
    package = new_module[:-1]
    if not package:  # still at the top (or out of the package): nothing moves
        return text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = FLAT_IMPORT.match(line)
        if not match:
            continue
        indent, module, names, eol = match.group("indent", "module", "names", "eol")
        if module:
            target = new_parts(module) if module in MOVES else (module,)
            if target:
                lines[i] = f"{indent}from {relative(package, target)} import {names}{eol}"
            continue
        single = SINGLE_NAME.match(names)
        if single and single["name"] in MOVES and new_parts(single["name"]):
            *where, name = new_parts(single["name"])
            alias = single["alias"] or single["name"]
            as_alias = "" if alias == name else f" as {alias}"
            lines[i] = (
                f"{indent}from {relative(package, tuple(where))} import {name}{as_alias}"
                f"{single['rest']}{eol}"
            )
    return "".join(lines)


def merge(ours: str, base: str, theirs: str) -> tuple[str, int]:
    """Three-way merge as Copier does it; return the text and the number of conflicts."""
    with tempfile.TemporaryDirectory(prefix="migrate-layout-") as tmp:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            write(path := Path(tmp, name), text)
            paths.append(str(path))
        labels = [arg for label in LABELS for arg in ("-L", label)]
        result = git("merge-file", "-p", *labels, "--", *paths, cwd=Path(tmp), check=False)
    if result.returncode < 0 or result.returncode > 127:
        raise MigrationError(f"`git merge-file` failed: {decode(result.stderr).strip()}")
    return decode(result.stdout), result.returncode


def record_conflict(project: Path, path: Path, base: str, ours: str, theirs: str) -> None:
    """Mark ``path`` unmerged in the project's index (base, ours, theirs), as Copier marks its
    own conflicts: `git status` lists it, `git commit -a` refuses it until it is resolved."""
    top = git("rev-parse", "--show-toplevel", cwd=project, check=False)
    if top.returncode:
        return  # not a git repository: the markers say it all
    root = Path(decode(top.stdout).strip()).resolve()
    where = path.resolve().relative_to(root).as_posix()
    entries = []
    for stage, text in enumerate((base, ours, theirs), start=1):
        data = text.encode("utf-8", "surrogateescape")
        blob = decode(git("hash-object", "-w", "--stdin", cwd=root, stdin=data).stdout).strip()
        entries.append(f"100644 {blob} {stage}\t{where}\n")
    git("update-index", "--index-info", cwd=root, stdin="".join(entries).encode())


def unresolved_imports(project: Path, path: Path, package_dir: Path) -> list[str]:
    """``path``'s relative imports (``path:line``, from ``project``) naming no module there."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError):  # conflict markers: the user resolves them first
        return []
    here = path.parent
    where = path.relative_to(project)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        folder = here
        for _ in range(node.level - 1):
            folder = folder.parent
        if not folder.is_relative_to(package_dir):
            found.append(f"{where}:{node.lineno}")
            continue
        if node.module:
            target = folder.joinpath(*node.module.split("."))
            if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
                found.append(f"{where}:{node.lineno}")
        elif any(
            alias.name in MOVES
            and not (folder / f"{alias.name}.py").is_file()
            and not (folder / alias.name / "__init__.py").is_file()
            for alias in node.names
        ):
            found.append(f"{where}:{node.lineno}")
    return found


def is_module(folder: Path, name: str) -> bool:
    """Whether ``name`` is a module or a package in ``folder``."""
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def old_absolute_imports(project: Path, package: str) -> list[str]:
    """Where (``path:line``) a Python file imports a module of the package that is not there."""
    listed = git(
        "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py",
        cwd=project, check=False,
    )  # fmt: skip
    if listed.returncode == 0:
        files = [project / p for p in decode(listed.stdout).split("\0") if p]
    else:
        files = [p for p in project.rglob("*.py") if not {".venv", ".nox", ".git"} & set(p.parts)]
    src = project / "src"

    def resolves(dotted: str) -> bool:
        *folder, name = dotted.split(".")
        return is_module(src.joinpath(*folder), name)

    found = []
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                ours = node.module.split(".")[0] == package
                missing = ours and (
                    not resolves(node.module)
                    or (  # from a package (not a module): the moved modules it no longer has
                        (src.joinpath(*node.module.split(".")) / "__init__.py").is_file()
                        and any(
                            a.name in MOVES and not resolves(f"{node.module}.{a.name}")
                            for a in node.names
                        )
                    )
                )
            elif isinstance(node, ast.Import):
                missing = any(
                    a.name.split(".")[0] == package and not resolves(a.name) for a in node.names
                )
            else:
                continue
            if missing:
                found.append(f"{path.relative_to(project)}:{node.lineno}")
    return found


def migrate(project: Path, package: str, template: Path, rev: str) -> list[str]:
    """Move the project's changed flat modules into the new layout; return the report's lines."""
    if git(
        "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=template, check=False
    ).returncode:
        raise MigrationError(
            f"cannot read the old release {rev!r} in the template's git at {template}: nothing "
            "was moved; your changes to the old modules are in your project's HEAD "
            f"(git show HEAD:src/{package}/<module>.py)"
        )
    package_dir = project / "src" / package
    top = f"src/{package}"
    head = git("rev-parse", "--verify", "--quiet", "HEAD", cwd=project, check=False)
    report, removed, merged = [], [], []
    for old, new in MOVES.items():
        old_path = package_dir / f"{old}.py"
        new_in_template = new[1:] if new.startswith("/") else f"{PACKAGE_FOLDER}/{new}"
        new_rel = new_in_template.replace(PACKAGE_FOLDER, top)
        new_path = project / new_rel
        base = show(template, rev, f"{SUBDIRECTORY}/{PACKAGE_FOLDER}/{old}.py")
        if base is None:  # not a module of that release: the project's own, left alone below
            continue
        fresh_path = template / SUBDIRECTORY / new_in_template
        fresh = read(fresh_path) if fresh_path.is_file() else None
        if old_path.is_file():
            ours = read(old_path)
        else:  # deleted by Copier: the project's version is HEAD's
            ours = show(project, "HEAD", f"./{top}/{old}.py") if not head.returncode else None
            if ours is None or ours == base:
                continue
            if fresh is not None and new_path.is_file() and read(new_path) != fresh:
                where = new_parts(old)
                again = translate_imports(ours, where), translate_imports(base, where), fresh
                if read(new_path) == merge(*again)[0]:
                    continue  # merged already: this ran before
                report.append(
                    f"{new_rel} is no longer the template's: left as it is; your {old}.py is "
                    f"in HEAD (git show HEAD:./{top}/{old}.py)"
                )
                continue
        rejected = old_path.with_name(f"{old}.py.rej")  # Copier's --conflict rej: our own hunks
        if ours == base:
            old_path.unlink()
            rejected.unlink(missing_ok=True)
            removed.append(old)
            continue
        theirs = read(new_path) if new_path.is_file() else fresh if fresh is not None else base
        where = new_parts(old)
        ours, base = translate_imports(ours, where), translate_imports(base, where)
        text, conflicts = merge(ours, base, theirs)
        write(new_path, text)
        if conflicts:
            try:
                record_conflict(project, new_path, base, ours, theirs)
            except MigrationError as error:
                report.append(f"{new_rel} not marked unmerged in git's index: {error}")
        old_path.unlink(missing_ok=True)
        rejected.unlink(missing_ok=True)
        merged.append(new_path)
        old_rel = f"{top}/{old}.py"
        if conflicts:
            report.append(
                f"{old_rel} -> {new_rel}: your changes merged, {conflicts} conflict(s): "
                f"resolve the markers left in {new_rel} (<<<<<<< {LABELS[0]})"
            )
        else:
            report.append(f"{old_rel} -> {new_rel}: your changes merged cleanly")
    if removed:
        report.append(f"{len(removed)} unchanged old module(s) removed: {', '.join(removed)}")
    own = sorted(package_dir.glob("*.py")) if package_dir.is_dir() else []
    own = [p for p in own if p.name != "__init__.py"]
    if own:
        report.append(
            f"{top}/: {', '.join(p.name for p in own)} not the template's, left where they are: "
            "move them into a subpackage if they belong there, and point their relative imports "
            "at the new modules (e.g. `from .config` -> `from .core.config`)"
        )
    broken = [
        hit
        for path in [*merged, *own]
        if path.is_relative_to(package_dir)
        for hit in unresolved_imports(project, path, package_dir)
    ]
    if broken:
        report.append(
            f"relative imports naming no module of the new layout: {', '.join(broken)}: "
            "point them at the new modules"
        )
    if old := old_absolute_imports(project, package):
        report.append(
            f"imports of modules of {package} that are not there (moved: see "
            f"hooks/migrate_layout.py in the template): {', '.join(old)}"
        )
    return report or ["nothing to move"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="the project's package name")
    parser.add_argument(
        "--template", type=Path, required=True, help="a git clone of the template (with history)"
    )
    parser.add_argument(
        "--from",
        dest="rev",
        default=os.environ.get("VERSION_FROM"),
        help="the release the project was updated from (default: $VERSION_FROM, set by Copier)",
    )
    parser.add_argument(
        "--project-dir", type=Path, default=Path(), help="the project (default: cwd)"
    )
    args = parser.parse_args(argv)
    try:
        if not args.rev:
            raise MigrationError("no old release given: pass --from or set VERSION_FROM")
        lines = migrate(args.project_dir.resolve(), args.package, args.template.resolve(), args.rev)
    except MigrationError as error:
        print(f"{PREFIX} failed: {error}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"{PREFIX} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
