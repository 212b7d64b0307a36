"""Parameters from ``params.yaml`` and the errors a user can fix."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

_MISSING = object()


class ProjectError(Exception):
    """An expected failure: the message says what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the pipeline parameters (a YAML mapping) from ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(
            f"{path} not found (cwd: {Path.cwd()}): run commands from the project root, "
            "where params.yaml lives"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path} cannot be read ({exc}): fix the file") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ProjectError(
            f"{path} must be a YAML mapping of sections (seed, data, split, model, ...), "
            f"found {type(params).__name__}"
        )
    return params


def get_param(params: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """Look up a dotted key such as ``"data.target"``; a missing required key is a ProjectError."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            raise ProjectError(f"params.yaml has no `{key}`: add it (see the template's defaults)")
        node = node[part]
    return node


def cli_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Make a ``main()`` print a ProjectError as ``error: ...`` on stderr and return its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return fn(*args, **kwargs)
        except ProjectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code

    return wrapper
