"""The reference for benchmarks/serve.py: a FastAPI ``async def`` server of the same model, doing
the same work per request as the generated service, without BentoML and without its batching.

It loads ``models/model.pt`` and answers ``POST /predict`` with the service's JSON contract,
through the service's own pieces: the request schema (:func:`serving.rows_type`), the
``Guard`` middleware (Host allowlist, token, content type, body size, unknown fields, the
``X-Request-ID``), the float32 overflow check, :func:`model.predict_frame` with one PyTorch
thread per worker, and the prediction log (``PREDICTION_LOG``, ``PREDICTION_LOG_DIR``: each row
queued for the log's writer thread, as the service does). ``BENCH_BARE=1`` leaves out the
Guard, the overflow check and the log (the reference before this benchmark did that work too).
No access log. ``GET /readyz`` answers once the model is loaded. Run with the project's Python,
from the project's folder:

    BENCH_PACKAGE=my_ml_project .venv/bin/python ../../benchmarks/serve_fastapi.py --port 3001
"""

import argparse
import contextlib
import importlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


def create_app() -> Any:
    import numpy as np
    import pandas as pd
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, create_model

    package = os.environ["BENCH_PACKAGE"]
    features = importlib.import_module(f"{package}.core.features")
    model_mod = importlib.import_module(f"{package}.model.network")
    serving = importlib.import_module(f"{package}.serving.contract")
    predlog = importlib.import_module(f"{package}.serving.predlog")
    settings = serving.ServeSettings.from_env()
    bare = os.environ.get("BENCH_BARE") == "1"

    # As the generated service does on CPU: one intra-op thread per worker process.
    torch.set_num_threads(1)
    model = model_mod.load_model(os.environ.get("BENCH_MODEL", "models/model.pt"))
    config = model.config()
    spec = features.FeatureSpec.build(
        config["feature_names"], config["kinds"], config["categories"], config["missing"]
    )
    request_type: type[BaseModel] = create_model(
        "PredictRequest", rows=(serving.rows_type(spec, 1000), ...)
    )
    names, classes, version = list(spec.names), model.class_names, "bench"
    mean, std = model.mean.cpu().numpy(), model.std.cpu().numpy()
    log = None
    if settings.log_enabled and not bare:
        log = predlog.PredictionLog(
            settings.log_dir, categorical=spec.categorical, max_pending=settings.log_max_pending
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if log is not None:
            log.close()

    app = FastAPI(lifespan=lifespan)
    if not bare:
        app.add_middleware(
            serving.Guard, settings=settings, fields={"/predict": frozenset({"rows"})}
        )

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: request_type, http: Request) -> Any:  # type: ignore[valid-type]
        records = [row.model_dump() for row in request.rows]
        if not bare:
            problems = serving.overflow_errors(records, spec.numeric, mean, std)
            if problems:
                error = {"error": "values the model cannot compute", "detail": problems}
                return JSONResponse(error, status_code=422)
        frame = pd.DataFrame(records, columns=names)
        with torch.inference_mode():
            out = model_mod.predict_frame(model, frame)
        proba = out[classes].to_numpy()
        if not bare and not np.isfinite(proba).all():
            return JSONResponse({"error": "values the model cannot compute"}, status_code=422)
        answers = serving.predictions(out["label"].tolist(), proba.tolist(), classes)
        if log is not None:
            request_id = http.headers.get(serving.REQUEST_ID) or uuid.uuid4().hex
            log.record(request_id, version, records, answers)
        return {"model_version": version, "predictions": answers}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    uvicorn.run(
        "serve_fastapi:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
