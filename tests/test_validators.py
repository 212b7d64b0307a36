"""copier.yml refuses bad answers with a message that says what to do, and accepts good ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# (answers, question refused, words of its message)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"project_name": ""}, "project_name", "must not be empty"),
    ({"project_name": "   "}, "project_name", "must not be empty"),
    ({"project_name": "2 Fast"}, "project_name", "must start with a letter"),
    ({"package_name": "1bad-name"}, "package_name", 'Package name "1bad-name" is invalid'),
    ({"package_name": "Bad"}, "package_name", 'Package name "Bad" is invalid'),
    ({"package_name": "class"}, "package_name", "is a Python keyword"),
    ({"package_name": "torch"}, "package_name", "would shadow a package"),
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
    ({"ci_providers": ["github", "circle"]}, "ci_providers", "'circle' is not in"),
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
