"""params.yaml: one schema, every error names the key, the bad value and what is valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from my_ml_project.core.config import ProjectError, load_params, parse_params
from my_ml_project.data.prepare import main as prepare_main


def with_change(raw: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    if section:
        changed[section][key] = value
    else:
        changed[key] = value
    return changed


def test_shipped_params_are_valid(template_params: dict[str, Any]) -> None:
    params = parse_params(template_params)
    assert params.train.epochs >= 1
    assert params.flat()["train.lr"] == str(params.train.lr)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("", "seed", 42.9, "seed: Input should be a valid integer"),
        ("", "seed", -1, "seed: Input should be greater than or equal to 0"),
        ("split", "stratify", "false", "split.stratify: expected true or false (unquoted)"),
        ("split", "val_size", 1.5, "split.val_size: Input should be less than 1"),
        ("split", "test_size", 0.9, "leaves no training rows"),
        ("data", "missing", "ignore", "data.missing: Input should be 'error', 'drop' or 'impute'"),
        ("data", "categorical", "some", "data.categorical: expected 'auto' or a list of column"),
        ("data", "categorical", ["a", 1], "data.categorical: expected 'auto' or a list of column"),
        ("data", "max_categories", 1, "data.max_categories: Input should be greater than or equal"),
        ("data", "max_categories", 9.5, "data.max_categories: Input should be a valid integer"),
        ("data", "features", ["a", "a"], "data.features: lists columns twice: a"),
        ("data", "features", "some", "data.features: expected 'all' or a non-empty list"),
        ("model", "hidden_sizes", 64, "model.hidden_sizes: Input should be a valid list"),
        ("model", "hidden_sizes", [8, 0], "model.hidden_sizes[1]: Input should be greater than 0"),
        ("model", "dropout", 1.5, "model.dropout: Input should be less than 1"),
        ("train", "epochs", 0, "train.epochs: Input should be greater than or equal to 1"),
        ("train", "batch_size", True, "train.batch_size: Input should be a valid integer"),
        ("train", "lr", 0, "train.lr: Input should be greater than 0"),
        ("train", "lr", True, "train.lr: expected a number, got the boolean True"),
        ("train", "device", "tpu", "train.device: String should match pattern"),
        ("train", "resume", True, "train.resume: Input should be 'auto', 'always' or 'never'"),
        ("train", "checkpoint_every", 0, "train.checkpoint_every: Input should be greater"),
        ("evaluate", "metric", "precision", "'accuracy', 'f1' or 'roc_auc'"),
        ("evaluate", "promotion_margin", float("nan"), "evaluate.promotion_margin: Input should"),
        ("evaluate", "promotion_margin", float("inf"), "evaluate.promotion_margin: Input should"),
        ("evaluate", "promotion_margin", -0.1, "evaluate.promotion_margin: Input should be"),
        ("evaluate", "promotion_margin", "a lot", "evaluate.promotion_margin: Input should"),
        ("evaluate", "min_score", 2, "evaluate.min_score: Input should be less than or equal to 1"),
        ("evaluate", "slices", {"columns": ["a", "a"]}, "evaluate.slices.columns: lists columns"),
        ("evaluate", "slices", {"columns": "a"}, "evaluate.slices.columns: Input should be a"),
        ("evaluate", "slices", {"columns": [], "bins": 1}, "evaluate.slices.bins: Input should be"),
        ("evaluate", "max_slice_drop", 1.5, "evaluate.max_slice_drop: Input should be less than"),
        ("evaluate", "min_slice_rows", 0, "evaluate.min_slice_rows: Input should be greater than"),
        ("mlflow", "model_name", "", "mlflow.model_name: String should have at least 1 char"),
        # pragma: allowlist nextline secret
        ("mlflow", "tracking_uri", "https://u:pw@mlflow.example", "'https://u:***@mlflow.ex"),
    ],
)
def test_bad_values_name_key_value_and_what_is_valid(
    template_params: dict[str, Any], section: str, key: str, value: Any, message: str
) -> None:
    with pytest.raises(ProjectError, match="is not valid") as info:
        parse_params(with_change(template_params, section, key, value))
    assert message in str(info.value)
    assert ", not " in str(info.value) or "training rows" in message  # the value found


def test_a_tracking_uri_with_a_password_is_refused_without_echoing_it(
    template_params: dict[str, Any],
) -> None:
    # params.yaml is committed and logged to MLflow: credentials come from the environment.
    uri = "https://mlflow:s3cr3t-Pw@mlflow.example/api"  # pragma: allowlist secret
    with pytest.raises(ProjectError, match="holds a password") as info:
        parse_params(with_change(template_params, "mlflow", "tracking_uri", uri))
    assert "MLFLOW_TRACKING_PASSWORD" in str(info.value)
    assert "s3cr3t-Pw" not in str(info.value)
    user_only = "postgresql://mlflow@db/mlflow"
    assert parse_params(with_change(template_params, "mlflow", "tracking_uri", user_only))


def test_numbers_written_the_yaml_1_1_way_are_accepted(template_params: dict[str, Any]) -> None:
    # PyYAML reads `lr: 1e-3` (no dot) as a string.
    assert parse_params(with_change(template_params, "train", "lr", "1e-3")).train.lr == 0.001


def test_unknown_keys_are_reported_with_a_suggestion(template_params: dict[str, Any]) -> None:
    raw = with_change(template_params, "train", "epoch", 3)
    raw["evalute"] = {}
    with pytest.raises(ProjectError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "train.epoch: unknown key. did you mean 'epochs'?" in message
    assert "evalute: unknown key. did you mean 'evaluate'?" in message


def test_every_problem_is_reported_at_once(template_params: dict[str, Any]) -> None:
    raw = with_change(template_params, "train", "lr", -1)
    del raw["data"]["target"]
    with pytest.raises(ProjectError) as info:
        parse_params(raw)
    lines = str(info.value).splitlines()
    assert "  train.lr: Input should be greater than 0, not -1" in lines
    assert "  data.target: required key is missing (see the template's params.yaml)" in lines


def test_stage_reports_bad_params_without_traceback(
    project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["split"]["stratify"] = "false"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    assert prepare_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml is not valid:")
    assert "split.stratify" in err
    assert "Traceback" not in err


def test_params_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ProjectError, match="must be a YAML mapping"):
        load_params(path)
