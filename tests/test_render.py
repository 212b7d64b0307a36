"""Render the template with several answer sets; check what comes out parses, lints and fits."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import parse_structured

QUESTIONS: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "copier.yml").read_text(encoding="utf-8")
)
CI_PROVIDERS: list[str] = list(QUESTIONS["ci_providers"]["choices"].values())
CI_FILES = {
    "github": ".github/workflows/ci.yml",
    "gitlab": ".gitlab-ci.yml",
    "jenkins": "Jenkinsfile",
}
DATASET = "data/raw/breast_cancer.csv"

ANSWER_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "minimal": {
        "ci_providers": [],
        "release_target": "none",
        "accelerator": "cpu",
        "description": "",
        "license": "proprietary",
        "dvc_remote": "s3://bucket/dvc",
        "mlflow_tracking_uri": "http://127.0.0.1:5000",
    },
    **{f"ci-{provider}": {"ci_providers": [provider]} for provider in CI_PROVIDERS},
    "cpu": {"accelerator": "cpu"},
    "cuda": {"accelerator": "cuda", "cuda_version": "cu126"},
    "fancy-name": {
        "project_name": "My Fancy-Project 2",
        "dvc_remote": "~/dvc-storage",
        "license": "Apache-2.0",
    },
    "python-3.13": {
        "python_version": "3.13",
        "dvc_remote": "/srv/dvc-storage",
        "license": "BSD-3-Clause",
    },
}
# Leftover Jinja: a tag, or an expression naming a question or copier's own variables.
# (GitHub's `${{ ... }}` and Python's `{{` in f-strings are not Jinja.)
VARIABLES = "|".join(re.escape(q) for q in QUESTIONS if not q.startswith("_"))
LEFTOVER = re.compile(
    rf"\{{%-?\s*(if|elif|else|endif|for|endfor|set|raw|endraw)\b|\{{\{{-?\s*({VARIABLES}|_copier)"
)


@dataclass(frozen=True)
class Project:
    path: Path
    given: dict[str, Any]  # the answers passed to copier
    answers: dict[str, Any]  # every answer, as the answers file records them

    def read(self, name: str) -> str:
        return (self.path / name).read_text(encoding="utf-8")

    def yaml(self, name: str) -> Any:
        return yaml.safe_load(self.read(name))

    def toml(self, name: str) -> dict[str, Any]:
        return tomllib.loads(self.read(name))


@pytest.fixture(scope="module", params=list(ANSWER_SETS))
def project(request: pytest.FixtureRequest, renderer, tmp_path_factory) -> Project:
    """The template rendered (tasks skipped) with one answer set."""
    given = ANSWER_SETS[request.param]
    path = renderer(tmp_path_factory.mktemp(request.param) / "project", **given)
    answers = yaml.safe_load((path / QUESTIONS["_answers_file"]).read_text(encoding="utf-8"))
    return Project(path, given, answers)


def project_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)


def ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if exe := shutil.which("ruff"):
        return [exe]
    pytest.skip("ruff is not installed")


def test_expected_files(project: Project) -> None:
    names = {p.relative_to(project.path).as_posix() for p in project_files(project.path)}
    package = project.answers["package_name"]
    for required in [
        ".copier-answers.yml",
        ".gitignore",
        ".dvcignore",
        ".dvc/config",
        ".dvc/.gitignore",
        "pyproject.toml",
        "noxfile.py",
        "params.yaml",
        "dvc.yaml",
        DATASET,
        f"src/{package}/__init__.py",
    ]:
        assert required in names
    for provider, ci_file in CI_FILES.items():
        assert (ci_file in names) == (provider in project.answers["ci_providers"]), ci_file
    if "github" not in project.answers["ci_providers"]:
        assert not (project.path / ".github").exists()
    # Conditional names that render empty leave nothing behind, and no suffix survives.
    assert not [n for n in names if n.endswith(".jinja") or Path(n).name in {"", ".jinja"}]


def test_tasks_skipped(project: Project) -> None:
    """With --skip-tasks the hook does not run: no repository, nothing tracked yet."""
    assert not (project.path / ".git").exists()
    assert not (project.path / f"{DATASET}.dvc").exists()


# Copied as they are, never rendered: the sample data, the README's screenshot.
DATA_FILES = {".csv", ".png"}


def test_structured_files_parse(project: Project) -> None:
    # answers, params, dvc.yaml, pyproject, pre-commit, .dvc/config at least
    assert parse_structured(project.path) >= 6


def test_no_jinja_leftovers(project: Project) -> None:
    for path in project_files(project.path):
        if path.suffix in DATA_FILES:
            continue
        text = path.read_text(encoding="utf-8")
        match = LEFTOVER.search(text)
        assert match is None, f"{path}: {text[match.start() : match.start() + 60]!r}"


def test_ruff_passes(project: Project) -> None:
    cmd = ruff()
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run(
            [*cmd, *args], cwd=project.path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_answers_file_records_answers(project: Project) -> None:
    text = project.read(QUESTIONS["_answers_file"])
    assert text.startswith("# Changes here will be overwritten by Copier")
    assert project.answers["_src_path"]
    for question, value in project.given.items():
        assert project.answers[question] == value
    # Every stored answer is a question of copier.yml (computed ones are not stored).
    stored = {k for k in project.answers if not k.startswith("_")}
    assert stored <= set(QUESTIONS)
    assert "project_slug" not in stored


def test_pyproject_fits_answers(project: Project) -> None:
    pyproject = project.toml("pyproject.toml")
    python = project.answers["python_version"]
    assert pyproject["project"]["requires-python"] == f">={python}"
    assert "target-version" not in pyproject["tool"]["ruff"]  # ruff reads requires-python
    assert pyproject["tool"]["mypy"]["python_version"] == python
    # One portable lock whatever the accelerator: torch from PyPI (an extra), its build picked
    # at install time by the noxfile (tests/test_lock.py), never by a PyTorch index here.
    assert "sources" not in pyproject.get("tool", {}).get("uv", {})
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    (torch,) = pyproject["project"]["optional-dependencies"]["torch"]
    assert torch.startswith("torch>=")
    assert {d.split(">")[0] for d in pyproject["dependency-groups"]["dev"]} >= {"pytest", "nox"}


def test_names_derive_from_project_name(project: Project) -> None:
    expected = {"My Fancy-Project 2": "my-fancy-project-2", "My ML Project": "my-ml-project"}
    slug = expected[project.answers["project_name"]]
    assert project.toml("pyproject.toml")["project"]["name"] == slug
    assert project.answers["package_name"] == slug.replace("-", "_")
    assert project.yaml("params.yaml")["mlflow"]["model_name"] == slug
    if "dvc_remote" not in project.given:
        assert project.answers["dvc_remote"] == f"../{slug}-dvc-storage"


def test_dvc_config_points_at_the_remote(project: Project) -> None:
    config = configparser.ConfigParser()
    config.read(project.path / ".dvc" / "config", encoding="utf-8")
    remote = config["core"]["remote"]
    url = config[f"'remote \"{remote}\"'"]["url"]
    answer = project.answers["dvc_remote"]
    if re.match(r"^[a-z0-9]+://|^[/~]", answer):
        assert url == answer
    else:
        # DVC reads a relative url from the .dvc/ folder; the answer is from the project root.
        dvc_dir = project.path / ".dvc"
        assert os.path.normpath(dvc_dir / url) == os.path.normpath(project.path / answer)


def test_params_fit_answers(project: Project) -> None:
    params = project.yaml("params.yaml")
    device = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}[project.answers["accelerator"]]
    assert params["train"]["device"] == device
    assert params["mlflow"]["tracking_uri"] == project.answers["mlflow_tracking_uri"]


def test_ci_pipelines(project: Project) -> None:
    """Each chosen CI runs `nox -s lint` and `nox -s test` on CPU with uv's cache kept.

    The pipelines' other jobs and their linters: tests/test_pipelines.py.
    """
    checks = {"github": check_github, "gitlab": check_gitlab, "jenkins": check_jenkins}
    for provider in project.answers["ci_providers"]:
        checks[provider](project)


def check_github(project: Project) -> None:
    workflow = project.yaml(CI_FILES["github"])
    assert workflow["permissions"] == {}
    assert workflow["env"]["UV_TORCH_BACKEND"] == "cpu"
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    actions = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    assert actions["actions/checkout"]["with"]["persist-credentials"] is False
    lint_steps = workflow["jobs"]["lint"]["steps"]
    setup_uv = next(s for s in lint_steps if s.get("uses", "").startswith("astral-sh/setup-uv@"))
    assert setup_uv["with"]["python-version"] == project.answers["python_version"]
    assert setup_uv["with"]["enable-cache"] is True
    assert setup_uv["with"]["cache-dependency-glob"] == "uv.lock"
    runs = " ".join(s.get("run", "") for s in steps)
    assert "nox -s lint" in runs
    assert "nox -s test -- --junitxml=" in runs


def check_gitlab(project: Project) -> None:
    pipeline = project.yaml(CI_FILES["gitlab"])
    variables = pipeline["variables"]
    assert variables["UV_TORCH_BACKEND"] == "cpu"
    assert variables["UV_PYTHON"] == project.answers["python_version"]
    assert "-python$UV_PYTHON-" in pipeline["default"]["image"]
    assert variables["UV_CACHE_DIR"] in pipeline["default"]["cache"]["paths"]
    assert any("nox -s lint" in line for line in pipeline["lint"]["script"])
    assert any("nox -s test" in line for line in pipeline["test"]["script"])


def check_jenkins(project: Project) -> None:
    # No Groovy parser at hand: check the lines that matter.
    text = project.read(CI_FILES["jenkins"])
    assert f"-python{project.answers['python_version']}-" in text
    assert "UV_TORCH_BACKEND = 'cpu'" in text
    assert "sh '$NOX -s lint check-pipeline'" in text
    assert "$NOX -s test -- --junitxml=" in text


# The first line of each license text, and the SPDX expression pyproject.toml carries (PEP 639).
LICENSES = {
    "MIT": ("MIT License", "MIT"),
    "Apache-2.0": ("Apache License", "Apache-2.0"),
    "BSD-3-Clause": ("BSD 3-Clause License", "BSD-3-Clause"),
    "proprietary": ("Copyright (c) {author}. All rights reserved.", "LicenseRef-Proprietary"),
}


def test_license_fits_answer(project: Project) -> None:
    heading, spdx = LICENSES[project.answers["license"]]
    text = project.read("LICENSE")
    assert text.splitlines()[0].strip() == heading.format(author=project.answers["author_name"])
    assert project.answers["author_name"] in text or project.answers["license"] == "Apache-2.0"
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    pyproject = project.toml("pyproject.toml")["project"]
    assert (pyproject["license"], pyproject["license-files"]) == (spdx, ["LICENSE"])
    # PEP 639: no license classifier beside an SPDX expression.
    assert not [c for c in pyproject["classifiers"] if c.startswith("License ::")]


def test_pre_commit_hooks_fit_ci_providers(project: Project) -> None:
    config = project.yaml(".pre-commit-config.yaml")
    # Every hook runs a tool of the locked environment: nothing for pre-commit to download.
    assert {repo["repo"] for repo in config["repos"]} == {"local"}
    assert {h["language"] for r in config["repos"] for h in r["hooks"]} <= {"unsupported", "pygrep"}
    hooks = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "check-yaml", "check-toml"} <= hooks
    assert {"check-added-large-files", "detect-secrets"} <= hooks
    (secrets,) = [h for r in config["repos"] for h in r["hooks"] if h["id"] == "detect-secrets"]
    # The filters live in the baseline, so `detect-secrets scan --baseline` keeps them too.
    assert secrets["args"] == ["--baseline", ".secrets.baseline"]
    baseline = json.loads(project.read(".secrets.baseline"))
    assert baseline["results"] == {}
    # Only the pipeline's own checksum lines are skipped (tests/test_e2e.py runs the hook on a
    # trained project).
    filters = {f["path"].rsplit(".", 1)[1]: f for f in baseline["filters_used"]}
    (skipped,) = filters["should_exclude_line"]["pattern"]
    for key in ("md5", "md5_before", "md5_after", "run_id", "train"):
        assert re.search(skipped, f'  "{key}": "{"0" * 32}",'), key
    assert not re.search(skipped, '  "token": "' + "0" * 32 + '",')
    assert not re.search(skipped, '  "md5": "' + "0" * 32 + '", "token": "x"')
    providers = project.answers["ci_providers"]
    github = {"zizmor", "check-github-workflows", "check-dependabot"}
    assert (github <= hooks) == ("github" in providers)
    assert not (github & hooks) or "github" in providers
    assert ("check-gitlab-ci" in hooks) == ("gitlab" in providers)
    # Each tool a hook runs is in the dev group, which uv.lock pins.
    dev = project.toml("pyproject.toml")["dependency-groups"]["dev"]
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in dev}
    tools = {"pre-commit", "pre-commit-hooks", "ruff", "mypy", "codespell", "detect-secrets"}
    tools |= {"zizmor"} if "github" in providers else set()
    tools |= {"check-jsonschema"} if {"github", "gitlab"} & set(providers) else set()
    assert tools <= names
    dependabot = project.path / ".github" / "dependabot.yml"
    assert dependabot.exists() == ("github" in providers)
    if dependabot.exists():
        updates = project.yaml(".github/dependabot.yml")["updates"]
        assert {u["package-ecosystem"] for u in updates} == {"github-actions", "uv"}
