"""The model: a small MLP for tabular classification that normalises its own inputs.

Normalisation lives inside the model (as buffers saved with the weights), so whoever serves
it feeds raw feature values, in the units of the training data, and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import ModelParams, ProjectError
from .fileio import atomic_write

if TYPE_CHECKING:
    import pandas as pd

    from .data import Schema

# A constant column has std 0; dividing by it would turn every input into inf or NaN.
STD_FLOOR = 1e-6


class ModelInputError(ProjectError):
    """Input rows do not match what the model was trained on."""


class TabularClassifier(nn.Module):
    """MLP ``F -> hidden... -> C`` returning logits; inputs are standardised with stored stats."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        feature_names: Sequence[str],
        class_names: Sequence[str],
        hidden_sizes: Sequence[int] = (64, 32),
        dropout: float = 0.1,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        super().__init__()
        self.feature_names = [str(f) for f in feature_names]
        self.class_names = [str(c) for c in class_names]
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.dropout = float(dropout)
        n_features, n_classes = len(self.feature_names), len(self.class_names)
        if n_features < 1 or n_classes < 2:
            raise ValueError(f"need >= 1 feature and >= 2 classes, got {n_features}, {n_classes}")
        mean = torch.zeros(n_features) if mean is None else torch.as_tensor(mean)
        std = torch.ones(n_features) if std is None else torch.as_tensor(std)
        self.register_buffer("mean", mean.to(torch.float32).reshape(n_features).clone())
        self.register_buffer("std", std.to(torch.float32).reshape(n_features).clamp_min(STD_FLOOR))
        layers: list[nn.Module] = []
        width = n_features
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` for raw features ``x`` ``[N, F]``."""
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (eval mode), columns in ``class_names`` order."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device)
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(x).float(), dim=-1)
        finally:
            self.train(was_training)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (the stats travel in the state dict)."""
        return {
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "hidden_sizes": list(self.hidden_sizes),
            "dropout": self.dropout,
        }


def build_model(schema: Schema, params: ModelParams, x_train: np.ndarray) -> TabularClassifier:
    """A fresh model for ``schema``, normalising with the mean/std of the training features."""
    # float64 sums: float32 loses digits on large columns (areas ~1e3) over many rows.
    x = np.asarray(x_train, dtype=np.float64)
    return TabularClassifier(
        schema.features,
        schema.classes,
        hidden_sizes=params.hidden_sizes,
        dropout=params.dropout,
        mean=torch.from_numpy(x.mean(axis=0)),
        std=torch.from_numpy(x.std(axis=0)),
    )


def save_model(model: TabularClassifier, path: str | Path) -> None:
    """Save ``{"config", "state_dict"}`` (CPU tensors) atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved = {"config": model.config(), "state_dict": state}
    atomic_write(path, lambda fh: torch.save(saved, fh))


def load_model(path: str | Path) -> TabularClassifier:
    """Rebuild a model saved by :func:`save_model`, on the CPU, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"model file {path} not found: train first (`dvc repro train`)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = TabularClassifier(**saved["config"])
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ProjectError(
            f"{path} is not a model saved by save_model ({exc}): retrain (`dvc repro train`)"
        ) from None
    return model.eval()


def frame_to_tensor(model: TabularClassifier, df: pd.DataFrame) -> torch.Tensor:
    """The model's feature columns of ``df``, by name and in the model's order, float32 ``[N, F]``.

    Extra columns are ignored, so a model is scored on any frame that holds its features (the
    gate scores the champion this way on the candidate's test split).
    """
    missing = [f for f in model.feature_names if f not in df.columns]
    if missing:
        raise ModelInputError(
            f"input lacks {len(missing)} of the model's {len(model.feature_names)} feature "
            f"columns: {', '.join(missing)}. Provide every column in model.feature_names "
            "(extra columns are ignored)."
        )
    try:
        x = df[model.feature_names].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ModelInputError(f"feature columns must be numeric: {exc}") from None
    bad = [
        f for f, ok in zip(model.feature_names, np.isfinite(x).all(axis=0), strict=True) if not ok
    ]
    if bad:
        raise ModelInputError(f"missing or infinite values in columns: {', '.join(bad)}")
    return torch.from_numpy(x)


def predict_frame(model: TabularClassifier, frame: pd.DataFrame) -> pd.DataFrame:
    """``label`` and one probability column per class for each row of ``frame`` (by column name).

    The one way a raw frame becomes predictions: the MLflow pyfunc, the gate and the tests use it.
    """
    import pandas as pd

    proba = model.predict_proba(frame_to_tensor(model, frame)).cpu().numpy().astype("float64")
    out = pd.DataFrame(proba, columns=model.class_names, index=frame.index)
    out.insert(0, "label", [model.class_names[i] for i in proba.argmax(axis=1)])
    return out
