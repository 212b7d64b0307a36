"""The registered model as an MLflow pyfunc: raw feature columns in, labels and probabilities out.

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(frame)`` takes a DataFrame of the
feature columns (by name; extra columns are ignored, missing ones are an error naming them) and
returns one row per input row: ``label`` (the class, as in the training data) and one probability
column per class, named after it. The weights travel as the project's own ``model.pt`` (loaded
with ``weights_only=True``, no pickle of the network), and the modules needed to read it travel
as the model's code, so loading needs neither the project checked out nor ``mlflow.pytorch``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

from ..core.paths import WEIGHTS
from .network import TabularClassifier, load_model, predict_frame


class TabularPyfunc(PythonModel):
    """What MLflow stores and loads; the network itself is read from the ``model.pt`` artifact."""

    model: TabularClassifier

    def load_context(self, context: Any) -> None:
        self.model = load_model(context.artifacts[WEIGHTS])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return predict_frame(self.model, pd.DataFrame(model_input))
