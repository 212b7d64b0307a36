"""End to end: a typical business CSV (text categories, yes/no and True/False flags, numbers,
~5% empty cells) goes through the real pipeline of a generated project (`nox -s train`), and the
trained model answers raw rows with labels it never saw and gaps.

The CSV is synthetic and seeded (no network): the label depends mostly on the categories and the
flags. On its test split a logistic regression on one-hot columns scores 0.86 accuracy, one on
the numbers alone 0.52, the majority class 0.51.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import PACKAGE, Project

pytestmark = pytest.mark.e2e

MIXED_CSV = """
import numpy as np
import pandas as pd

rng = np.random.default_rng(11)
n = 1500
plans = ["Básico", "Pro+", "Entreprise (annuel)", "Free/Trial", "Équipe, 5 sièges"]
countries = ["Deutschland", "España", "日本", "Côte d'Ivoire", "U.S.A.", "Brasil"]
plan = rng.integers(0, len(plans), n)
country = rng.integers(0, len(countries), n)
renew = rng.random(n) < 0.5
paperless = rng.random(n) < 0.4
tenure = rng.gamma(2.0, 12.0, n).round(1)
logit = (
    np.array([0.0, 2.5, 4.0, -4.0, 1.5])[plan]
    + np.array([1.2, -1.2, 2.0, -2.0, 0.0, -0.6])[country]
    + 2.0 * renew
    - 1.2 * paperless
    + 0.02 * (tenure - 24)
    - 1.5
)
frame = pd.DataFrame({
    "tenure": tenure,
    "plan": np.array(plans)[plan],
    "country": np.array(countries)[country],
    "auto_renew": np.where(renew, "yes", "no"),
    "paperless": paperless,
})
for column in frame.columns:
    frame[column] = frame[column].astype(object).where(rng.random(n) >= 0.05, None)
frame["churned"] = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "no", "yes")
frame.to_csv("data/raw/customers.csv", index=False)
"""

# Raw rows as a server would get them: unseen labels, gaps everywhere, other spellings.
PREDICT = f"""
import json
import numpy as np
import pandas as pd
from {PACKAGE}.model.network import load_model

model = load_model("models/model.pt")
rows = pd.DataFrame({{
    "tenure": [3.0, None, "48", 12],
    "plan": ["Pro+", "Platinum (2026!)", None, " Básico "],
    "country": ["日本", "Ελλάδα", np.nan, "Brasil"],
    "auto_renew": ["Yes", None, "no", True],
    "paperless": [False, "TRUE", None, 0],
    "customer_id": ["c1", "c2", "c3", "c4"],
}})
proba = model.predict_proba_frame(rows)
print(json.dumps({{"classes": model.class_names, "proba": proba.tolist()}}))
"""


def _mixed_project(pristine: Project, dst: Path) -> Project:
    project = pristine.copy(dst)
    project.py("-c", MIXED_CSV)
    project.set_params(
        data={"raw_path": "data/raw/customers.csv", "target": "churned", "missing": "impute"},
        evaluate={"slices": {"columns": ["plan", "tenure"], "bins": 2}},
    )
    return project


def test_mixed_csv_trains_and_answers_raw_rows(pristine: Project, tmp_path: Path) -> None:
    project = _mixed_project(pristine, tmp_path / "mixed")
    project.nox("train")

    schema = project.json("data/processed/schema.json")
    assert schema["kinds"] == {
        "tenure": "numeric",
        "plan": "categorical",
        "country": "categorical",
        "auto_renew": "boolean",
        "paperless": "boolean",
    }
    assert "Équipe, 5 sièges" in schema["categories"]["plan"]
    assert "日本" in schema["categories"]["country"]
    evaluation = project.json("metrics/evaluate.json")
    assert evaluation["accuracy"] >= evaluation["baseline_accuracy"] + 0.25, evaluation
    assert evaluation["roc_auc"] >= 0.85, evaluation
    # Slices of a text column by its labels (gaps a slice of their own), of a number in 2 bins.
    by_column = project.json("metrics/slices.json")["by_column"]
    plans = by_column["plan"]["slices"]
    assert "plan=Équipe, 5 sièges" in plans
    assert "plan is missing" in plans
    assert sum(s["rows"] for s in plans.values()) == evaluation["n_test"]
    assert len(by_column["tenure"]["slices"]) == 3  # 2 bins, and the imputed gaps
    assert project.registry()["champion"] == 1

    answer = json.loads(project.py("-c", PREDICT).stdout)
    assert answer["classes"] == ["no", "yes"]
    assert len(answer["proba"]) == 4
    for row in answer["proba"]:
        assert all(0 <= p <= 1 for p in row)
        assert sum(row) == pytest.approx(1, abs=1e-5)


def test_text_in_a_numeric_column_stops_prepare_with_the_fix(
    pristine: Project, tmp_path: Path
) -> None:
    project = _mixed_project(pristine, tmp_path / "typo")
    csv = project.path / "data/raw/customers.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    lines[5] = "n/a?" + lines[5][lines[5].index(",") :]  # the tenure of one row
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    failed = project.py("-m", f"{PACKAGE}.data.prepare", check=False)  # the prepare stage's command
    assert failed.returncode == 2
    output = failed.stdout + failed.stderr
    assert "data/raw/customers.csv: non-numeric values in numeric feature columns" in output
    assert "tenure (1 value, e.g. 'n/a?')" in output
    assert "list the column in data.categorical" in output
    assert "Traceback" not in output
