"""The HTTP service (BentoML): the champion imported by ``nox -s deploy``, answering ``/predict``.

``POST /predict`` ``{"rows": [{feature: value, ...}, ...]}`` -> ``{"model_version", "predictions":
[{"label", "probabilities": {class: p}}]}`` in row order, through the same
:func:`~.model.predict_frame` as the pyfunc and the evaluation; the ``X-Request-ID`` header names
the answer. ``POST /explain`` takes the same body and answers the same, each prediction with
``attributions`` (``{feature: value}``, per original column: :mod:`.model.explain`, the code the
evaluate stage runs) and ``baseline`` (the label's probability for the typical row: the row's
attributions add up to ``probabilities[label] - baseline``). ``POST /feedback`` ``{"request_id",
"labels": [true class of each row]}`` records the ground truth for the monitor. The request schema
is the model's (see :mod:`.serving`), read from the BentoML model's metadata when the service is
built. No MLflow here: it would add seconds to start-up.

Importing this module does nothing: :func:`build_service` makes the service, and BentoML's
``<package>.serving.service:Predictor`` reaches it through the module's ``__getattr__``. PyTorch
and the model code are imported by the worker that loads the model, not here: `bentoml serve`
also builds the service in its own process first, to read its configuration, and torch's import
(~2 s) there delayed readiness; pandas (~0.3 s) is imported by the worker too, for the same reason.

Which models: ``deployment.json`` beside this module in the Bento (written by ``nox -s deploy``)
names the served model and, with ``serve.shadow: true``, the shadow (the challenger), scored
after the answer is sent and logged beside it. Served from the source tree (``--reload``): the
newest imported model, no shadow.
"""

import asyncio
import functools
import gc
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType

from ..core.config import ProjectError
from ..core.features import FeatureSpec
from ..core.paths import DEPLOYMENT_FILE, MODEL_NAME, WEIGHTS
from .contract import (
    REQUEST_ID,
    Batcher,
    Drain,
    FeedbackError,
    Guard,
    InputError,
    NonFiniteError,
    RecentRequests,
    RequestId,
    Scores,
    ServeSettings,
    blame,
    feedback_labels,
    labels_type,
    overflow_errors,
    predictions,
    rows_type,
    torch_backend,
)
from .predlog import COUNTS, PredictionLog, RequestIndex

logger = logging.getLogger(__name__)
# Requests refused because the model would compute non-finite numbers: caught on the input
# (a value that overflows float32) or, as the second line, on the output (never answered).
NON_FINITE = bentoml.metrics.Counter(
    name="predict_non_finite_refused",
    documentation="Requests refused because the model would compute non-finite numbers",
    labelnames=["stage"],
)
# The prediction log's counts (see predlog.COUNTS): lines written, dropped, failed writes, rejects.
LOG_COUNTS = bentoml.metrics.Counter(
    name="prediction_log_lines",
    documentation="Prediction log lines by outcome (written, dropped, rejected) and failed writes",
    labelnames=["outcome"],
)


def count_log(name: str, n: int) -> None:
    """Add ``n`` to the prediction log's counter ``name`` (called from its writer thread)."""
    LOG_COUNTS.labels(outcome=name).inc(n)


DEPLOYMENT = Path(__file__).with_name(DEPLOYMENT_FILE)

# What each route answers: a JSON object. The content type is named, not left for BentoML to
# infer: for an untyped ``dict`` it builds the answer's JSON schema on every response (0.13 ms a
# response, a quarter of the worker's time at 64 clients, measured with py-spy).
Answer = Annotated[dict[str, Any], ContentType("application/json")]

