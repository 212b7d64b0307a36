"""The model: shapes, preprocessing inside the model (normalisation, gaps, categories), save/load,
and how it reads raw rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core.config import ModelParams, ProjectError
from my_ml_project.data.prepare import Schema
from my_ml_project.model.network import (
    ModelInputError,
    TabularClassifier,
    build_model,
    load_model,
    save_model,
)

SCHEMA = Schema(features=["a", "b", "c"], target="y", classes=["cat", "dog", "eel"])
MIXED = Schema(
    features=["size", "city", "member", "tier"],
    target="y",
    classes=["no", "yes"],
    kinds={"size": "numeric", "city": "categorical", "member": "boolean", "tier": "categorical"},
    categories={"city": ["Köln", "São Paulo", "日本, 東京"], "tier": ["1", "2"]},
    missing="impute",
)


@pytest.fixture
def x() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Columns in very different units, as in real tabular data.
    return (rng.normal(size=(50, 3)) * [1.0, 100.0, 0.01] + [0.0, 500.0, 3.0]).astype(np.float32)


@pytest.fixture
def model(x: np.ndarray) -> TabularClassifier:
    torch.manual_seed(0)
    return build_model(SCHEMA, ModelParams(hidden_sizes=[8, 4], dropout=0.2), x).eval()


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
        "kinds": {"a": "numeric", "b": "numeric", "c": "numeric"},
        "categories": {},
        "missing": "error",
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
    rescaled = build_model(SCHEMA, ModelParams(hidden_sizes=[8, 4], dropout=0.2), x * scale).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    rescaled.load_state_dict(weights, strict=False)
    torch.testing.assert_close(
        rescaled.predict_proba(x * scale), model.predict_proba(x), rtol=1e-4, atol=1e-5
    )


def test_constant_column_does_not_produce_nan(x: np.ndarray) -> None:
    x = x.copy()
    x[:, 1] = 5.0
    model = build_model(SCHEMA, ModelParams(hidden_sizes=[4]), x)
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


def test_encode_reads_columns_by_name_and_ignores_extra(
    model: TabularClassifier, x: np.ndarray
) -> None:
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    shuffled = df[["c", "a", "b"]].assign(extra="ignored")
    assert torch.equal(model.encode(shuffled), torch.from_numpy(x))
    torch.testing.assert_close(model.predict_proba_frame(shuffled), model.predict_proba(x))


def test_encode_lists_missing_columns(model: TabularClassifier) -> None:
    df = pd.DataFrame({"b": [1.0], "zzz": [2.0]})
    with pytest.raises(ModelInputError, match="lacks 2 of the model's 3") as info:
        model.encode(df)
    assert "a, c" in str(info.value)


def test_model_trained_without_impute_refuses_gaps(model: TabularClassifier) -> None:
    df = pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, np.inf], "c": [0.0, None]})
    with pytest.raises(ModelInputError, match=r"columns: b \(2\), c \(1\); .* data.missing: error"):
        model.encode(df)


def test_text_in_a_numeric_column_is_named(model: TabularClassifier) -> None:
    df = pd.DataFrame({"a": [1.0, "oops"], "b": [1, 2], "c": ["3", " 4.5 "]})
    with pytest.raises(ModelInputError, match=r"numeric feature columns: a \(1 value, e\.g\. 'oo"):
        model.encode(df)


# --- mixed columns: numbers, booleans and categories, gaps ---------------------------------------


def mixed_rows() -> pd.DataFrame:
    """Raw rows as a server receives them: text, booleans in several spellings, gaps."""
    return pd.DataFrame(
        {
            "size": [1.5, 30.0, None, "7", 2],
            "city": ["Köln", " São Paulo ", "日本, 東京", None, "Zürich"],  # Zürich: never seen
            "member": ["yes", False, "TRUE", None, 0],
            "tier": [1, 2.0, "2", np.nan, 3],  # codes as numbers or text: the same labels
            "ignored": ["x"] * 5,
        }
    )


@pytest.fixture
def mixed() -> TabularClassifier:
    x_train = np.array([[1.0, 1.0, 1, 1], [3.0, 0.0, 2, 2], [np.nan, np.nan, 3, 0]], np.float32)
    torch.manual_seed(0)
    return build_model(MIXED, ModelParams(hidden_sizes=[8]), x_train).eval()


def test_mixed_encoding(mixed: TabularClassifier) -> None:
    x = mixed.encode(mixed_rows()).numpy()
    # size and member (numbers, NaN for gaps), then the codes of city and tier (0: gap or unknown)
    expected = [
        [1.5, 1.0, 1, 1],
        [30.0, 0.0, 2, 2],
        [np.nan, 1.0, 3, 2],
        [7.0, np.nan, 0, 0],
        [2.0, 0.0, 0, 0],
    ]
    np.testing.assert_array_equal(x, np.array(expected, dtype=np.float32))


def test_mixed_statistics_and_embeddings(mixed: TabularClassifier) -> None:
    np.testing.assert_allclose(mixed.fill.numpy(), [2.0, 0.5])  # median size, share of members
    np.testing.assert_allclose(mixed.mean.numpy(), [2.0, 0.5])
    sizes = [(e.num_embeddings, e.embedding_dim) for e in mixed.embeddings]
    assert sizes == [(4, 2), (3, 2)]  # levels + the unknown level; min(16, (n + 1) // 2)
    assert all(not e.weight[0].any() for e in mixed.embeddings), "unknown starts neutral"


def test_unknown_categories_and_gaps_get_predictions(mixed: TabularClassifier) -> None:
    proba = mixed.predict_proba_frame(mixed_rows())
    assert proba.shape == (5, 2)
    assert torch.isfinite(proba).all()
    assert torch.allclose(proba.sum(dim=1), torch.ones(5))
    # A gap in a number is its median; an unknown city is a missing one.
    filled = mixed_rows().assign(
        size=[1.5, 30.0, 2.0, "7", 2], city=[*mixed_rows()["city"][:4], None]
    )
    torch.testing.assert_close(mixed.predict_proba_frame(filled), proba)


def test_booleans_in_any_spelling_are_one_value(mixed: TabularClassifier) -> None:
    spellings = [True, "yes", "Y", "true", "T", 1, 1.0, "1", np.True_]
    rows = pd.DataFrame({"size": 1.0, "city": "Köln", "member": spellings, "tier": 1})
    assert (mixed.encode(rows)[:, 1] == 1.0).all()
    with pytest.raises(ModelInputError, match=r"non-boolean values in boolean feature columns"):
        mixed.encode(rows.assign(member="maybe"))


def test_mixed_save_load_round_trip_with_weights_only(
    mixed: TabularClassifier, tmp_path: Path
) -> None:
    path = tmp_path / "model.pt"
    save_model(mixed, path)
    saved = torch.load(path, weights_only=True)  # plain lists and dicts only
    assert saved["config"]["categories"]["city"] == ["Köln", "São Paulo", "日本, 東京"]
    assert saved["config"]["kinds"]["member"] == "boolean"
    loaded = load_model(path)
    assert torch.equal(
        loaded.predict_proba_frame(mixed_rows()), mixed.predict_proba_frame(mixed_rows())
    )


def test_a_model_pickled_before_mixed_features_still_scores(
    model: TabularClassifier, x: np.ndarray
) -> None:
    """The registry keeps pickles of older template versions: the champion must still load."""
    old = dict(model.__dict__)
    old["feature_names"] = old.pop("spec").names
    old["_buffers"] = {k: v for k, v in old["_buffers"].items() if k != "fill"}
    old["_modules"] = {k: v for k, v in old["_modules"].items() if k != "embeddings"}
    revived = TabularClassifier.__new__(TabularClassifier)  # what unpickling does
    revived.__setstate__(old)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    assert revived.feature_names == ["a", "b", "c"]
    torch.testing.assert_close(revived.predict_proba_frame(frame), model.predict_proba(x))
