"""Attributions (model/explain.py): Integrated Gradients' completeness, per original column of
mixed data (numbers, categories, booleans, gaps), from the typical row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core.config import ModelParams
from my_ml_project.data.prepare import Schema
from my_ml_project.model.explain import attribute, attribute_frame, owners, typical_row
from my_ml_project.model.network import TabularClassifier, build_model

NUMERIC = Schema(features=["a", "b", "c"], target="y", classes=["cat", "dog", "eel"])
MIXED = Schema(
    features=["size", "city", "member", "tier"],
    target="y",
    classes=["no", "yes"],
    kinds={"size": "numeric", "city": "categorical", "member": "boolean", "tier": "categorical"},
    categories={"city": ["Köln", "São Paulo", "日本, 東京"], "tier": ["1", "2"]},
    missing="impute",
)
# Completeness holds up to the path integral's quadrature error: measured below 0.004 of
# probability on the default model; a wrong baseline or a lost column is off by ~0.1 and more.
TOLERANCE = 0.01


def numeric_model() -> tuple[TabularClassifier, pd.DataFrame]:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 3)) * [1.0, 100.0, 0.01] + [0.0, 500.0, 3.0]).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(NUMERIC, ModelParams(hidden_sizes=[16, 8], dropout=0.2), x)
    with torch.no_grad():  # as sharp as a trained model: probabilities far from the baseline's
        model.net[0].weight.mul_(5)
    return model.eval(), pd.DataFrame(x, columns=NUMERIC.features)


def mixed_model() -> TabularClassifier:
    x_train = np.array([[1.0, 1.0, 1, 1], [3.0, 0.0, 2, 2], [np.nan, np.nan, 3, 0]], np.float32)
    torch.manual_seed(0)
    model = build_model(MIXED, ModelParams(hidden_sizes=[8]), x_train)
    with torch.no_grad():  # trained embeddings: the known labels apart from the unknown one
        for embedding in model.embeddings:
            embedding.weight.normal_(0, 2)
    return model.eval()


def mixed_rows() -> pd.DataFrame:
    """Raw rows as a server receives them: text, booleans in several spellings, gaps."""
    return pd.DataFrame(
        {
            "size": [1.5, 30.0, None, "7", 2.0],
            "city": ["Köln", " São Paulo ", "日本, 東京", None, "Zürich"],  # Zürich: never seen
            "member": ["yes", False, "TRUE", None, 0],
            "tier": [1, 2.0, "2", np.nan, 3],
        }
    )


def check_completeness(model: TabularClassifier, frame: pd.DataFrame) -> None:
    """Each row's attributions add up to p(x) - p(typical row) of its predicted class."""
    explained = attribute_frame(model, frame)
    proba = model.predict_proba_frame(frame).double().numpy()
    with torch.no_grad():
        base = torch.softmax(model.net(typical_row(model)), dim=-1)[0].double().numpy()
    predicted = proba.argmax(axis=1)
    np.testing.assert_array_equal(explained.target, predicted)
    rows = np.arange(len(frame))
    expected = proba[rows, predicted] - base[predicted]
    assert np.abs(expected).max() > 10 * TOLERANCE, "rows as typical as the baseline prove nothing"
    np.testing.assert_allclose(explained.values.sum(axis=1), expected, atol=TOLERANCE)
    np.testing.assert_allclose(explained.error, np.abs(explained.values.sum(1) - expected))


def test_completeness_numeric() -> None:
    model, frame = numeric_model()
    check_completeness(model, frame)


def test_completeness_mixed_with_categories_booleans_and_gaps() -> None:
    check_completeness(mixed_model(), mixed_rows())


def test_one_attribution_per_original_column_however_it_is_encoded() -> None:
    model = mixed_model()
    explained = attribute_frame(model, mixed_rows().assign(ignored="x"))
    # Internally: size, member, then city's and tier's embeddings (2 columns each).
    assert owners(model).tolist() == [0, 2, 1, 1, 3, 3]
    assert explained.features == ["size", "city", "member", "tier"]
    assert explained.values.shape == (5, 4)
    assert np.isfinite(explained.values).all()
    assert [list(row) for row in explained.rows()] == [explained.features] * 5
    assert set(explained.importance()) == set(explained.features)
    assert all(v >= 0 for v in explained.importance().values())


def test_a_value_at_the_typical_row_gets_no_attribution() -> None:
    """The baseline is the train split's mean: a size of exactly that mean, or a gap (filled
    with the median, here equal to it), moves nothing."""
    model = mixed_model()
    assert model.mean[0].item() == pytest.approx(2.0)
    explained = attribute_frame(model, mixed_rows())
    assert explained.values[4, 0] == pytest.approx(0.0, abs=1e-9)  # size 2.0
    assert explained.values[2, 0] == pytest.approx(0.0, abs=1e-9)  # size missing
    assert np.abs(explained.values[1, 0]) > 1e-4  # size 30


def test_the_class_asked_for_is_the_one_explained() -> None:
    model, frame = numeric_model()
    target = np.zeros(len(frame), dtype=np.int64)
    explained = attribute(model, model.encode(frame), target)
    assert (explained.target == 0).all()
    proba = model.predict_proba_frame(frame).double().numpy()
    expected = proba[:, 0] - explained.baseline[0]
    np.testing.assert_allclose(explained.values.sum(axis=1), expected, atol=TOLERANCE)


def test_attribution_leaves_the_model_as_it_was() -> None:
    model, frame = numeric_model()
    model.train()
    attribute_frame(model, frame)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