# Also on /metrics (deploy/prometheus/ alerts on these, deploy/grafana/ shows them).
MODEL_INFO = bentoml.metrics.Gauge(
    name="model_info",
    documentation="The registry version this worker serves (value 1)",
    labelnames=["model_version"],
    multiprocess_mode="livemax",
)
ROWS_PER_CALL = bentoml.metrics.Histogram(
    name="model_rows_per_call",
    documentation="Rows scored in one model call (requests batched together)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


def deployed_models(deployment: Path = DEPLOYMENT) -> dict[str, str | None]:
    """The BentoML tags to serve: ``deployment.json`` in a Bento, else the newest imported model."""
    if deployment.exists():
        return json.loads(deployment.read_text(encoding="utf-8"))
    return {"model": f"{MODEL_NAME}:latest", "shadow": None}


def model_card(stored: Any) -> dict[str, Any]:
    """What the prediction log records of a served model (``models/<version>.json``)."""
    meta = stored.info.metadata
    keys = ("registry_name", "registry_version", "run_id", "test_metrics", "data_version")
    card = {key: meta.get(key) for key in keys}
    return card | {"classes": meta["config"]["class_names"], "bento_model": str(stored.tag)}


def _import_explainer() -> None:
    from ..model.explain import integrated_gradients

    integrated_gradients()


CONTAINERIZED = "BENTOML_CONTAINERIZED"  # set in every image `bentoml containerize` builds


def build_service(settings: ServeSettings | None = None, deployment: Path = DEPLOYMENT) -> Any:
    """The BentoML service of the models ``deployment`` names, configured by ``settings``
    (default: the environment, :meth:`ServeSettings.from_env`)."""
    SETTINGS = settings or ServeSettings.from_env()
    if os.environ.get(CONTAINERIZED) and not SETTINGS.bind_host:
        # BentoML's image serves every interface (0.0.0.0): the rule of `nox -s serve` holds
        # there too, so an image run without its token never starts open.
        refused = SETTINGS.exposure_error("0.0.0.0")
        if refused:
            raise ProjectError(f"{refused} (this container serves 0.0.0.0)")
    GPU = torch_backend().startswith("cu")  # the project's accelerator: a GPU is asked for cuda
    MODELS = deployed_models(deployment)
    MODEL_REF = bentoml.models.BentoModel(MODELS["model"])
    SHADOW_REF = bentoml.models.BentoModel(MODELS["shadow"]) if MODELS["shadow"] else None
    STORED = MODEL_REF.stored
    if STORED is None:
        raise ProjectError(f"no model {MODEL_NAME} in BentoML's store: run `nox -s deploy` first")
    CONFIG = STORED.info.metadata["config"]
    SPEC = FeatureSpec.build(
        CONFIG["feature_names"], CONFIG["kinds"], CONFIG["categories"], CONFIG["missing"]
    )
    if TYPE_CHECKING:  # for mypy: the rows' pydantic model is made at run time, from the schema
        Rows = list[Any]
    else:
        Rows = rows_type(SPEC, SETTINGS.max_rows)
    Labels = labels_type(SETTINGS.max_rows)

    @bentoml.service(
        name=MODEL_NAME,
        workers=SETTINGS.workers,
        resources={"gpu": 1} if GPU else {"cpu": str(SETTINGS.workers)},
        # Measured on 2 cores: the access log and tracing spans cost more than the model itself.
        # A short timeout: every request keeps a timer (and its objects) alive that long.
        traffic={"timeout": 10},
        logging={"access": {"enabled": False}},
        tracing={"excluded_urls": ["/predict", "/explain"]},
    )
    class Predictor:
        """Loads the model once; answers rows of raw feature values."""

        model_ref = MODEL_REF
        if SHADOW_REF is not None:
            shadow_ref = SHADOW_REF

        def __init__(self) -> None:
            import pandas  # noqa: F401  (for the requests, here in the worker: before readiness)
            import torch

            from ..model.network import load_model

            device = "cuda" if torch_backend() != "cpu" and torch.cuda.is_available() else "cpu"
            if device == "cpu":
                # One request at a time per worker: more intra-op threads only contend for the cores
                # (measured on 2 cores under load: a 32-row predict_frame took 2.4 ms with 1 thread,
                # up to 58 ms with 2). Throughput comes from SERVE_WORKERS, one process per core.
                torch.set_num_threads(1)
            self.model = load_model(STORED.path_of(WEIGHTS)).to(device)
            self.version = str(STORED.info.metadata["registry_version"])
            self.stats = (self.model.mean.cpu().numpy(), self.model.std.cpu().numpy())
            # captum's import (~0.5 s) beside the first requests rather than before readiness
            # (or in the first /explain): a thread, as imports release the GIL between modules.
            threading.Thread(target=_import_explainer, name="import-captum", daemon=True).start()
            self.log = None
            if SETTINGS.log_enabled:
                self.log = PredictionLog(
                    SETTINGS.log_dir,
                    categorical=SPEC.categorical,
                    max_pending=SETTINGS.log_max_pending,
                    stuck_s=SETTINGS.log_stuck_s,
                    on_count=count_log,
                )
                for name in COUNTS:  # each counter shows from the start, at 0
                    LOG_COUNTS.labels(outcome=name)
                self.log.describe(self.version, model_card(STORED))
            # Concurrent requests scored in one model call (about the cost of one request's).
            self.batcher = Batcher(self._score_served, SETTINGS.max_rows)
            MODEL_INFO.labels(model_version=self.version).set(1)
            self.recent = RecentRequests()
            self.index = RequestIndex(SETTINGS.log_dir)
            self.shadow = None
            if SHADOW_REF is not None and SHADOW_REF.stored is not None and self.log is not None:
                stored = SHADOW_REF.stored
                self.shadow = load_model(stored.path_of(WEIGHTS)).to(device)
                self.shadow_version = str(stored.info.metadata["registry_version"])
                self.shadow_batcher = Batcher(
                    lambda rows: self._score(self.shadow, rows), SETTINGS.max_rows
                )
                self.log.describe(self.shadow_version, model_card(stored))
            self._tasks: set[asyncio.Task] = set()
            self.drain = Drain()
            if not self.drain.install():
                logger.warning("SIGTERM: the server's own stop (no graceful drain here)")
            gc.freeze()  # the models and the imports: out of every later collection

        def _score_served(self, records: list[dict[str, Any]]) -> Scores:
            ROWS_PER_CALL.observe(len(records))
            return self._score(self.model, records)

        def __is_ready__(self) -> bool:
            """/readyz: 503 while draining, or while the prediction log's writer is dead, stuck
            or failing."""
            if self.drain.draining:
                return False
            if self.log is None:
                return True
            ready, why = self.log.healthy()
            if not ready:
                logger.warning("not ready: %s", why)
            return ready

        @staticmethod
        def _score(model: Any, records: list[dict[str, Any]]) -> Scores:
            """Labels and probabilities; NonFiniteError rather than a label of NaN scores."""
            import pandas as pd  # in sys.modules since __init__, as torch: a dictionary lookup
            import torch

            from ..model.network import predict_frame

            frame = pd.DataFrame(records, columns=list(SPEC.names))
            with torch.inference_mode():
                out = predict_frame(model, frame)
            proba = out[model.class_names].to_numpy()
            finite = np.isfinite(proba).all(axis=1)
            if not finite.all():
                raise NonFiniteError(np.flatnonzero(~finite).tolist())
            return out["label"].tolist(), proba.tolist()

        def _finite(self, records: list[dict[str, Any]]) -> bool:
            try:
                self._score(self.model, records)
            except (NonFiniteError, ValueError):
                return False
            return True

        async def _answer(self, records: list[dict[str, Any]]) -> Scores:
            """The model's scores of ``records``; InputError naming the row and field of any
            value the model cannot compute (checked before, and after, as a second line)."""
            mean, std = self.stats
            problems = overflow_errors(records, SPEC.numeric, mean, std)
            if problems:
                NON_FINITE.labels(stage="input").inc()
                raise InputError(problems)
            try:
                return await self.batcher(records)
            except NonFiniteError as exc:
                NON_FINITE.labels(stage="output").inc()
                blamed = blame(records, exc.rows, SPEC.numeric, mean, std, self._finite)
                raise InputError(blamed) from None

        @bentoml.api
        async def predict(self, rows: Rows, ctx: bentoml.Context) -> Answer:
            """Label and class probabilities of each row, in order."""
            records = [row.model_dump() for row in rows]
            try:
                labels, proba = await self._answer(records)
            except InputError as exc:
                ctx.response.status_code = 422
                return {"error": "values the model cannot compute", "detail": exc.problems}
            answers = predictions(labels, proba, self.model.class_names)
            # The Guard's id: the X-Request-ID header of the answer.
            request_id = ctx.request.headers.get(REQUEST_ID) or uuid.uuid4().hex
            self.recent.add(request_id, len(rows))
            if self.shadow is not None:
                # After the answer: the challenger's scores only reach the log, never the client.
                task = asyncio.get_running_loop().create_task(
                    self._shadow_score(request_id, records, answers)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif self.log is not None:  # the rows as dumped already: not dumped again to log them
                self.log.record(request_id, self.version, records, answers)
            return {"model_version": self.version, "predictions": answers}

        @bentoml.api
        async def explain(self, rows: Rows, ctx: bentoml.Context) -> Answer:
            """As /predict, each row with the attribution of each feature column to its label's
            probability (Integrated Gradients from the typical row) and that row's probability.

            Not in the prediction log: a client asking why must not count twice in monitoring.
            """
            records = [row.model_dump() for row in rows]
            try:
                labels, proba = await self._answer(records)
            except InputError as exc:
                ctx.response.status_code = 422
                return {"error": "values the model cannot compute", "detail": exc.problems}
            import pandas as pd

            from ..model.explain import attribute_frame

            classes = self.model.class_names
            frame = pd.DataFrame(records, columns=list(SPEC.names))
            # The answer's own labels: the attributions explain what the client was told.
            target = np.array([classes.index(label) for label in labels], dtype=np.int64)
            explained = attribute_frame(self.model, frame, target)
            bad = np.flatnonzero(~np.isfinite(explained.values).all(axis=1))
            if len(bad):
                ctx.response.status_code = 422
                detail = [f"row {i}: its attributions are not finite numbers" for i in bad]
                return {"error": "values the model cannot compute", "detail": detail}
            answers = predictions(labels, proba, classes)
            for answer, values, i in zip(answers, explained.rows(), target, strict=True):
                answer["attributions"] = values
                answer["baseline"] = float(explained.baseline[i])
            return {"model_version": self.version, "predictions": answers}

        async def _shadow_score(
            self, request_id: str, records: list[dict[str, Any]], answers: list[dict]
        ) -> None:
            await asyncio.sleep(0)  # let the champion's answer go out first
            assert self.log is not None
            assert self.shadow is not None
            try:
                labels, proba = await self.shadow_batcher(records)
                shadow = (self.shadow_version, predictions(labels, proba, self.shadow.class_names))
            except Exception:  # the challenger failing must not lose the champion's record
                logger.exception("shadow model failed on request %s", request_id)
                shadow = None
            self.log.record(request_id, self.version, records, answers, shadow)

        @bentoml.api
        async def feedback(
            self,
            request_id: RequestId,
            labels: Labels,  # type: ignore[valid-type]
            ctx: bentoml.Context,
        ) -> Answer:
            """Record the true class of each row of an answered request (in its row order)."""
            if self.log is None:
                ctx.response.status_code = 409
                return {"error": "the prediction log is off (PREDICTION_LOG=off): nothing to label"}
            rows = self.recent.get(request_id)
            if rows is None:  # answered by another worker, or before a restart: the log knows
                rows = await asyncio.to_thread(self.index.rows, request_id)
            try:
                true = feedback_labels(labels, rows, self.model.class_names)
            except FeedbackError as exc:
                ctx.response.status_code = exc.status
                return {"error": str(exc)}
            self.log.feedback(request_id, true)
            return {"request_id": request_id, "recorded": len(true)}

        @bentoml.on_shutdown
        def close_log(self) -> None:
            if self.log is not None:
                self.log.close()

    # bentoml.service returns a Service, which its type hints give as the decorated class.
    Predictor.add_asgi_middleware(  # type: ignore[attr-defined]
        Guard,
        settings=SETTINGS,
        fields={
            "/predict": frozenset({"rows"}),
            "/explain": frozenset({"rows"}),
            "/feedback": frozenset({"request_id", "labels"}),
        },
        # Labels are not urgent, answers are: with 8 clients posting unknown-id feedback back to
        # back, /predict's p99 was 1.2x idle with a lane of 1, 2.5x without (one worker, 2 cores).
        lanes={"/feedback": SETTINGS.feedback_concurrency},
    )
    return Predictor


@functools.cache
def service() -> Any:
    """The service as configured by the environment, built once per process."""
    return build_service()


def __getattr__(name: str) -> Any:
    """``Predictor``: what ``bentoml serve <package>.serving.service:Predictor`` loads."""
    if name == "Predictor":
        return service()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
