"""The evaluate stage: metrics, plots and the promotion gate, against a real MLflow store.

The candidate models are linear models with hand-set weights on the standardised synthetic
features (whose class means differ on every feature): no training, same scores on every run.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from my_ml_project.core import paths
from my_ml_project.core.config import ModelParams, Params, ProjectError, SliceParams
from my_ml_project.data.prepare import Schema, load_frame, load_row_keys, load_split
from my_ml_project.evaluation import evaluate
from my_ml_project.evaluation import slices as slicing
from my_ml_project.model.network import TabularClassifier, build_model, save_model
from my_ml_project.registry import store as registry
from my_ml_project.training import train

GATE_KEYS = {
    "decision",
    "reason",
    "metric",
    "candidate_version",
    "candidate_score",
    "baseline_score",
    "champion_version",
    "champion_score",
    "margin",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An initialised SQLite store shared by the module's tests (creating one costs seconds)."""
    uri = "sqlite:///" + (tmp_path_factory.mktemp("mlflow") / "mlflow.db").as_posix()
    registry.init_store(uri)
    return uri


@pytest.fixture
def params(
    prepared_project: Path,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
    update_params: Callable[[dict[str, Any]], Params],
) -> Params:
    """Prepared data, the shared store, and a registered model name of this test's own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return update_params({"mlflow": {"model_name": prepared_project.name}})


def linear_model(weights: list[float], bias: list[float] | None = None) -> TabularClassifier:
    """Logits = [0, weights . z] + bias on standardised features z; no hidden layer."""
    x, _, schema = load_split("train")
    model = build_model(schema, ModelParams(hidden_sizes=[], dropout=0.0), x)
    layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1] = torch.tensor(weights)
        layer.bias.copy_(torch.tensor(bias or [0.0] * len(schema.classes)))
    return model.eval()


def good_model() -> TabularClassifier:
    return linear_model([1.0, 1.0, 1.0, 1.0])


def weak_model() -> TabularClassifier:
    """Looks at one feature of four: better than chance, worse than ``good_model``."""
    return linear_model([1.0, 0.0, 0.0, 0.0])


def constant_model() -> TabularClassifier:
    """Ignores its input and predicts the train split's majority class, like the baseline."""
    _, y, schema = load_split("train")
    bias = [0.0] * len(schema.classes)
    bias[int(np.bincount(y).argmax())] = 1.0
    return linear_model([0.0, 0.0, 0.0, 0.0], bias)


def publish(
    model: TabularClassifier, params: Params, seen: np.ndarray | None = None, record: bool = True
) -> dict[str, str]:
    """What train does after fitting: save, log and register the model, write models/run.json.

    ``seen``: the row keys the run records as trained on (default: the train and val splits');
    ``record=False``: none, as runs of older releases.
    """
    save_model(model, paths.MODEL_FILE)
    registry.configure(params.mlflow)
    example = pd.DataFrame(np.ones((2, len(model.feature_names))), columns=model.feature_names)
    if seen is None:
        seen = np.concatenate([load_row_keys("train"), load_row_keys("val")])
    with mlflow.start_run() as run:
        logged = registry.log_model(model, example)
        if record:
            table = paths.PROCESSED_DIR / paths.SEEN_ROWS_ARTIFACT
            pd.DataFrame({"key": seen}).to_parquet(table, index=False)
            mlflow.log_artifact(str(table))
            mlflow.set_tag(registry.SEEN_ROWS_TAG, str(len(seen)))
            table.unlink()
    name = params.mlflow.model_name
    info = {
        "run_id": run.info.run_id,
        "model_name": name,
        "model_version": registry.register(logged.model_uri, name),
    }
    paths.RUN_FILE.write_text(json.dumps(info))
    return info


def gate() -> dict[str, Any]:
    return json.loads(paths.GATE_FILE.read_text())


