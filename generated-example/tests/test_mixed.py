"""Mixed-type data through every stage, in-process: a CSV of text categories, a yes/no flag,
numbers and gaps is prepared, trained, logged with its real column types, and scored by the gate
from raw rows, as a server would send them (unknown labels and gaps included)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core import paths
from my_ml_project.core.config import Params
from my_ml_project.data.prepare import prepare
from my_ml_project.evaluation import evaluate
from my_ml_project.registry import store as registry
from my_ml_project.training import train


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = "sqlite:///" + (tmp_path_factory.mktemp("mlflow") / "mlflow.db").as_posix()
    registry.init_store(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_mixed_csv_trains_registers_and_serves_raw_rows(
    mixed_project: Params, store: str, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    params = update_params(
        {"train": {"epochs": 20, "lr": 0.01}, "model": {"hidden_sizes": [16], "dropout": 0.0}}
    )
    prepare(params)
    run = train.run(params)
    decision = evaluate.evaluate(params)
    assert decision.decision == "promoted"
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    assert metrics["accuracy"] >= metrics["baseline_accuracy"] + 0.15, metrics

    # The registered model declares the CSV's column types, not the encoded numbers.
    name, version = run["model_name"], run["model_version"]
    info = mlflow.models.get_model_info(f"models:/{name}/{version}")
    types = {c["name"]: c["type"] for c in info.signature.inputs.to_dict()}
    assert types == {
        "tenure": "double",
        "plan": "string",
        "country": "string",
        "auto_renew": "boolean",
    }

    # Attributions per CSV column, never per embedding dimension; the label depends mostly on
    # the plan (see write_mixed_csv), little on the tenure.
    with paths.ATTRIBUTION_FILE.open() as f:
        importance = {row["feature"]: float(row["importance"]) for row in csv.DictReader(f)}
    assert set(importance) == {"tenure", "plan", "country", "auto_renew"}
    assert importance["plan"] > importance["tenure"], importance

    # The champion, as the gate loads it, answers raw rows: unknown labels, gaps, odd spellings.
    champion = registry.load_version(name, version)
    rows = pd.DataFrame(
        {
            "tenure": [12.0, None, "40"],
            "plan": ["Pro+", "Platinum (new!)", None],
            "country": ["日本", "Česko", np.nan],
            "auto_renew": ["Yes", None, True],
        }
    )
    proba = champion.predict_proba_frame(rows)
    assert proba.shape == (3, 2)
    assert torch.isfinite(proba).all()
    # The gate scores a champion from the test split's raw columns: the same numbers.
    test = evaluate.load_test_split()
    loaded = evaluate.load_champion(name, version, test)
    score = evaluate.champion_score(loaded, version, test, "accuracy")
    assert score == pytest.approx(metrics["accuracy"])

    # The registered pyfunc answers the same rows in labels, as the gate's model does.
    served = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    typed = pd.DataFrame(
        {
            "tenure": [12.0, np.nan, 40.0],
            "plan": ["Pro+", "Platinum (new!)", None],
            "country": ["日本", "Česko", None],
            "auto_renew": [True, False, True],
        }
    )
    answer = served.predict(typed)
    classes = list(champion.class_names)
    assert list(answer.columns) == ["label", *classes]
    expected = champion.predict_proba_frame(typed).numpy()
    np.testing.assert_allclose(answer[classes].to_numpy(), expected, atol=1e-6)
    assert answer["label"].tolist() == [classes[i] for i in expected.argmax(axis=1)]
