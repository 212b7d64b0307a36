"""The model: a small MLP for tabular classification that prepares its own inputs.

Everything that turns a raw row into numbers lives inside the model, so whoever serves it feeds
the columns of the CSV as they are (numbers, text, booleans, gaps) and nothing else: the feature
spec (kinds, category vocabularies, whether gaps are accepted) in its config, the train split's
statistics (fill values, mean, std) as buffers saved with the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..core.config import ModelParams, ProjectError
from ..core.features import BOOLEAN, IMPUTE, FeatureSpec, embedding_size
from ..core.features import ModelInputError as ModelInputError
from ..core.fileio import atomic_write

if TYPE_CHECKING:
    import pandas as pd

    from ..data.prepare import Schema

# A constant column has std 0; dividing by it would turn every input into inf or NaN.
STD_FLOOR = 1e-6


def _vector(values: Any, size: int, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((size,), default)
    return torch.as_tensor(values).to(torch.float32).reshape(size).clone()


class TabularClassifier(nn.Module):
    """MLP ``inputs -> hidden... -> C`` returning logits.

    Its input is :meth:`encode`'s: numeric and boolean columns, gaps filled with the train
    split's median (share of true for booleans) and standardised with stored stats; then one
    learned embedding per categorical column. Embeddings rather than one-hot: the width grows
    with min(16, (levels + 1) // 2), not with the number of levels, and the codes travel as one
    float per column in the single tensor the training loop keeps on the device. Row 0 of each
    embedding (unknown or missing label) starts at zero: a label never seen in training gets a
    neutral vector, or what the train split's gaps taught it under ``data.missing: impute``.
    """

    fill: torch.Tensor
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
        *,
        kinds: Mapping[str, str] | None = None,
        categories: Mapping[str, Iterable[str]] | None = None,
        missing: str = "error",
        fill: Any = None,
    ) -> None:
        super().__init__()
        self.spec = FeatureSpec.build(feature_names, kinds, categories, missing)
        self.class_names = [str(c) for c in class_names]
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.dropout = float(dropout)
        n_classes, n_numeric = len(self.class_names), len(self.spec.numeric)
        if not self.spec.names or n_classes < 2:
            raise ValueError(
                f"need >= 1 feature and >= 2 classes, got {self.spec.names}, {n_classes}"
            )
        mean = _vector(mean, n_numeric, 0.0)
        self.register_buffer("mean", mean)
        self.register_buffer("std", _vector(std, n_numeric, 1.0).clamp_min(STD_FLOOR))
        self.register_buffer(
            "fill", mean.clone() if fill is None else _vector(fill, n_numeric, 0.0)
        )
        embeddings = [
            nn.Embedding(len(labels) + 1, embedding_size(len(labels) + 1))
            for labels in (self.spec.categories[name] for name in self.spec.categorical)
        ]
        with torch.no_grad():
            for embedding in embeddings:
                embedding.weight[0].zero_()
        self.embeddings = nn.ModuleList(embeddings)
        layers: list[nn.Module] = []
        width = n_numeric + sum(e.embedding_dim for e in embeddings)
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    @property
    def feature_names(self) -> list[str]:
        """The raw columns the model reads, by name (in :meth:`encode`'s order within a kind)."""
        return list(self.spec.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` for encoded rows ``x`` ``[N, F]`` (see :meth:`encode`)."""
        return self.net(self.represent(x))

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """What the hidden layers read for encoded rows ``x``: the numeric and boolean columns
        filled and standardised, then each category's embedding. Differentiable in every column
        (codes are not), so the attributions (``model.explain``) are taken here."""
        n_numeric = self.mean.shape[0]
        numbers = x[:, :n_numeric] if len(self.embeddings) else x
        if self.spec.missing == IMPUTE:  # else encode() lets no gap through
            numbers = torch.where(torch.isnan(numbers), self.fill, numbers)
        parts = [(numbers - self.mean) / self.std]
        if len(self.embeddings):
            codes = x[:, n_numeric:].long()
            parts += [embed(codes[:, i]) for i, embed in enumerate(self.embeddings)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def encode(self, frame: pd.DataFrame) -> torch.Tensor:
        """The model's input for a frame of raw feature columns, read by name (extra ones are
        ignored): float32 ``[N, F]`` on the model's device. The one door from rows to tensors.

        Missing columns, text in a numeric column, or gaps in a model trained without
        ``data.missing: impute`` raise ModelInputError; an unknown category never does.
        """
        return torch.from_numpy(self.spec.encode(frame)).to(self.mean.device)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (eval mode) of encoded rows, in ``class_names`` order."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device)
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(x).float(), dim=-1)
        finally:
            self.train(was_training)

    def predict_proba_frame(self, frame: pd.DataFrame) -> torch.Tensor:
        """Class probabilities ``[N, C]`` of raw rows: :meth:`encode` then :meth:`predict_proba`."""
        return self.predict_proba(self.encode(frame))

    def config(self) -> dict[str, Any]:
        """Constructor arguments in plain types (the statistics travel in the state dict)."""
        return {
            "feature_names": self.feature_names,
            "class_names": list(self.class_names),
            "hidden_sizes": list(self.hidden_sizes),
            "dropout": self.dropout,
            **self.spec.to_config(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "spec" not in self.__dict__:
            # Pickled (in the MLflow registry) by a template version with numeric features only:
            # a champion of that time must still load and be scored by the gate.
            self.spec = FeatureSpec.build(self.__dict__.pop("feature_names"))
            self.register_buffer("fill", self.mean.clone())
            self.embeddings = nn.ModuleList()


def build_model(schema: Schema, params: ModelParams, x_train: np.ndarray) -> TabularClassifier:
    """A fresh model for ``schema``, its statistics taken from the encoded train split.

    Fill values are the median of each numeric column and the share of true of each boolean;
    gaps are left out of the statistics.
    """
    spec = schema.spec
    # float64 sums: float32 loses digits on large columns (areas ~1e3) over many rows.
    x = np.asarray(x_train, dtype=np.float64)[:, : len(spec.numeric)]
    with warnings.catch_warnings():  # a column without values in the train split: NaN, below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std, median = np.nanmean(x, axis=0), np.nanstd(x, axis=0), np.nanmedian(x, axis=0)
    boolean = np.array([spec.kinds[name] == BOOLEAN for name in spec.numeric], dtype=bool)
    fill = np.where(boolean, mean, median)
    return TabularClassifier(
        spec.names,
        schema.classes,
        hidden_sizes=params.hidden_sizes,
        dropout=params.dropout,
        mean=torch.from_numpy(np.nan_to_num(mean)),
        std=torch.from_numpy(np.nan_to_num(std, nan=1.0)),
        fill=torch.from_numpy(np.nan_to_num(fill)),
        **spec.to_config(),
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


def predict_frame(model: TabularClassifier, frame: pd.DataFrame) -> pd.DataFrame:
    """``label`` and one probability column per class for each row of ``frame`` (by column name).

    The MLflow pyfunc, batch scoring and the service answer through this (one contract).
    """
    import pandas as pd

    proba = model.predict_proba_frame(frame).cpu().numpy().astype("float64")
    out = pd.DataFrame(proba, columns=model.class_names, index=frame.index)
    labels = np.asarray(model.class_names, dtype=object)  # a take, not a Python loop a row
    out.insert(0, "label", labels[proba.argmax(axis=1)])
    return out
