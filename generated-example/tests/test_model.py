"""The model: shapes, normalisation inside the model, save/load, and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.config import ProjectError
from my_ml_project.data import Schema
from my_ml_project.model import (
    ModelInputError,
    TabularClassifier,
    build_model,
    frame_to_tensor,
    load_model,
    save_model,
)

SCHEMA = Schema(features=["a", "b", "c"], target="y", classes=["cat", "dog", "eel"])


@pytest.fixture
def x() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Columns in very different units, as in real tabular data.
    return (rng.normal(size=(50, 3)) * [1.0, 100.0, 0.01] + [0.0, 500.0, 3.0]).astype(np.float32)


@pytest.fixture
def model(x: np.ndarray) -> TabularClassifier:
    torch.manual_seed(0)
    return build_model(SCHEMA, {"hidden_sizes": [8, 4], "dropout": 0.2}, x).eval()


def test_shapes_names_and_probabilities(model: TabularClassifier, x: np.ndarray) -> None:
    logits = model(torch.from_numpy(x))
    assert logits.shape == (50, 3)
    assert model.feature_names == SCHEMA.features
    assert model.class_names == SCHEMA.classes
    probs = model.predict_proba(x)
    assert probs.shape == (50, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(50))
    assert model.config() == {
        "feature_names": ["a", "b", "c"],
        "class_names": ["cat", "dog", "eel"],
        "hidden_sizes": [8, 4],
        "dropout": 0.2,
    }


def test_predict_proba_is_deterministic_in_train_mode(model: TabularClassifier) -> None:
    model.train()
    x = torch.randn(20, 3)
    assert torch.equal(model.predict_proba(x), model.predict_proba(x))
    assert model.training  # left as it was


def test_normalisation_buffers_hold_training_stats(model: TabularClassifier, x: np.ndarray) -> None:
    np.testing.assert_allclose(model.mean.numpy(), x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(model.std.numpy(), x.std(axis=0), rtol=1e-5)
    assert {"mean", "std"} <= set(model.state_dict())


def test_predictions_do_not_depend_on_units(model: TabularClassifier, x: np.ndarray) -> None:
    scale = np.array([1000.0, 0.001, 7.0], dtype=np.float32)
    rescaled = build_model(SCHEMA, {"hidden_sizes": [8, 4], "dropout": 0.2}, x * scale).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    rescaled.load_state_dict(weights, strict=False)
    torch.testing.assert_close(
        rescaled.predict_proba(x * scale), model.predict_proba(x), rtol=1e-4, atol=1e-5
    )


def test_constant_column_does_not_produce_nan(x: np.ndarray) -> None:
    x = x.copy()
    x[:, 1] = 5.0
    model = build_model(SCHEMA, {"hidden_sizes": [4]}, x)
    assert float(model.std[1]) > 0
    assert torch.isfinite(model.predict_proba(x)).all()


def test_save_load_round_trip(model: TabularClassifier, x: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "models" / "model.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config() == model.config()
    assert torch.equal(loaded(torch.from_numpy(x)), model(torch.from_numpy(x)))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_load_model_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ProjectError, match="not a model saved by save_model"):
        load_model(tmp_path / "other.pt")


def test_frame_to_tensor_orders_columns_and_ignores_extra(
    model: TabularClassifier, x: np.ndarray
) -> None:
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    shuffled = df[["c", "a", "b"]].assign(extra="ignored")
    assert torch.equal(frame_to_tensor(model, shuffled), torch.from_numpy(x))


def test_frame_to_tensor_lists_missing_columns(model: TabularClassifier) -> None:
    df = pd.DataFrame({"b": [1.0], "zzz": [2.0]})
    with pytest.raises(ModelInputError, match="lacks 2 of the model's 3") as info:
        frame_to_tensor(model, df)
    assert "a, c" in str(info.value)


def test_frame_to_tensor_rejects_missing_values(model: TabularClassifier) -> None:
    df = pd.DataFrame({"a": [1.0], "b": [np.nan], "c": [0.0]})
    with pytest.raises(ModelInputError, match="columns: b"):
        frame_to_tensor(model, df)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hidden_sizes": 64}, "model.hidden_sizes"),
        ({"hidden_sizes": [8, 0]}, "model.hidden_sizes"),
        ({"hidden_sizes": [8], "dropout": 1.5}, "model.dropout"),
    ],
)
def test_bad_model_params_name_the_key(x: np.ndarray, params: dict, message: str) -> None:
    with pytest.raises(ProjectError, match=message):
        build_model(SCHEMA, params, x)
