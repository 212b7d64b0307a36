"""The reference for benchmarks/serve.py: a minimal FastAPI ``async def`` server of the same model.

It loads ``models/model.pt`` and answers ``POST /predict`` with the generated service's JSON
contract, through the same request schema (:func:`serving.rows_type`) and the same
:func:`model.predict_frame`, one PyTorch thread per worker as the service; no token, no
prediction log, no access log. ``GET /readyz`` answers once the model is loaded. Run with the
project's Python, from the project's folder:

    BENCH_PACKAGE=my_ml_project .venv/bin/python ../../benchmarks/serve_fastapi.py --port 3001
"""

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any


def create_app() -> Any:
    import pandas as pd
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel, create_model

    package = os.environ["BENCH_PACKAGE"]
    features = importlib.import_module(f"{package}.core.features")
    model_mod = importlib.import_module(f"{package}.model.network")
    serving = importlib.import_module(f"{package}.serving.contract")

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
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: request_type) -> dict[str, Any]:  # type: ignore[valid-type]
        frame = pd.DataFrame([row.model_dump() for row in request.rows], columns=names)
        with torch.inference_mode():
            out = model_mod.predict_frame(model, frame)
        answers = serving.predictions(
            out["label"].tolist(), out[classes].to_numpy().tolist(), classes
        )
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
