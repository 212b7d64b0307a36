"""Shared fixtures: a small, fast project in a temporary folder (the cwd while a test runs)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from my_ml_project.core.config import Params, load_params
from my_ml_project.data.prepare import prepare

# Tests may find the project's own files from here; package code never does.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Small, fast values over the project's defaults: a tiny network trained for a few epochs.
FAST_PARAMS: dict[str, Any] = {
    "data": {
        "raw_path": "data/raw/synthetic.csv",
        "target": "label",
        "features": "all",
        "missing": "error",
    },
    # The split's salt is the project's name by default. Pinned here, so that the synthetic rows
    # land in the same splits whatever the project is called: the gate tests' figures (holdout
    # sizes, a slice of 9 rows) are those of this salt's splits.
    "split": {"salt": "my-ml-project"},
    "model": {"hidden_sizes": [16]},
    "train": {"device": "cpu", "epochs": 3, "batch_size": 32, "patience": 0, "checkpoint_every": 1},
    "mlflow": {"tracking_uri": "sqlite:///mlflow.db"},
    # A 120-row file holds about 18 test rows: the gate may judge on fewer than the default 30.
    # The shipped slice columns are the sample data's: tests of slices name their own.
    "evaluate": {"min_holdout": 5, "slices": {"columns": []}},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged into it, section by section."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_csv(
    path: str | Path,
    n_rows: int = 120,
    n_classes: int = 2,
    n_features: int = 4,
    *,
    target: str = "label",
    labels: Sequence[object] | None = None,
    seed: int = 0,
) -> Path:
    """Write a learnable synthetic dataset: balanced classes, class-dependent feature means."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = (
            ["negative", "positive"] if n_classes == 2 else [f"class_{i}" for i in range(n_classes)]
        )
    if len(labels) != n_classes:
        raise ValueError(f"{len(labels)} labels given for {n_classes} classes")
    codes = rng.permutation(np.arange(n_rows) % n_classes)
    x = rng.normal(size=(n_rows, n_features)) + 1.5 * codes[:, None]
    df = pd.DataFrame(x, columns=[f"feature_{i}" for i in range(n_features)])
    df[target] = [labels[c] for c in codes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


# Labels with accents, punctuation, a comma and a non-Latin script, as business CSVs have them.
PLANS = ("Básico", "Pro+", "Entreprise (annuel)", "Free/Trial", "Équipe, 5 sièges")
COUNTRIES = ("Deutschland", "España", "日本", "Côte d'Ivoire", "U.S.A.")


def write_mixed_csv(
    path: str | Path, n_rows: int = 600, *, gaps: float = 0.05, seed: int = 0
) -> Path:
    """Write a learnable mixed CSV: text categories (``plan``, ``country``), a yes/no flag
    (``auto_renew``), numbers (``tenure``), ~``gaps`` of each feature empty, label ``churned``.

    The label depends mostly on the categories and the flag: a model that cannot read them
    barely beats the majority class.
    """
    rng = np.random.default_rng(seed)
    plan = rng.integers(0, len(PLANS), n_rows)
    country = rng.integers(0, len(COUNTRIES), n_rows)
    renew = rng.random(n_rows) < 0.5
    tenure = rng.gamma(2.0, 12.0, n_rows).round(1)
    logit = (
        np.array([0.0, 2.0, 3.0, -3.0, 1.0])[plan]
        + np.array([1.0, -1.0, 1.5, -1.5, 0.0])[country]
        + 2.0 * renew
        + 0.02 * (tenure - 24)
        - 1.0
    )
    churned = np.where(rng.random(n_rows) < 1 / (1 + np.exp(-logit)), "no", "yes")
    df = pd.DataFrame(
        {
            "tenure": tenure,
            "plan": np.array(PLANS)[plan],
            "country": np.array(COUNTRIES)[country],
            "auto_renew": np.where(renew, "yes", "no"),
        }
    )
    for column in df.columns:
        df[column] = df[column].astype(object).where(rng.random(n_rows) >= gaps, None)
    df["churned"] = churned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def template_params() -> dict[str, Any]:
    """The project's own params.yaml, as shipped (checked against the schema), as a mapping."""
    load_params(PROJECT_ROOT / "params.yaml")
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def make_csv() -> Callable[..., Path]:
    """``make_csv(path, n_rows=120, n_classes=2, n_features=4, *, target, labels, seed)``."""
    return write_csv


@pytest.fixture
def mixed_project(project_dir: Path, update_params: Callable[[dict[str, Any]], Params]) -> Params:
    """``project_dir`` with a mixed CSV (text, a yes/no flag, gaps) and data.missing: impute."""
    write_mixed_csv("data/raw/mixed.csv")
    return update_params(
        {"data": {"raw_path": "data/raw/mixed.csv", "target": "churned", "missing": "impute"}}
    )


@pytest.fixture
def project_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_params: dict[str, Any]
) -> Path:
    """A temporary project root (the cwd): fast params.yaml and a 120-row synthetic CSV."""
    monkeypatch.chdir(tmp_path)
    # The project's params.yaml decides where MLflow writes, not the caller's shell.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TRAIN_DEVICE", raising=False)
    params = deep_merge(template_params, FAST_PARAMS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_csv(tmp_path / params["data"]["raw_path"])
    return tmp_path


@pytest.fixture
def update_params(project_dir: Path) -> Callable[[dict[str, Any]], Params]:
    """``update_params({"train": {"epochs": 1}})`` merges into params.yaml; returns it parsed."""

    def update(override: dict[str, Any]) -> Params:
        path = project_dir / "params.yaml"
        raw = deep_merge(yaml.safe_load(path.read_text(encoding="utf-8")), override)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_params(path)

    return update


@pytest.fixture
def prepared_project(project_dir: Path) -> Path:
    """``project_dir`` after the prepare stage: data/processed/ holds the splits and schema."""
    prepare(load_params())
    return project_dir
