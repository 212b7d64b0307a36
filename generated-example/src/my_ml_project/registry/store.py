"""MLflow in one place: tracking URI, experiment, model logging, registry versions and aliases.

CLI: ``python -m <package>.registry.store init`` creates the tracking store (run it once, before any
parallel work: several processes creating a fresh SQLite store at once crash), ``... uri`` prints
the resolved tracking URI (for ``mlflow ui --backend-store-uri``), ``... unlock`` removes a
promotion lock left by an evaluation that was killed, ``... rollback`` moves ``champion`` back to
the previous champion (``nox -s rollback``).

The registry works with aliases, never with the deprecated stages: ``champion`` is the version to
serve, ``challenger`` the latest valid candidate that lost the comparison. Aliases move only
under the promotion lock (:func:`promotion_lock`), so two evaluations on one tracking server
(two CI branches) decide one after the other. Every promotion is recorded in the registered
model's tag ``champion.history`` (the champions' versions, oldest first), which rollback walks back.

Every other module reaches MLflow through this one (and :mod:`.tracking`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import layout
from ..core.config import MlflowParams, ProjectError, cli_errors, load_params
from ..core.fileio import read_parquet
from ..core.paths import ARTIFACT_DIR, PACKAGE, SEEN_ROWS_ARTIFACT, module

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from mlflow.models.model import ModelInfo

    from ..model.network import TabularClassifier

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"

_SQLITE = "sqlite:///"
LOCK_SUFFIX = ".promotion-lock"
HISTORY_TAG = "champion.history"
# A version's tag that keeps it from promotion (set by rollback; `unblock` removes it).
BLOCKED_TAG = "promotion.blocked"
# A run's tag: host:pid of the process that runs it (a RUNNING run whose process is gone failed).
PROCESS_TAG = "process"
# A run's tag: how many row keys its SEEN_ROWS_ARTIFACT holds (runs of older releases lack both).
SEEN_ROWS_TAG = "seen_rows"
HISTORY_MAX = 100  # versions kept (a tag value holds at most 5000 characters)
# How long an evaluation waits for another one's promotion (seconds), and the age after which a
# lock is taken for the leftover of a killed evaluation (then the gate stops and says how to
# remove it: breaking a lock automatically could let two evaluations in at once).
LOCK_WAIT_S = 120.0
LOCK_STALE_S = 600.0
# What unpickling the model imports (torch, numpy, the package's own imports) plus the
# pickle module MLflow saves with; `mlflow` itself is added by MLflow.
_RUNTIME_DISTRIBUTIONS = ("torch", "numpy", "pandas", "cloudpickle", "pyyaml")


class RegistryError(ProjectError):
    """The tracking store cannot be reached or refused an operation."""


class LockBusyError(RegistryError):
    """Another evaluation holds the promotion lock, alive or too old to tell (exit code 5)."""

    exit_code = 5


def tracking_uri(params: MlflowParams | None = None) -> str:
    """MLFLOW_TRACKING_URI, else ``mlflow.tracking_uri``; a relative SQLite path made absolute.

    An absolute path keeps one store whatever directory a tool runs from (DVC, pytest, the UI).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = (params if params is not None else load_params().mlflow).tracking_uri
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
    print(
        f"note: created a new, empty MLflow store at {portable_uri(uri)}: a SQLite store is one "
        "machine's registry; a team or CI shares a tracking server (README, 'The registry')"
    )


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a SQLite file: ``<dir of mlflow.db>/mlartifacts/<experiment>``; else the server's."""
    path = _sqlite_path(uri)
    if path is None:
        return None
    return (path.parent / ARTIFACT_DIR / experiment).as_uri()


def portable_uri(uri: str) -> str:
    """``uri`` fit for a committed file: a store inside the project relative, no credentials."""
    path = _sqlite_path(uri)
    if path is not None:
        with contextlib.suppress(ValueError):
            return _SQLITE + path.relative_to(Path.cwd()).as_posix()
        return uri
    scheme, sep, rest = uri.partition("://")
    host, slash, tail = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{tail}" if sep else uri


