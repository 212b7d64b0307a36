"""The modules no stage test reaches on its own: the pyfunc wrapper, the MLflow run's tags, the
service's construction, the Bento's contents and the demo traffic (each without a server)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core import layout
from my_ml_project.core.config import ProjectError, load_params
from my_ml_project.core.paths import MODEL_NAME, WEIGHTS
from my_ml_project.data.prepare import load_frame
from my_ml_project.model.network import TabularClassifier, predict_frame, save_model
from my_ml_project.model.pyfunc import TabularPyfunc
from my_ml_project.monitoring import simulate
from my_ml_project.serving import deploy, service
from my_ml_project.training import tracking


def _model(path: Path) -> TabularClassifier:
    torch.manual_seed(0)
    model = TabularClassifier(
        ["size", "plan"], ["no", "yes"], hidden_sizes=[4],
        kinds={"size": "numeric", "plan": "categorical"}, categories={"plan": ["a", "b"]},
    ).eval()  # fmt: skip
    save_model(model, path)
    return model


def test_the_pyfunc_answers_as_predict_frame(tmp_path: Path) -> None:
    model = _model(tmp_path / WEIGHTS)
    wrapper = TabularPyfunc()
    wrapper.load_context(SimpleNamespace(artifacts={WEIGHTS: str(tmp_path / WEIGHTS)}))
    rows = pd.DataFrame({"plan": ["a", "b", "c"], "size": [0.5, -1.0, 3.0]})
    pd.testing.assert_frame_equal(wrapper.predict(None, rows), predict_frame(model, rows))


def test_run_tags_outside_git_name_no_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.git_info() == {}
    data = SimpleNamespace(md5={"train": "abc", "schema": "def"})
    assert tracking.data_tags(data) == {"data.train_md5": "abc", "data.schema_md5": "def"}  # type: ignore[arg-type]


def test_the_service_reads_its_models_and_needs_one_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service.deployed_models(tmp_path / "absent.json") == {
        "model": f"{MODEL_NAME}:latest",
        "shadow": None,
    }
    listed = tmp_path / "deployment.json"
    listed.write_text(json.dumps({"model": f"{MODEL_NAME}:v2", "shadow": f"{MODEL_NAME}:v3"}))
    assert service.deployed_models(listed)["shadow"] == f"{MODEL_NAME}:v3"
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "empty-store"))
    with pytest.raises(ProjectError, match="run `nox -s deploy` first"):
        service.build_service(deployment=tmp_path / "absent.json")


def test_the_bento_holds_the_service_s_imports_and_nothing_else(tmp_path: Path) -> None:
    extra = layout.ROOT / "serving" / "deployment.json"
    included = deploy._included(extra)
    package = layout.ROOT.name
    assert f"{package}/serving/service.py" in included
    assert f"{package}/serving/deployment.json" in included
    assert f"{package}/model/network.py" in included
    assert not [f for f in included if f.split("/")[1] in ("training", "monitoring", "registry")]
    with socket.socket() as sock:  # the port free_port found can be bound
        sock.bind(("127.0.0.1", deploy.free_port()))


def test_demo_traffic_shifts_what_it_says(prepared_project: Path) -> None:
    test, schema = load_frame("test")
    train, _ = load_frame("train")
    rng = np.random.default_rng(0)
    drawn = simulate.draw(test, len(test) + 5, rng)
    assert len(drawn) == len(test) + 5
    assert (
        drawn.iloc[: len(test)]
        .sort_values(list(test.columns))
        .reset_index(drop=True)
        .equals(test.sort_values(list(test.columns)).reset_index(drop=True))
    ), "each row once before any repeats"
    assert simulate.shift(drawn, train, schema, 0.0, rng).equals(drawn)
    moved = simulate.shift(drawn, train, schema, 0.5, rng)
    shifted = set(simulate.shifted_features(schema))
    for name in schema.features:
        if name in shifted and schema.spec.kinds[name] == "numeric":
            delta = (moved[name] - drawn[name]).mean()
            assert delta == pytest.approx(0.5 * train[name].std())
        elif name not in shifted:
            assert moved[name].equals(drawn[name])
    labels = ["yes"] * 1000
    flipped = simulate.flip(labels, ["yes", "no"], 0.3, rng)
    assert 0.25 < flipped.count("no") / 1000 < 0.35
    assert load_params().data.target not in simulate.shifted_features(schema)
