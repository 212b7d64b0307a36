"""A pairwise-covering set of answers, each rendered and checked with ruff, by parsing its
YAML/TOML/JSON and its params.yaml through its own loader, and with its own unit tests.

Every value of every question appears; every pair of (CI providers subset, accelerator, DVC
remote kind, Python version) appears at least once. One process renders them all (tasks skipped:
the lock and the first commit are tested elsewhere). The generated code differs between answers
only by the names (package, slug) and the description. The default code's whole unit-test suite
runs in test_e2e.py (the GitLab test job); here, a render under other names must not name the
default ones anywhere, and its own tests that reach the names (imports, the service and Bento,
the registered model, a stage run as a module) run with the environment of the `pristine` fixture
(`PYTHONPATH=src`, the project not installed).
Only Python 3.11 exists here: renders asking for 3.12 or 3.13 get ruff at their own target
version (ruff reads requires-python) and the parsing checks; their code is the 3.11 renders', so
its tests run under 3.11.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from allpairspy import AllPairs
from e2e import Project
from helpers import ROOT, parse_structured, render

QUESTIONS: dict[str, Any] = yaml.safe_load((ROOT / "copier.yml").read_text(encoding="utf-8"))
PROVIDERS = list(QUESTIONS["ci_providers"]["choices"].values())
SUBSETS = [list(c) for n in range(len(PROVIDERS) + 1) for c in itertools.combinations(PROVIDERS, n)]
ACCELERATORS = list(QUESTIONS["accelerator"]["choices"].values())
PYTHONS = list(QUESTIONS["python_version"]["choices"])
LICENSES = list(QUESTIONS["license"]["choices"].values())
REMOTES = {
    "local": ["../dvc-storage", "~/dvc-storage", "/srv/dvc-storage"],
    "s3": ["s3://bucket/dvc"],
    "gs": ["gs://bucket/dvc"],
    "azure": ["azure://container/dvc"],
}
TRACKING = [
    "sqlite:///mlflow.db",
    "http://127.0.0.1:5000",
    "postgresql+psycopg://mlflow@db/mlflow",
    "mysql://mlflow@db/mlflow",
    "databricks",
]
CUDA = ["cu126", "cu128", "cu130"]
# The default identity's names: a render under other names holds none of them (uv.lock aside:
# the test copies pristine's in), but for the split salt the generated tests pin on purpose.
DEFAULT_NAMES = ("my_ml_project", "my-ml-project", "My ML Project")
PINNED_SALT = '"split": {"salt": "my-ml-project"}'
# The renamed code's tests that reach its names: every module imported and its layout, the
# service built and its Bento's contents, params loaded, the served schema, a model logged,
# registered and loaded under the project's name, the train stage run as a module.
NAMED_TESTS = [
    "tests/test_layout.py",
    "tests/test_modules.py",
    "tests/test_config.py",
    "tests/test_serving.py",
    "tests/test_registry.py::test_log_register_alias_load_round_trip",
    "tests/test_registry.py::test_logged_model_is_a_pyfunc_that_answers_in_labels",
    "tests/test_train.py::test_train_stage_writes_outputs_and_registers",
]
# The names and description: two sets, so the generated code comes in two versions.
IDENTITIES = [
    {},
    {
        "project_name": "Fraud Scorer.v2",
        "package_name": "fraud_scorer",
        "description": 'Scores "risky" payments \\ transfers',
        "author_name": "Ada O'Neil",
        "author_email": "ada@bank.example.org",
    },
]


def answer_sets() -> list[dict[str, Any]]:
    """The covering set: pairs from allpairspy, the other questions cycled along the rows."""
    rows = list(AllPairs([SUBSETS, ACCELERATORS, list(REMOTES), PYTHONS]))
    sets = []
    for i, (ci, accelerator, remote, python) in enumerate(rows):
        answers = {
            "ci_providers": ci,
            "accelerator": accelerator,
            "dvc_remote": REMOTES[remote][i % len(REMOTES[remote])],
            "python_version": python,
            "license": LICENSES[i % len(LICENSES)],
            "mlflow_tracking_uri": TRACKING[i % len(TRACKING)],
            **IDENTITIES[i % len(IDENTITIES)],
        }
        if accelerator == "cuda":
            answers["cuda_version"] = CUDA[i % len(CUDA)]
        sets.append(answers)
    return sets


def remote_kind(remote: str) -> str:
    return remote.split("://")[0] if "://" in remote else "local"


def code_digest(project: Path) -> str:
    """What the unit tests depend on: the package, the tests, dvc.yaml and params.yaml, less the
    keys the generated tests replace (tests/conftest.py's FAST_PARAMS: split.salt, train.device,
    mlflow.tracking_uri; every render's own values are loaded by its own loader above)."""
    digest = hashlib.sha256()
    for path in sorted([*project.glob("src/**/*.py"), *project.glob("tests/**/*.py")]):
        digest.update(path.relative_to(project).as_posix().encode() + path.read_bytes())
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["split"]["salt"], params["train"]["device"], params["mlflow"]["tracking_uri"]
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    digest.update(yaml.safe_dump([params, pipeline]).encode())
    return digest.hexdigest()


def default_names_left(project: Path) -> list[str]:
    """``file:line: text`` of each line of ``project`` naming the default identity."""
    found = []
    for path in sorted(p for p in project.rglob("*") if p.is_file() and p.name != "uv.lock"):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if any(name in line for name in DEFAULT_NAMES) and PINNED_SALT not in line:
                found.append(f"{path.relative_to(project)}:{number}: {line.strip()}")
    return found


def test_answer_sets_cover_every_value_and_every_pair() -> None:
    sets = answer_sets()
    key = [
        lambda a: tuple(a["ci_providers"]),
        lambda a: a["accelerator"],
        lambda a: remote_kind(a["dvc_remote"]),
        lambda a: a["python_version"],
    ]
    values = [[tuple(s) for s in SUBSETS], ACCELERATORS, list(REMOTES), PYTHONS]
    for (i, vi), (j, vj) in itertools.combinations(enumerate(values), 2):
        seen = {(key[i](a), key[j](a)) for a in sets}
        assert seen == set(itertools.product(vi, vj)), (i, j)
    for question, choices in [("license", LICENSES), ("mlflow_tracking_uri", TRACKING)]:
        assert {a[question] for a in sets} == set(choices)
    assert {a["cuda_version"] for a in sets if "cuda_version" in a} == set(CUDA)
    assert {a["dvc_remote"] for a in sets} >= {r for rs in REMOTES.values() for r in rs}
    assert len(sets) <= 40  # pairwise, not the 288 of the full product


@pytest.mark.e2e
def test_answer_matrix(pristine: Project, tmp_path: Path) -> None:
    sets = answer_sets()
    start = time.perf_counter()
    projects = [render(tmp_path / f"p{i:02d}", **answers) for i, answers in enumerate(sets)]
    rendered = time.perf_counter() - start

    # Ruff over every render at once: each file gets its own project's settings and target.
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(tmp_path)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
    for project in projects:
        # answers, params, dvc.yaml, pyproject, pre-commit, .dvc/config, .secrets.baseline
        assert parse_structured(project) >= 7, project

    # Per distinct package: load every render's params.yaml with the project's own loader.
    by_package: dict[str, list[Path]] = {}
    for project, answers in zip(projects, sets, strict=True):
        by_package.setdefault(answers.get("package_name", "my_ml_project"), []).append(project)
    for package, group in by_package.items():
        check = (
            f"import sys; from {package}.core.config import load_params\n"
            "for path in sys.argv[1:]: load_params(path)"
        )
        pristine.run(
            pristine.python, "-c", check, *(str(p / "params.yaml") for p in group),
            PYTHONPATH=str(group[0] / "src"),
        )  # fmt: skip

    # Under other names, nothing names the default identity (a name written out in the template
    # instead of its variable), in any file: code, tests, CI files, docs.
    for project, answers in zip(projects, sets, strict=True):
        if answers.get("package_name"):
            assert default_names_left(project) == [], project

    # The tests that reach the names, once per distinct code; the default code's whole suite is
    # pristine's own (test_e2e.py::test_project_lint_and_unit_tests_pass_in_gitlab_ci runs it).
    tested = {code_digest(pristine.path)}
    for project in projects:
        digest = code_digest(project)
        if digest in tested:
            continue
        tested.add(digest)
        # Renders skip the lock task; the tests run in pristine's environment, locked by its
        # uv.lock (test_serving checks the Bento's pins against the lock).
        shutil.copy(pristine.path / "uv.lock", project / "uv.lock")
        pytest_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow", *NAMED_TESTS]
        proc = subprocess.run(
            [pristine.python, "-m", "pytest", *pytest_args],
            cwd=project,
            env={**pristine.env, "PYTHONPATH": str(project / "src")},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"{project}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert len(tested) == len(IDENTITIES)
    print(f"{len(sets)} answer sets rendered in {rendered:.1f} s; {len(tested)} distinct codes")