def configure(params: MlflowParams) -> str:
    """Point MLflow at the project's store and experiment; return the tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    name = params.experiment
    # Fail fast and closed on an unreachable server: ~30 s at most with the defaults.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(params.request_timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(params.request_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
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
            f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted in "
            f"{portable_uri(uri)}: "
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


def _model_code(folder: Path) -> Path:
    """A copy of the code loading the model imports, in ``folder/<package>`` (MLflow's
    code_paths), so that loading needs no install: the subpackages ``model.pyfunc`` imports."""
    import shutil

    target = folder / PACKAGE
    for path in layout.source_files("model.pyfunc"):
        copy = target / path.relative_to(layout.ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
    return target


def log_model(model: TabularClassifier, input_example: pd.DataFrame) -> ModelInfo:
    """Log ``model`` as a pyfunc (:mod:`.pyfunc`) with a signature, to the active run.

    The weights go as the project's ``model.pt`` (no pickle of the network), the model's
    modules as code; requirements are pinned, never inferred (inference is slow). The input
    schema has the raw columns' types (the example is ``model.spec.typed``): numbers as float64
    ("double": pyfunc rejects float64 data (JSON, pandas) against a float32 schema, while
    float32 data upcasts safely), categories as strings, booleans as booleans. The output:
    ``label`` and one probability column per class.
    """
    import mlflow
    from mlflow.models import infer_signature

    from ..model.network import predict_frame, save_model
    from ..model.pyfunc import WEIGHTS, TabularPyfunc

    example = model.spec.typed(input_example).head(5)
    if len(example) < 2:
        # one row would make MLflow and serving tools treat the batch size as fixed
        raise ValueError("log_model needs an input_example with at least 2 rows")
    was_training = model.training
    output = predict_frame(model.eval(), example)
    model.train(was_training)
    # Notes with nothing to act on: pip's version is unknown in uv environments (no pip); the
    # python_model object is pickled (it holds nothing: the weights are the model.pt artifact).
    # MLFLOW_LOG_UV_FILES: the model's environment is its pinned requirements; the project's
    # uv.lock (a development lock, torch's CUDA wheels listed) stays out of it.
    with (
        _quiet("mlflow.utils.environment", "mlflow.models.model", "mlflow.pyfunc"),
        _environ(MLFLOW_LOG_UV_FILES="false"),
        tempfile.TemporaryDirectory(prefix="model-") as tmp,
    ):
        weights = Path(tmp) / WEIGHTS
        save_model(model, weights)
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=TabularPyfunc(),
            artifacts={WEIGHTS: str(weights)},
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=pip_requirements(),
            code_paths=[str(_model_code(Path(tmp) / "code"))],
            metadata={
                "feature_names": list(model.feature_names),
                "class_names": list(model.class_names),
                "output": "label and one probability column per class",
            },
        )


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set MLflow's switches (environment variables) inside the block only."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def open_run(
    run_id: str | None, params: dict[str, str], tags: dict[str, str], experiment: str
) -> tuple[str, str, set[int]]:
    """Start a run in ``experiment``, or reopen ``run_id``; return its id, experiment id and the
    epochs it has. Runs a killed training left RUNNING are marked FAILED first."""
    import mlflow
    from mlflow.exceptions import MlflowException

    fail_orphaned_runs(experiment, keep=run_id)
    run = None
    if run_id:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException:
            where = portable_uri(mlflow.get_tracking_uri())
            print(f"note: MLflow run {run_id} is not in {where}; new run")
    logged: set[int] = set()
    if run is None:
        run = mlflow.start_run()
        mlflow.log_params(params)
    else:
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
        logged = {int(m.step) for m in history}
    # Again on resume: the device, the commit and the process may have changed.
    mlflow.set_tags({**tags, PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"})
    return run.info.run_id, run.info.experiment_id, logged


def fail_orphaned_runs(experiment_name: str, keep: str | None = None) -> list[str]:
    """Mark FAILED the runs of the experiment left RUNNING by a process of this machine that is
    gone (a killed training); ``keep``: a run about to be resumed. Their ids."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    orphans = []
    running = client.search_runs(
        [experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=200
    )
    for run in running:
        owner = run.data.tags.get(PROCESS_TAG, "")
        if run.info.run_id != keep and owner and _holder_gone(owner):
            client.set_terminated(run.info.run_id, "FAILED")
            orphans.append(run.info.run_id)
            print(f"note: MLflow run {run.info.run_id} was left RUNNING by {owner}, a process "
                  "that is gone (killed): marked FAILED")  # fmt: skip
    return orphans


def log_epochs(run_id: str, rows: list[dict[str, float]]) -> None:
    """Per-epoch metrics (``step`` = epoch), batched and asynchronous (off the training loop).

    Queued values that a crash loses are logged again when the run resumes (:func:`open_run`
    reports the epochs the run has); :func:`end_run` waits for the queue.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in rows
        for key, value in row.items()
        if key != "epoch"
    ]
    client = MlflowClient()
    for i in range(0, len(values), 1000):  # MLflow's limit per log_batch
        client.log_batch(run_id, metrics=values[i : i + 1000], synchronous=False)


def log_run_outputs(
    run_id: str, metrics: dict[str, float], *files: Path, tags: dict[str, str] | None = None
) -> None:
    """The run's final metrics (one request), output files, then ``tags`` (after the files:
    a tag that names a file is set only once the file is there)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)


