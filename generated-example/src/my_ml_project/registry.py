"""MLflow in one place: tracking URI, experiment, model logging, registry versions and aliases.

CLI: ``python -m <package>.registry init`` creates the tracking store (run it once, before any
parallel work: several processes creating a fresh SQLite store at once crash), ``... uri`` prints
the resolved tracking URI (for ``mlflow ui --backend-store-uri``).

The registry works with aliases, never with the deprecated stages: ``champion`` is the version to
serve, ``challenger`` the latest candidate that was not promoted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ProjectError, cli_errors, get_param, load_params

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models.model import ModelInfo

    from .model import TabularClassifier

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
ARTIFACT_DIR = "mlartifacts"
_SQLITE = "sqlite:///"
# What unpickling the model imports (torch, numpy, the package's own imports) plus the
# pickle module MLflow saves with; `mlflow` itself is added by MLflow.
_RUNTIME_DISTRIBUTIONS = ("torch", "numpy", "pandas", "cloudpickle", "pyyaml")


def tracking_uri(params: dict[str, Any] | None = None) -> str:
    """MLFLOW_TRACKING_URI, else ``mlflow.tracking_uri``; a relative SQLite path made absolute.

    An absolute path keeps one store whatever directory a tool runs from (DVC, pytest, the UI).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = str(get_param(params if params is not None else load_params(), "mlflow.tracking_uri"))
    if uri.startswith(_SQLITE):
        path = Path(uri.removeprefix(_SQLITE))
        if not path.is_absolute():
            uri = _SQLITE + (Path.cwd() / path).as_posix()
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix(_SQLITE)) if uri.startswith(_SQLITE) else None


def init_store(uri: str | None = None) -> None:
    """Create the tables of a SQLite store (idempotent); other stores are left alone."""
    uri = uri or tracking_uri()
    path = _sqlite_path(uri)
    # Importing mlflow costs seconds: an existing store (the usual case) needs nothing.
    if path is None or (path.is_file() and path.stat().st_size > 0):
        return
    from mlflow import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    # The first query creates the schema and runs the migrations.
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a SQLite file: ``<dir of mlflow.db>/mlartifacts/<experiment>``; else the server's."""
    path = _sqlite_path(uri)
    if path is None:
        return None
    return (path.parent / ARTIFACT_DIR / experiment).as_uri()


def configure(params: dict[str, Any]) -> str:
    """Point MLflow at the project's store and experiment; return the tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    name = str(get_param(params, "mlflow.experiment"))
    init_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as exc:  # created meanwhile by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    elif experiment.lifecycle_stage == "deleted":
        raise ProjectError(
            f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted in {uri}: "
            f"restore it (mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or set another mlflow.experiment in params.yaml"
        )
    mlflow.set_experiment(name)
    return uri


def _distribution_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of a logged model, never inferred (inference is slow).

    Local version tags are dropped: ``torch==2.5.1+cpu`` would not resolve on PyPI, and the
    serving machine picks its own torch build.
    """
    pins = []
    for name in _RUNTIME_DISTRIBUTIONS:
        found = _distribution_version(name)
        if found is not None:
            pins.append(f"{name}=={found.split('+')[0]}")
    return pins


def _package_dir() -> str:
    """The directory of this package, shipped with the model so unpickling needs no install."""
    import importlib.util

    spec = importlib.util.find_spec(__package__ or __name__.rpartition(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot locate the source of package {__package__}")
    return next(iter(spec.submodule_search_locations))


def log_model(model: TabularClassifier, input_example: pd.DataFrame) -> ModelInfo:
    """Log ``model`` (pytorch flavour, pickle format) with a signature to the active run.

    Pickle rather than MLflow's default pt2 (torch.export): pt2 loads back as a GraphModule
    without ``predict_proba``/``feature_names``, and pins shapes to the example. The input schema
    is float64 ("double"): pyfunc rejects float64 data (JSON, pandas) against a float32 schema,
    while float32 data upcasts safely; the model casts to float32 itself. The output (pyfunc
    ``predict``) is the logits, one column per class in ``metadata.class_names``.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    example = input_example.loc[:, model.feature_names].head(5).astype(np.float64)
    if len(example) < 2:
        # one row would make MLflow and serving tools treat the batch size as fixed
        raise ValueError("log_model needs an input_example with at least 2 rows")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(example.to_numpy(np.float32))).cpu().numpy()
    model.train(was_training)
    # Warnings with nothing to act on: pickle is unsafe for untrusted files (this store is the
    # project's own); pip's version is unknown in uv environments (they have no pip).
    with _quiet("mlflow.pytorch", "mlflow.utils.environment"):
        return mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            serialization_format="pickle",
            signature=infer_signature(example, logits),
            input_example=example,
            pip_requirements=pip_requirements(),
            code_paths=[_package_dir()],
            metadata={
                "feature_names": list(model.feature_names),
                "class_names": list(model.class_names),
                "output": "logits",
            },
        )


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR inside the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def register(model_uri: str, model_name: str, tags: dict[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``model_name``; return the version number."""
    import mlflow

    tags = {key: str(value) for key, value in (tags or {}).items()}
    return str(mlflow.register_model(model_uri, model_name, tags=tags).version)


def get_alias_version(model_name: str, alias: str) -> str | None:
    """The version an alias points to, or None (no such alias, or no such model yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` (an alias names one version at a time)."""
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(model_name, alias, str(version))


def delete_alias(model_name: str, alias: str) -> None:
    """Remove ``alias`` if it exists."""
    from mlflow import MlflowClient

    if get_alias_version(model_name, alias) is not None:
        MlflowClient().delete_registered_model_alias(model_name, alias)


def set_version_tags(model_name: str, version: str, tags: dict[str, Any]) -> None:
    """Tag a model version (e.g. with the evaluation decision)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, str(value))


def load_version(model_name: str, version: str) -> TabularClassifier:
    """Load a registered version on the CPU, in eval mode."""
    import mlflow

    # A download folder of our own, removed afterwards: MLflow's default one is never deleted.
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        model = mlflow.pytorch.load_model(
            f"models:/{model_name}/{version}", dst_path=tmp, map_location="cpu"
        )
    return model.eval()


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=["init", "uri"], help="init: create the store; uri: print it"
    )
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if args.command == "init":
        init_store(uri)
    print(uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
