"""copier.yml refuses bad answers with a message that says what to do, and accepts good ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

# (answers, question refused, words of its message)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"project_name": ""}, "project_name", "must not be empty"),
    ({"project_name": "   "}, "project_name", "must not be empty"),
    ({"project_name": "2 Fast"}, "project_name", "must start with a letter"),
    ({"package_name": "1bad-name"}, "package_name", 'Package name "1bad-name" is invalid'),
    ({"package_name": "Bad"}, "package_name", 'Package name "Bad" is invalid'),
    ({"package_name": "class"}, "package_name", "is a Python keyword"),
    ({"package_name": "torch"}, "package_name", "would shadow a package"),
    ({"description": "two\nlines"}, "description", "must be one line"),
    ({"author_name": " "}, "author_name", "must not be empty"),
    ({"author_email": "nope"}, "author_email", '"nope" is not a valid e-mail address'),
    ({"author_email": "a@b"}, "author_email", '"a@b" is not a valid e-mail address'),
    ({"accelerator": "cuda", "cuda_version": "12.8"}, "cuda_version", "expected cuXYZ"),
    ({"dvc_remote": ""}, "dvc_remote", "must not be empty"),
    ({"dvc_remote": "ftp://x"}, "dvc_remote", 'DVC remote "ftp://x" is not supported'),
    ({"dvc_remote": "s3:/"}, "dvc_remote", 'DVC remote "s3:/" is not supported'),
    ({"dvc_remote": "s3://"}, "dvc_remote", 'DVC remote "s3://" is not supported'),
    ({"dvc_remote": "data/storage"}, "dvc_remote", "is inside the project"),
    ({"dvc_remote": "./storage"}, "dvc_remote", "is inside the project"),
    ({"dvc_remote": "../my storage"}, "dvc_remote", "must not contain whitespace"),
    ({"dvc_remote": "../a,b"}, "dvc_remote", "must not contain whitespace, quotes, ','"),
    ({"mlflow_tracking_uri": "ftp://x"}, "mlflow_tracking_uri", "is not supported"),
    ({"mlflow_tracking_uri": "mlflow.db"}, "mlflow_tracking_uri", "is not supported"),
    ({"gpu_runner_label": "my gpu"}, "gpu_runner_label", 'Runner label "my gpu" is invalid'),
    ({"gpu_runner_label": "-gpu"}, "gpu_runner_label", "starting with a letter or digit"),
    ({"gpu_runner_label": "ubuntu-latest"}, "gpu_runner_label", "names a runner every job may get"),
    ({"mlflow_tracking_uri": "https://u:pw@h"}, "mlflow_tracking_uri", "holds a password"),
    ({"dvc_remote": "s3://key:secret@bucket/p"}, "dvc_remote", "holds a password"),
]
# Choice questions: copier itself refuses what is not a choice.
INVALID_CHOICES: list[tuple[dict[str, Any], str, str]] = [
    ({"python_version": "3.9"}, "python_version", "'3.9' is not in"),
    ({"accelerator": "tpu"}, "accelerator", "'tpu' is not in"),
    ({"license": "GPL-3.0"}, "license", "'GPL-3.0' is not in"),
    ({"ci_providers": ["github", "circle"]}, "ci_providers", "'circle' is not in"),
    ({"release_target": "nomad"}, "release_target", "'nomad' is not in"),
]
VALID: list[dict[str, Any]] = [
    {"dvc_remote": "s3://bucket/p"},
    {"dvc_remote": "gs://b"},
    {"dvc_remote": "azure://c/p"},
    {"dvc_remote": "/abs/path"},
    {"dvc_remote": "~/x"},
    {"dvc_remote": "../shared/dvc-storage"},
    {"mlflow_tracking_uri": "http://127.0.0.1:5000"},
    {"mlflow_tracking_uri": "postgresql+psycopg://mlflow@db/mlflow"},
    {"mlflow_tracking_uri": "databricks"},
    {"package_name": "_private2", "project_name": "Proj.v2_beta"},
    {"accelerator": "cuda", "cuda_version": "cu130", "python_version": "3.12"},
    {"ci_providers": []},
    {"description": ""},
    *({"license": license} for license in ("MIT", "Apache-2.0", "BSD-3-Clause", "proprietary")),
    {"gpu_runner_label": "a100-80gb"},
    {"gpu_runner_label": "gpu.l4_x2"},
]


def ids(cases: list[tuple[dict[str, Any], str, str]]) -> list[str]:
    return [f"{question}={answers[question]!r}" for answers, question, _ in cases]


@pytest.mark.parametrize(("answers", "question", "message"), INVALID, ids=ids(INVALID))
def test_validator_refuses(render_project, tmp_path: Path, answers, question, message) -> None:
    with pytest.raises(ValueError, match="Validation error") as excinfo:
        render_project(**answers)
    assert f"question '{question}'" in str(excinfo.value)
    assert message in str(excinfo.value)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("answers", "question", "message"), INVALID_CHOICES, ids=ids(INVALID_CHOICES)
)
def test_choice_refused(render_project, answers, question, message) -> None:
    with pytest.raises(ValueError, match=f"Invalid choice for '{question}'") as excinfo:
        render_project(pretend=True, **answers)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("answers", VALID, ids=[repr(a) for a in VALID])
def test_valid_answers_pass(render_project, answers) -> None:
    render_project(pretend=True, **answers)


def test_every_question_has_an_invalid_answer_row() -> None:
    """Each question a user answers can be answered wrongly, and the tables above show how."""
    questions = yaml.safe_load((ROOT / "copier.yml").read_text(encoding="utf-8"))
    asked = {
        q
        for q, spec in questions.items()
        if not q.startswith("_") and spec.get("when") is not False
    }
    refused = {question for _, question, _ in INVALID + INVALID_CHOICES}
    assert asked == refused
    for question in asked:
        spec = questions[question]
        assert "validator" in spec or "choices" in spec, question


ANSWERS_FILE = """\
project_name: Fraud Scorer
author_name: Ada O'Neil
license: Apache-2.0
python_version: "3.12"
ci_providers: [github]
dvc_remote: s3://ml-bucket/fraud-scorer
"""


def _copier(*args: str | Path) -> subprocess.CompletedProcess:
    """The copier CLI as a user runs it: no prompt (no terminal), tasks skipped."""
    cli = [sys.executable, "-m", "copier", "copy", "--trust", "--skip-tasks", "--defaults"]
    return subprocess.run(
        [*cli, "--vcs-ref", "HEAD", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_answers_file_renders_without_prompts(tmp_path: Path) -> None:
    (tmp_path / "answers.yml").write_text(ANSWERS_FILE)
    dst = tmp_path / "fraud-scorer"
    result = _copier("--data-file", tmp_path / "answers.yml", ROOT, dst)
    assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load((dst / ".copier-answers.yml").read_text())
    assert recorded | yaml.safe_load(ANSWERS_FILE) == recorded  # every answer, as given
    assert recorded["package_name"] == "fraud_scorer"  # the rest: defaults, derived
    assert (dst / "src" / "fraud_scorer").is_dir()


def test_a_wrong_answer_in_a_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "answers.yml").write_text(ANSWERS_FILE + "dvc_remote: ftp://x\n")
    result = _copier("--data-file", tmp_path / "answers.yml", ROOT, tmp_path / "p")
    assert result.returncode != 0
    # Copier's CLI prints its traceback above; the last line is the validator's reason.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Validation error for question 'dvc_remote'")
    assert 'DVC remote "ftp://x" is not supported: use s3://' in last
    assert not (tmp_path / "p").exists()