def end_run(status: str) -> None:
    import mlflow

    mlflow.flush_async_logging()
    mlflow.end_run(status=status)


def version_of_run(model_name: str, run_id: str) -> str | None:
    """The version a run already registered (a retried stage must not register a second)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient().search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    versions = sorted(int(v.version) for v in found)
    return str(versions[0]) if versions else None


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
    """Load a registered version on the CPU, in eval mode: its ``model.pt``, read without pickle.

    Versions logged by earlier releases of this template (MLflow's pytorch flavour) load
    through ``mlflow.pytorch``. No progress bar or notes: the gate's output is one line.
    """
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    from ..model.network import load_model
    from ..model.pyfunc import WEIGHTS

    # A download folder of our own, removed afterwards: MLflow's default one is never deleted.
    with (
        _quiet("mlflow.store.artifact"),
        _environ(**{MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}),
        tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp,
    ):
        root = mlflow.MlflowClient().get_model_version_download_uri(model_name, version)
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root.rstrip('/')}/artifacts/{WEIGHTS}", dst_path=tmp
            )
        except (MlflowException, OSError):
            if not _is_pytorch_flavour(root):
                raise
            return mlflow.pytorch.load_model(root, dst_path=tmp, map_location="cpu").eval()
        return load_model(path)


def seen_rows(model_name: str, version: str) -> np.ndarray | None:
    """The keys of the rows a registered version trained on (its run's ``seen_rows.parquet``);
    None when its run recorded none (trained by an older release of the template); RegistryError
    when it did but they cannot be read (the artefacts are gone)."""
    import mlflow
    import numpy as np
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    run_id = client.get_model_version(model_name, str(version)).run_id
    if not run_id or SEEN_ROWS_TAG not in client.get_run(run_id).data.tags:
        return None
    with (
        _quiet("mlflow.store.artifact"),
        _environ(**{MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}),
        tempfile.TemporaryDirectory(prefix="mlflow-rows-") as tmp,
    ):
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=SEEN_ROWS_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"its training rows cannot be read ({_first_line(exc)})") from None
        return read_parquet(path, ["key"])["key"].to_numpy(np.uint64)


def version_details(model_name: str, version: str) -> dict[str, Any]:
    """A version's run id, tags (git commit, data hashes) and test metrics (``accuracy``, ...,
    as the evaluate stage logged them), for whoever ships it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_model_version(model_name, str(version))
    metrics = client.get_run(found.run_id).data.metrics if found.run_id else {}
    test = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")}
    return {"run_id": found.run_id, "tags": dict(found.tags), "test_metrics": test}


def _is_pytorch_flavour(root: str) -> bool:
    import mlflow
    import yaml

    with tempfile.TemporaryDirectory(prefix="mlmodel-") as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp)
        flavors = yaml.safe_load(Path(mlmodel).read_text(encoding="utf-8")).get("flavors", {})
    return "pytorch" in flavors