def version_tags(name: str, version: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(name, version).tags


def test_first_model_is_promoted(params: Params, capsys: pytest.CaptureFixture[str]) -> None:
    info = publish(good_model(), params)
    assert evaluate.main([]) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out
    assert "no champion" in out
    name = info["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == info["model_version"]
    assert version_tags(name, info["model_version"])["gate"] == "promoted"
    decision = gate()
    assert decision.keys() >= GATE_KEYS
    assert decision["decision"] == "promoted"
    assert decision["candidate_score"] > decision["baseline_score"]

    metrics = json.loads(paths.EVAL_METRICS.read_text())
    expected = (
        "accuracy",
        "f1",
        "log_loss",
        "roc_auc",
        "n_test",
        "baseline_accuracy",
        "baseline_f1",
    )
    for key in expected:
        assert isinstance(metrics[key], int | float), key
    assert metrics["f1"] > metrics["baseline_f1"]
    run = mlflow.MlflowClient().get_run(info["run_id"])
    assert run.data.metrics["test_f1"] == pytest.approx(metrics["f1"])
    assert run.data.tags["gate"] == "promoted"

    # Unchanged model, evaluated again (e.g. after a params edit): it stays champion.
    assert evaluate.main([]) == 0
    assert "already is the champion" in capsys.readouterr().out
    assert registry.get_alias_version(name, registry.CHAMPION) == info["model_version"]


def test_plots_parse(params: Params) -> None:
    publish(good_model(), params)
    assert evaluate.main([]) == 0
    _, y, schema = load_split("test")
    with paths.CONFUSION_FILE.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(y)
    assert {r["actual"] for r in rows} | {r["predicted"] for r in rows} <= set(schema.classes)
    assert sorted(r["actual"] for r in rows) == sorted(schema.classes[i] for i in y)
    with paths.CURVE_FILE.open() as f:
        curve = [(float(r["x"]), float(r["y"])) for r in csv.DictReader(f)]
    assert curve[0] == (0.0, 0.0)
    assert curve[-1] == (1.0, 1.0)
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in curve)


def attributions_file(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {row["feature"]: float(row["importance"]) for row in csv.DictReader(f)}


def test_attributions_of_the_candidate_and_the_champion_per_feature(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    champion = publish(good_model(), params)
    assert evaluate.main([]) == 0
    assert attributions_file(paths.ATTRIBUTION_CHAMPION_FILE) == {}, "no champion before it"
    candidate = publish(weak_model(), params)
    assert evaluate.main([]) == 0
    out = capsys.readouterr().out
    assert f"attributions of challenger v{candidate['model_version']}: " in out
    assert f"attributions of champion v{champion['model_version']}: " in out
    first, *others = load_split("test")[2].features
    mine = attributions_file(paths.ATTRIBUTION_FILE)
    theirs = attributions_file(paths.ATTRIBUTION_CHAMPION_FILE)
    assert set(mine) == set(theirs) == {first, *others}
    # The weak model reads its first feature only; the good one all four.
    assert mine[first] > 0
    assert all(mine[name] == 0 for name in others)
    assert all(theirs[name] > 0 for name in (first, *others))
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(candidate["run_id"])}
    assert {paths.ATTRIBUTION_FILE.name, paths.ATTRIBUTION_CHAMPION_FILE.name} <= logged
    error = client.get_run(candidate["run_id"]).data.metrics["test_attribution_error"]
    assert 0 <= error < 0.01


def test_worse_model_is_not_promoted(params: Params, capsys: pytest.CaptureFixture[str]) -> None:
    champion = publish(good_model(), params)
    assert evaluate.main([]) == 0
    candidate = publish(weak_model(), params)
    assert evaluate.main([]) == 0, "a valid but worse model must not break `dvc repro`"
    out = capsys.readouterr().out
    v_old, v_new = champion["model_version"], candidate["model_version"]
    assert "NOT PROMOTED: on " in out
    assert f"candidate v{v_new} f1=" in out
    assert f"<= champion v{v_old} f1=" in out
    name = candidate["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == v_old
    assert registry.get_alias_version(name, registry.CHALLENGER) == v_new
    assert version_tags(name, v_new)["gate"] == "not_promoted"
    decision = gate()
    assert decision["decision"] == "not_promoted"
    assert decision["champion_version"] == v_old
    assert decision["baseline_score"] < decision["candidate_score"] < decision["champion_score"]


def test_a_tie_never_promotes(
    params: Params, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    first = publish(good_model(), params)
    assert evaluate.main([]) == 0
    publish(good_model(), params)
    assert evaluate.main([]) == 0
    assert gate()["decision"] == "not_promoted"
    assert gate()["candidate_holdout_score"] == gate()["champion_score"]
    name = first["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == first["model_version"]
    with pytest.raises(ProjectError, match=r"evaluate\.promotion_margin"):
        update_params({"evaluate": {"promotion_margin": 0.0}})


def test_the_gate_judges_both_models_on_rows_neither_trained_on(params: Params) -> None:
    """A champion trained on half of today's test rows (an older split) is judged on the rest."""
    test_keys = load_row_keys("test")
    own = np.concatenate([load_row_keys("train"), load_row_keys("val")])
    champion = publish(weak_model(), params, seen=np.concatenate([own, test_keys[::2]]))
    assert evaluate.main([]) == 0
    publish(good_model(), params)
    assert evaluate.main([]) == 0
    decision = gate()
    assert decision["excluded_rows"] == len(test_keys[::2])
    assert decision["holdout_rows"] == len(test_keys) - len(test_keys[::2])
    assert decision["decision"] == "promoted"
    assert f"on {decision['holdout_rows']} holdout rows" in decision["reason"]
    assert champion["model_version"] != decision["candidate_version"]


def test_too_small_a_holdout_is_undecided(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    everything = np.concatenate([load_row_keys(s) for s in ("train", "val", "test")])
    champion = publish(weak_model(), params, seen=everything)
    assert evaluate.main([]) == 0
    publish(good_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    err = capsys.readouterr().err
    assert "only 0 of" in err
    assert "evaluate.min_holdout is 5" in err
    assert "Fix: add fresh labelled rows" in err
    name = champion["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == champion["model_version"]


def test_a_champion_without_a_record_of_its_rows_is_undecided(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    champion = publish(weak_model(), params, record=False)
    assert evaluate.main([]) == 0  # the first champion needs no comparison
    publish(good_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    assert "recorded no training rows" in capsys.readouterr().err
    name = champion["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == champion["model_version"]
    assert evaluate.main(["--replace-unloadable-champion"]) == 0
    assert gate()["decision"] == "promoted"


def test_a_rolled_back_version_stays_out_until_unblocked(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    old = publish(weak_model(), params)
    assert evaluate.main([]) == 0
    new = publish(good_model(), params)
    assert evaluate.main([]) == 0
    name = new["model_name"]
    assert registry.rollback(name) == (new["model_version"], old["model_version"])
    capsys.readouterr()
    assert evaluate.main([]) == 0  # the same candidate, evaluated again (CI, a retrain)
    assert gate()["decision"] == "blocked"
    assert f"nox -s unblock -- {new['model_version']}" in capsys.readouterr().out
    assert registry.get_alias_version(name, registry.CHAMPION) == old["model_version"]
    assert registry.get_alias_version(name, registry.CHALLENGER) is None
    assert "rolled back" in registry.unblock(name, new["model_version"])
    with pytest.raises(registry.RegistryError, match="is not blocked"):
        registry.unblock(name, new["model_version"])
    assert evaluate.main([]) == 0
    assert gate()["decision"] == "promoted"
    assert registry.get_alias_version(name, registry.CHAMPION) == new["model_version"]


def test_no_better_than_baseline_fails_the_gate(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    info = publish(constant_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_FAILED_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error: GATE FAILED: candidate v1 f1 ")
    assert "<= baseline" in err
    assert "Traceback" not in err
    name, version = info["model_name"], info["model_version"]
    assert registry.get_alias_version(name, registry.CHAMPION) is None
    assert registry.get_alias_version(name, registry.CHALLENGER) is None  # a tag, no alias
    assert version_tags(name, version)["gate"] == "failed"
    assert gate()["decision"] == "failed"
    f1 = json.loads(paths.EVAL_METRICS.read_text())["f1"]
    assert f1 == pytest.approx(gate()["baseline_score"], abs=1e-6)


def test_min_score_fails_the_gate(
    params: Params,
    update_params: Callable[[dict[str, Any]], Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = update_params({"evaluate": {"min_score": 1.0}})
    publish(weak_model(), params)
    assert evaluate.main([]) == evaluate.GATE_FAILED_EXIT
    err = capsys.readouterr().err
    assert "error: GATE FAILED:" in err
    assert "< evaluate.min_score 1.0000" in err


def reordered(model: TabularClassifier) -> TabularClassifier:
    """The same model reading its features in reverse order (as after editing data.features)."""
    flipped = TabularClassifier(
        model.feature_names[::-1],
        model.class_names,
        model.hidden_sizes,
        model.dropout,
        mean=model.mean.flip(0),
        std=model.std.flip(0),
    )
    state = model.state_dict()
    for stat in ("mean", "std", "fill"):
        state[stat] = state[stat].flip(0)
    state["net.0.weight"] = state["net.0.weight"].flip(1)
    flipped.load_state_dict(state)
    return flipped.eval()


def first_features(model: TabularClassifier, n: int) -> TabularClassifier:
    """``model`` restricted to its first ``n`` features (the candidate has more columns)."""
    small = TabularClassifier(
        model.feature_names[:n], model.class_names, model.hidden_sizes, model.dropout,
        mean=model.mean[:n], std=model.std[:n],
    )  # fmt: skip
    state = model.state_dict()
    for stat in ("mean", "std", "fill"):
        state[stat] = state[stat][:n]
    state["net.0.weight"] = state["net.0.weight"][:, :n]
    small.load_state_dict(state)
    return small.eval()


def crown(info: dict[str, str]) -> None:
    """Make a version champion directly (its features differ from this split's schema)."""
    registry.set_alias(info["model_name"], registry.CHAMPION, info["model_version"])


def test_champion_is_scored_by_column_name(params: Params) -> None:
    good = good_model()
    champion = publish(reordered(good), params)
    crown(champion)
    publish(weak_model(), params)
    assert evaluate.main([]) == 0
    decision = gate()
    assert decision["decision"] == "not_promoted"
    assert decision["champion_version"] == champion["model_version"]
    publish(good, params)
    assert evaluate.main([]) == 0
    # The same weights read in another order score exactly the same: a real comparison.
    assert gate()["champion_score"] == pytest.approx(gate()["candidate_score"])


def test_champion_on_fewer_columns_is_compared(params: Params) -> None:
    crown(publish(first_features(good_model(), 2), params))
    publish(good_model(), params)
    assert evaluate.main([]) == 0
    decision = gate()
    assert decision["champion_score"] is not None
    assert decision["decision"] in ("promoted", "not_promoted")


def test_champion_that_cannot_read_the_split_is_not_replaced(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user switched datasets: the old champion cannot be scored on the new test split."""
    schema = load_split("train")[2]
    old = TabularClassifier([f"old_{f}" for f in schema.features], schema.classes, [4], 0.0)
    old_info = publish(old.eval(), params)
    name, old_version = old_info["model_name"], old_info["model_version"]
    crown(old_info)
    info = publish(good_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    err = capsys.readouterr().err
    assert err.startswith(f"error: GATE UNDECIDED: champion v{old_version} cannot be scored")
    assert "old_feature_0" in err
    assert registry.get_alias_version(name, registry.CHAMPION) == old_version
    assert gate()["decision"] == "undecided"

    assert evaluate.main(["--replace-unloadable-champion"]) == 0
    assert "replaced on purpose" in capsys.readouterr().out
    assert registry.get_alias_version(name, registry.CHAMPION) == info["model_version"]


def test_unloadable_champion_keeps_its_alias(
    params: Params, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The artefact store lost the champion's files: a worse model must not take its place."""
    champion = publish(good_model(), params)
    assert evaluate.main([]) == 0
    name, version = champion["model_name"], champion["model_version"]
    location = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    shutil.rmtree(Path(mlflow.utils.file_utils.local_file_uri_to_path(location)))

    candidate = publish(weak_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    err = capsys.readouterr().err
    assert err.startswith(f"error: GATE UNDECIDED: champion v{version} cannot be loaded")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert registry.get_alias_version(name, registry.CHAMPION) == version
    assert registry.get_alias_version(name, registry.CHALLENGER) is None
    assert version_tags(name, candidate["model_version"])["gate"] == "undecided"

    # Replacing it is a decision a person takes, here through the environment (as via dvc).
    monkeypatch.setenv(evaluate.REPLACE_ENV, "1")
    assert evaluate.main([]) == 0
    assert registry.get_alias_version(name, registry.CHAMPION) == candidate["model_version"]


def test_failed_model_never_displaces_the_challenger(params: Params) -> None:
    publish(good_model(), params)
    assert evaluate.main([]) == 0
    challenger = publish(weak_model(), params)
    assert evaluate.main([]) == 0
    name = challenger["model_name"]
    assert registry.get_alias_version(name, registry.CHALLENGER) == challenger["model_version"]
    failed = publish(constant_model(), params)
    assert evaluate.main([]) == evaluate.GATE_FAILED_EXIT
    assert registry.get_alias_version(name, registry.CHALLENGER) == challenger["model_version"]
    assert version_tags(name, failed["model_version"])["gate"] == "failed"


def test_champion_moved_during_comparison_is_compared_again(
    params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compare-and-set: a champion that changes between the comparison and the alias move."""
    first = publish(weak_model(), params)
    assert evaluate.main([]) == 0
    better = publish(good_model(), params)
    name = better["model_name"]
    candidate = publish(weak_model(), params)
    real_compare, calls = evaluate.compare, []

    def compare_then_someone_moves_the_alias(*args: Any) -> None:
        real_compare(*args)
        calls.append(args[0].champion_version)
        if len(calls) == 1:  # another process promotes `better` meanwhile
            registry.set_alias(name, registry.CHAMPION, better["model_version"])

    monkeypatch.setattr(evaluate, "compare", compare_then_someone_moves_the_alias)
    assert evaluate.main([]) == 0
    assert calls == [first["model_version"], better["model_version"]]
    decision = gate()
    assert decision["decision"] == "not_promoted"
    assert decision["candidate_version"] == candidate["model_version"]
    assert registry.get_alias_version(name, registry.CHAMPION) == better["model_version"]


@pytest.mark.slow
def test_evaluates_what_train_writes(
    params: Params,
    update_params: Callable[[dict[str, Any]], Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The contract between the stages: models/model.pt and models/run.json as train writes them."""
    params = update_params({"train": {"epochs": 15, "lr": 0.01, "patience": 0}})
    run = train.run(params)
    assert evaluate.main([]) == 0, capsys.readouterr().err
    decision = gate()
    assert decision["decision"] == "promoted"
    assert decision["candidate_version"] == run["model_version"]
    assert registry.get_alias_version(run["model_name"], registry.CHAMPION) == run["model_version"]
    assert "test_f1" in mlflow.MlflowClient().get_run(run["run_id"]).data.metrics


def test_missing_training_output_is_a_clear_error(
    prepared_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models/run.json not found")
    assert "Traceback" not in err


def test_multiclass_metrics_and_micro_roc() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    proba = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1
    metrics = evaluate.compute_metrics(y, proba)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert 0.5 < metrics["roc_auc"] <= 1
    curve = evaluate.roc_points(y, proba)
    assert curve[0] == (0.0, 0.0)
    assert curve[-1] == (1.0, 1.0)
    # A class missing from the test split: roc_auc is undefined, the rest is not.
    assert "roc_auc" not in evaluate.compute_metrics(y[y < 2], proba[y < 2])


def test_unreachable_store_promotes_nothing(
    params: Params, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server that is down (or credentials that expired): fail closed, in one line."""
    publish(good_model(), params)
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    err = capsys.readouterr().err
    assert err.startswith(f"error: GATE UNDECIDED: the MLflow store http://127.0.0.1:{port} failed")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert gate()["decision"] == "undecided"


def _commit_all() -> None:
    """The project folder as a git repository with everything committed."""
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-qm", "work"]):
        subprocess.run(["git", *args], check=True, capture_output=True)


def test_uncommitted_code_or_config_never_promotes(
    params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = publish(good_model(), params)
    _commit_all()
    with Path("params.yaml").open("a") as fh:
        fh.write("# tried something\n")
    assert evaluate.main([]) == 0  # a valid model: the pipeline goes on
    decision = gate()
    assert decision["decision"] == "uncommitted"
    assert "params.yaml" in decision["reason"]
    name = info["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) is None
    monkeypatch.setenv(evaluate.UNCOMMITTED_ENV, "1")  # on purpose
    assert evaluate.main([]) == 0
    assert gate()["decision"] == "promoted"


def test_a_dvc_experiment_never_promotes(
    params: Params, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = publish(good_model(), params)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lr")  # what `dvc exp run` sets for its stages
    assert evaluate.main([]) == 0
    assert "experiments never move champion" in capsys.readouterr().out
    name, version = info["model_name"], info["model_version"]
    assert gate()["decision"] == "experiment"
    assert version_tags(name, version)["experiment"] == "lucky-lr"
    assert registry.get_alias_version(name, registry.CHAMPION) is None


def test_a_store_without_the_committed_champion_is_undecided(
    params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh clone (or CI) pointed at a new, empty store must not start a second registry."""
    name = params.mlflow.model_name
    paths.GATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    committed = {"decision": "promoted", "model_name": name, "candidate_version": "7"}
    paths.GATE_FILE.write_text(json.dumps(committed))
    publish(good_model(), params)
    _commit_all()
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_UNDECIDED_EXIT
    err = capsys.readouterr().err
    assert f"names champion v7 of '{name}'" in err
    assert "Fix: point MLFLOW_TRACKING_URI at the project's registry" in err
    assert registry.get_alias_version(name, registry.CHAMPION) is None


# Slices (evaluation/slices.py) and the gate's slice rule.


def sliced_split(n: int = 80) -> evaluate.TestSplit:
    """A test split of ``n`` rows sliced by ``plan`` (half basic, half pro); every label is 1."""
    frame = pd.DataFrame({"plan": ["basic", "pro"] * (n // 2), "label": ["1"] * n})
    schema = Schema(["plan"], "label", ["0", "1"], kinds={"plan": "categorical"})
    test = evaluate.TestSplit(
        frame, np.ones(n, dtype=np.int64), schema, np.arange(n, dtype=np.uint64)
    )
    test.slices = slicing.make_slicer(SliceParams(columns=["plan"]), schema, frame).labels(frame)
    return test


def decision(max_drop: float = 0.1, min_rows: int = 30) -> evaluate.Decision:
    return evaluate.Decision(
        decision="promoted", reason="", metric="accuracy", model_name="m",
        candidate_version="2", candidate_score=0.9, baseline_score=0.5, min_score=0.0,
        margin=0.001, champion_version="1", max_slice_drop=max_drop, min_slice_rows=min_rows,
    )  # fmt: skip


def test_a_regression_on_one_slice_refuses_promotion_naming_the_slice() -> None:
    """The candidate is right on every basic row and on 70% of pro rows (the champion: on all
    rows): better overall need not be better for everyone."""
    test = sliced_split()
    pro = test.frame["plan"].to_numpy() == "pro"
    wrong = pro & (np.cumsum(pro) % 10 < 3)  # 12 of the 40 pro rows
    test.proba = np.where(wrong[:, None], [0.9, 0.1], [0.1, 0.9])
    d = decision()
    evaluate.slice_rule(d, test, champion_pred=np.ones(len(test.y), dtype=np.int64))
    assert d.decision == "slice_regression"
    assert "on slice plan=pro (40 holdout rows) accuracy 0.7000 < champion's 1.0000" in d.reason
    assert "plan=basic" not in d.reason
    assert [x["slice"] for x in d.slice_drops] == ["plan=pro"]
    summary = evaluate.slice_summary(d)
    assert summary.startswith("GATE FAILED (slice): candidate v2 ")
    assert len(summary.splitlines()) == 1


def test_the_slice_rule_ignores_small_slices_and_small_drops() -> None:
    test = sliced_split()
    pro = test.frame["plan"].to_numpy() == "pro"
    wrong = pro & (np.cumsum(pro) % 10 < 3)
    test.proba = np.where(wrong[:, None], [0.9, 0.1], [0.1, 0.9])
    champion = np.ones(len(test.y), dtype=np.int64)
    small = decision(min_rows=41)  # the pro slice holds 40 rows: reported, not judged
    evaluate.slice_rule(small, test, champion)
    assert (small.decision, small.slice_drops) == ("promoted", [])
    tolerant = decision(max_drop=0.3)  # a drop of exactly 0.3 is allowed
    evaluate.slice_rule(tolerant, test, champion)
    assert tolerant.decision == "promoted"


def test_a_slice_regression_blocks_promotion_through_the_gate(
    params: Params,
    update_params: Callable[[dict[str, Any]], Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The model reading all four features beats the one reading feature_0 alone overall, but
    not on the synthetic holdout's upper half of feature_1 (9 rows: 7 right against 8)."""
    sliced = {"slices": {"columns": ["feature_1"], "bins": 2}, "min_slice_rows": 5}
    params = update_params({"evaluate": {**sliced, "max_slice_drop": 0.1}})
    champion = publish(weak_model(), params)
    assert evaluate.main([]) == 0
    candidate = publish(good_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == evaluate.GATE_FAILED_EXIT
    err = capsys.readouterr().err
    v_old, v_new = champion["model_version"], candidate["model_version"]
    assert err.startswith(
        f"error: GATE FAILED (slice): candidate v{v_new} beats champion v{v_old} overall, but "
        "on slice feature_1 in ["
    ), err
    assert "(9 holdout rows) accuracy 0.7778 < champion's 0.8889" in err
    assert len(err.strip().splitlines()) == 1
    name = candidate["model_name"]
    assert registry.get_alias_version(name, registry.CHAMPION) == v_old
    assert registry.get_alias_version(name, registry.CHALLENGER) is None  # a tag, no alias
    assert version_tags(name, v_new)["gate"] == "slice_regression"
    assert [d["rows"] for d in gate()["slice_drops"]] == [9]
    # A drop the rule tolerates: the same candidate is promoted.
    update_params({"evaluate": {**sliced, "max_slice_drop": 0.2}})
    assert evaluate.main([]) == 0
    assert registry.get_alias_version(name, registry.CHAMPION) == v_new


def test_numeric_slices_use_bin_edges_of_the_train_split(prepared_project: Path) -> None:
    train, schema = load_frame("train")
    test, _ = load_frame("test")
    slicer = slicing.make_slicer(SliceParams(columns=["feature_0"], bins=4), schema, train)
    edges = slicer.edges["feature_0"]
    assert edges == pytest.approx(list(np.quantile(train["feature_0"], [0.25, 0.5, 0.75])))
    assert edges != pytest.approx(list(np.quantile(test["feature_0"], [0.25, 0.5, 0.75])))
    labels = slicer.labels(test)["feature_0"]
    assert labels.nunique() <= 4
    first = test["feature_0"].to_numpy() < edges[0]
    assert set(labels[first]) == {f"feature_0 in [-inf, {edges[0]:.6g})"}


def test_an_unknown_slice_column_is_a_one_line_error(
    params: Params,
    update_params: Callable[[dict[str, Any]], Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = update_params({"evaluate": {"slices": {"columns": ["feature_0", "plann"]}}})
    publish(good_model(), params)
    capsys.readouterr()
    assert evaluate.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml evaluate.slices.columns: unknown column plann:")
    assert len(err.strip().splitlines()) == 1


def test_slice_metrics_are_written_and_logged(
    params: Params, update_params: Callable[[dict[str, Any]], Params]
) -> None:
    params = update_params(
        {"evaluate": {"slices": {"columns": ["feature_0"], "bins": 2}, "min_slice_rows": 1}}
    )
    info = publish(good_model(), params)
    evaluate.main([])
    report = json.loads(paths.SLICES_FILE.read_text())
    entry = report["by_column"]["feature_0"]
    n_test = json.loads(paths.EVAL_METRICS.read_text())["n_test"]
    assert sum(s["rows"] for s in entry["slices"].values()) == n_test
    accuracies = [s["accuracy"] for s in entry["slices"].values()]
    assert entry["gap"]["accuracy"] == pytest.approx(max(accuracies) - min(accuracies), abs=1e-5)
    run = mlflow.MlflowClient().get_run(info["run_id"])
    assert run.data.metrics["test_slice_feature_0_accuracy_gap"] == pytest.approx(
        entry["gap"]["accuracy"]
    )
    assert gate()["min_slice_rows"] == 1
