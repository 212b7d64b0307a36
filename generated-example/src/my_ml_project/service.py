"""The HTTP service (BentoML): the champion imported by ``nox -s deploy``, answering ``/predict``.

``POST /predict`` ``{"rows": [{feature: value, ...}, ...]}`` -> ``{"model_version",
"predictions": [{"label", "probabilities": {class: p}}]}`` in row order, through the same
:func:`~.model.predict_frame` as the pyfunc and the evaluation. The request schema is the
model's (see :mod:`.serving`), read from the BentoML model's metadata when this module is
imported. No MLflow here: it would add seconds to start-up.
"""

from __future__ import annotations

import gc
import uuid
from typing import TYPE_CHECKING, Any

import bentoml
import pandas as pd
import torch

from .config import ProjectError
from .features import FeatureSpec
from .model import load_model, predict_frame
from .predlog import PredictionLog
from .serving import (
    REQUEST_ID,
    Batcher,
    Guard,
    Scores,
    ServeSettings,
    predictions,
    rows_type,
    torch_backend,
)

GPU = torch_backend().startswith("cu")  # the project's accelerator: a GPU is asked for cuda
MODEL_NAME = __package__.replace("_", "-")  # the model in BentoML's store (nox -s deploy)
WEIGHTS = "model.pt"

SETTINGS = ServeSettings.from_env()
MODEL_REF = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")
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


@bentoml.service(
    name=MODEL_NAME,
    workers=SETTINGS.workers,
    resources={"gpu": 1} if GPU else {"cpu": str(SETTINGS.workers)},
    # Measured on 2 cores: the access log and tracing spans cost more than the model itself.
    # A short timeout: every request keeps a timer (and its objects) alive that long.
    traffic={"timeout": 10},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/predict"]},
)
class Predictor:
    """Loads the model once; answers rows of raw feature values."""

    model_ref = MODEL_REF

    def __init__(self) -> None:
        device = "cuda" if torch_backend() != "cpu" and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # One request at a time per worker: more intra-op threads only contend for the cores
            # (measured on 2 cores under load: a 32-row predict_frame took 2.4 ms with 1 thread,
            # up to 58 ms with 2). Throughput comes from SERVE_WORKERS, one process per core.
            torch.set_num_threads(1)
        self.model = load_model(STORED.path_of(WEIGHTS)).to(device)
        self.version = str(STORED.info.metadata["registry_version"])
        self.log = PredictionLog(SETTINGS.log_dir) if SETTINGS.log_enabled else None
        # Concurrent requests scored in one model call (about the cost of one request's).
        self.batcher = Batcher(self._score, max_rows=SETTINGS.max_rows)
        gc.freeze()  # the model and the imports: out of every later collection

    def _score(self, records: list[dict[str, Any]]) -> Scores:
        frame = pd.DataFrame(records, columns=list(SPEC.names))
        with torch.inference_mode():
            out = predict_frame(self.model, frame)
        return out["label"].tolist(), out[self.model.class_names].to_numpy().tolist()

    @bentoml.api
    async def predict(self, rows: Rows, ctx: bentoml.Context) -> dict[str, Any]:
        """Label and class probabilities of each row, in order."""
        labels, proba = await self.batcher([row.model_dump() for row in rows])
        answers = predictions(labels, proba, self.model.class_names)
        request_id = uuid.uuid4().hex
        ctx.response.headers[REQUEST_ID] = request_id
        if self.log is not None:
            self.log.record(request_id, self.version, rows, answers)
        return {"model_version": self.version, "predictions": answers}

    @bentoml.on_shutdown
    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()


# bentoml.service returns a Service, which its type hints give as the decorated class.
Predictor.add_asgi_middleware(Guard, token=SETTINGS.token, max_body_bytes=SETTINGS.max_body_bytes)  # type: ignore[attr-defined]