def version_exists(model_name: str, version: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version(model_name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def log_test_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """Add the test metrics (``test_*``) to the training run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(f"test_{k}", v, now, 0) for k, v in metrics.items()]
    )


def tag_decision(run_id: str, model_name: str, version: str, tags: dict[str, str]) -> None:
    """Record the gate's decision on the training run (``gate``) and on the model version."""
    from mlflow import MlflowClient

    MlflowClient().set_tag(run_id, "gate", tags["gate"])
    set_version_tags(model_name, version, tags)


def _lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def promotion_lock(
    model_name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S
) -> Iterator[None]:
    """Hold the model's promotion lock: the gate reads, compares and moves aliases inside it.

    MLflow has no compare-and-set for aliases, but creating a registered model is atomic (names
    are unique in every store): the lock is a registered model ``<name>.promotion-lock`` that
    exists while an evaluation holds it. A lock that stays longer than ``wait_s`` is an error;
    one older than ``stale_s`` was left by a killed evaluation: the error says how to remove it.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, lock = MlflowClient(), _lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": owner, "since": f"{time.time():.3f}"},
                description=f"held while an evaluation may move the aliases of {model_name}",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_holder(client, lock)
        if held is not None and _holder_gone(held[0]):
            # Left by a killed evaluation on this machine: nobody will release it.
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            print(f"note: took over the promotion lock of '{model_name}' left by {held[0]} "
                  "(that process is gone)")  # fmt: skip
            continue
        if held is not None and (held[1] > stale_s or time.monotonic() > deadline):
            holder, age = held
            raise LockBusyError(
                f"the promotion lock of '{model_name}' is held by {holder} for {age:.0f} s; if "
                f"no evaluation is running, remove it: python -m {module('registry.store')} unlock"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def _holder_gone(owner: str) -> bool:
    """Whether ``host:pid`` names a process of this machine that no longer runs (a holder on
    another machine cannot be checked: only its age can tell)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _lock_holder(client: Any, lock: str) -> tuple[str, float] | None:
    """(owner, age in seconds) of a held lock; None if it was released meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return None
    try:
        age = time.time() - float(tags.get("since", "0"))
    except ValueError:
        age = float("inf")
    return tags.get("owner", "unknown"), age


def champion_history(model_name: str) -> list[str]:
    """The versions that were champion, oldest first (the registered model's tag)."""
    from mlflow import MlflowClient

    raw = MlflowClient().get_registered_model(model_name).tags.get(HISTORY_TAG, "[]")
    try:
        history = json.loads(raw)
    except ValueError:
        return []
    return [str(v) for v in history] if isinstance(history, list) else []


def _write_history(model_name: str, history: list[str]) -> None:
    from mlflow import MlflowClient

    value = json.dumps(history[-HISTORY_MAX:])
    MlflowClient().set_registered_model_tag(model_name, HISTORY_TAG, value)


def promote(model_name: str, version: str) -> None:
    """Make ``version`` the champion and record it in the history (under the promotion lock).

    The history is written first: a crash in between leaves an entry newer than the alias,
    which :func:`rollback` ignores.
    """
    history = champion_history(model_name)
    current = get_alias_version(model_name, CHAMPION)
    for entry in (current, str(version)):  # the current one: champions from before the history
        if entry is not None and (not history or history[-1] != entry):
            history.append(entry)
    _write_history(model_name, history)
    set_alias(model_name, CHAMPION, version)


def rollback(model_name: str) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion; (from, to) versions.

    Fails closed: with no champion, no earlier one on record, or an earlier one that cannot be
    loaded, nothing moves (RegistryError, the reason in one line).
    """
    with promotion_lock(model_name):
        current = get_alias_version(model_name, CHAMPION)
        if current is None:
            raise RegistryError(f"'{model_name}' has no champion: nothing to roll back")
        history = champion_history(model_name)
        if current in history:  # entries after it: a promotion that did not finish
            history = history[: len(history) - history[::-1].index(current)]
        else:
            history.append(current)
        if len(history) < 2:
            raise RegistryError(
                f"nothing to roll back to: v{current} is the only champion of '{model_name}' "
                "on record"
            )
        target = history[-2]
        try:
            load_version(model_name, target)
        except Exception as exc:
            raise RegistryError(
                f"v{target}, the previous champion, cannot be loaded ({_first_line(exc)}): "
                f"champion v{current} unchanged"
            ) from None
        _write_history(model_name, history[:-1])
        set_alias(model_name, CHAMPION, target)
        if get_alias_version(model_name, CHALLENGER) == target:
            delete_alias(model_name, CHALLENGER)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reason = f"rolled back from champion to v{target} at {when}"
        set_version_tags(model_name, current, {"rolled_back": when, BLOCKED_TAG: reason})
    return current, target


def blocked(model_name: str, version: str) -> str | None:
    """Why ``version`` may not be promoted (a rollback blocks it), or None."""
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(model_name, str(version)).tags.get(BLOCKED_TAG)


def unblock(model_name: str, version: str) -> str:
    """Let a rolled-back version be promoted again; the block's reason (RegistryError if none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        reason = blocked(model_name, version)
    except MlflowException as exc:
        raise RegistryError(f"'{model_name}' v{version}: {_first_line(exc)}") from None
    if reason is None:
        raise RegistryError(f"'{model_name}' v{version} is not blocked: nothing to unblock")
    MlflowClient().delete_model_version_tag(model_name, str(version), BLOCKED_TAG)
    return reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def unlock(model_name: str) -> bool:
    """Remove a promotion lock left by a killed evaluation; whether there was one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().delete_registered_model(_lock_name(model_name))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=["init", "uri", "unlock", "rollback", "unblock"],
        help="init: create the store; uri: print it; unlock: remove a leftover promotion lock; "
        "rollback: champion back to the previous champion (the version left is blocked from "
        "promotion); unblock VERSION: let a rolled-back version be promoted again",
    )
    parser.add_argument("version", nargs="?", help="unblock: the version")
    args = parser.parse_args(argv)
    if (args.command == "unblock") != (args.version is not None):
        parser.error("a VERSION goes with unblock, and only with it")
    params = load_params().mlflow
    uri = tracking_uri(params)
    if args.command == "init":
        init_store(uri)
    elif args.command == "unlock":
        configure(params)
        removed = unlock(params.model_name)
        print(f"promotion lock of '{params.model_name}' {'removed' if removed else 'not held'}")
        return 0
    elif args.command == "unblock":
        configure(params)
        reason = unblock(params.model_name, args.version)
        print(f"UNBLOCKED: '{params.model_name}' v{args.version} may be promoted again ({reason})")
        return 0
    elif args.command == "rollback":
        configure(params)
        try:
            before, after = rollback(params.model_name)
        except RegistryError:
            raise
        except Exception as exc:  # the store down, credentials refused: nothing moved
            raise RegistryError(
                f"rollback not done, the registry failed: {_first_line(exc)}"
            ) from None
        print(f"ROLLED BACK: '{params.model_name}' champion v{before} -> v{after}")
        return 0
    print(uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
