"""A machine-learning project from data to a registered model.

Pipeline stages (each ``python -m my_ml_project.<stage>``): data (prepare), train, evaluate.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("my-ml-project")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
