"""The generated CI/CT/CD pipelines: the real linters of each provider, on every combination of
providers and of the answers the pipelines depend on, and the rules they must keep.

GitHub: zizmor (pedantic), the workflow JSON schema, actionlint with shellcheck. GitLab: its
JSON schema (tests/test_e2e.py runs its jobs with gitlab-ci-local). Jenkins: npm-groovy-lint
with the recommended Jenkinsfile rules. Renovate: its JSON schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

PATH = os.environ.get("PATH", "")
ROOT = Path(__file__).resolve().parents[1]
PINS: dict[str, dict[str, str]] = yaml.safe_load((ROOT / "ci" / "github-actions.yml").read_text())
QUESTIONS = yaml.safe_load((ROOT / "copier.yml").read_text())
UV_VERSION, NOX_VERSION = QUESTIONS["uv_version"]["default"], QUESTIONS["nox_version"]["default"]
# Each provider on its own and in pairs, every Python version, every DVC remote kind, custom
# runner labels and each accelerator: what the pipelines' text depends on.
COMBOS: dict[str, dict[str, Any]] = {
    "all": {},
    "github": {
        "ci_providers": ["github"],
        "accelerator": "cuda",
        "dvc_remote": "s3://bucket/dvc",
        "python_version": "3.12",
        "gpu_runner_label": "a100",
    },
    "gitlab": {
        "ci_providers": ["gitlab"],
        "accelerator": "cpu",
        "dvc_remote": "gs://bucket/dvc",
        "python_version": "3.13",
    },
    "jenkins": {
        "ci_providers": ["jenkins"],
        "accelerator": "cuda",
        "dvc_remote": "azure://container/dvc",
        "python_version": "3.13",
    },
    "github-gitlab": {
        "ci_providers": ["github", "gitlab"],
        "dvc_remote": "azure://container/dvc",
        "gpu_runner_label": "gpu-l4",
    },
    "gitlab-jenkins": {
        "ci_providers": ["gitlab", "jenkins"],
        "accelerator": "cpu",
        "dvc_remote": "s3://bucket/dvc",
        "python_version": "3.12",
    },
    "github-jenkins": {
        "ci_providers": ["github", "jenkins"],
        "dvc_remote": "gs://bucket/dvc",
        "gpu_runner_label": "a100",
        "python_version": "3.13",
    },
    "none": {"ci_providers": []},
}
PROVIDER_FILES = {
    "github": ".github",
    "gitlab": ".gitlab-ci.yml",
    "jenkins": "Jenkinsfile",
}


def versions_from(python: str) -> list[str]:
    return [v for v in ("3.11", "3.12", "3.13") if v >= python]


def answers(name: str) -> dict[str, Any]:
    defaults = {
        "ci_providers": ["github", "gitlab", "jenkins"],
        "python_version": "3.11",
        "gpu_runner_label": "gpu",
    }
    return {**defaults, **COMBOS[name]}


def uses(name: str) -> list[str]:
    return [n for n in COMBOS if name in answers(n)["ci_providers"]]


@pytest.fixture(scope="module")
def rendered(renderer, tmp_path_factory) -> dict[str, Path]:
    """Each combination rendered once (tasks skipped)."""
    top = tmp_path_factory.mktemp("pipelines")
    return {name: renderer(top / name, **given) for name, given in COMBOS.items()}


def tool(name: str) -> str:
    """A linter of the test dependency group: missing is a failure, not a skip."""
    # This interpreter's scripts first: run outside nox, its bin folder may not be on PATH.
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), PATH]))
    assert path, f"{name} is not installed: it is in pyproject.toml's test group"
    return path


def lint(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), PATH])}
    args = [str(c) for c in command]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def workflows(project: Path) -> list[Path]:
    return sorted((project / ".github" / "workflows").glob("*.yml"))


def test_only_chosen_providers_get_files(rendered: dict[str, Path]) -> None:
    for name, project in rendered.items():
        chosen = answers(name)["ci_providers"]
        for provider, path in PROVIDER_FILES.items():
            assert (project / path).exists() == (provider in chosen), (name, path)
        renovate = bool({"gitlab", "jenkins"} & set(chosen))
        assert (project / "renovate.json").exists() == renovate, name
    assert not [p for p in rendered["none"].rglob("*") if "actionlint" in p.name]


def test_github_workflows_pass_zizmor_pedantic(rendered: dict[str, Path]) -> None:
    folders = [rendered[n] / ".github" / "workflows" for n in uses("github")]
    command = [tool("zizmor"), "--offline", "--persona", "pedantic", "--format", "json"]
    result = lint(*command, *folders)
    assert json.loads(result.stdout) == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_github_workflows_match_the_schema(rendered: dict[str, Path]) -> None:
    files = [f for n in uses("github") for f in workflows(rendered[n])]
    assert len(files) == 6 * len(uses("github"))
    result = lint(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_github_workflows_pass_actionlint_with_shellcheck(rendered: dict[str, Path]) -> None:
    tool("shellcheck")  # actionlint checks each `run:` script with it when it is on PATH
    for name in uses("github"):
        project = rendered[name]
        if not (project / ".git").exists():  # actionlint finds the project by its repository
            subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        result = lint(tool("actionlint"), "-format", "{{json .}}", cwd=project)
        assert json.loads(result.stdout or "[]") == [], (name, result.stdout, result.stderr)
        assert result.returncode == 0, result.stderr


def test_every_action_is_pinned_from_the_one_table(rendered: dict[str, Path]) -> None:
    used = set()
    for name in uses("github"):
        for path in workflows(rendered[name]):
            for line in path.read_text().splitlines():
                if match := re.match(r"\s*(?:- )?uses: (\S+)@(\S+) # (\S+)$", line):
                    action, commit, tag = match.groups()
                    assert PINS[action] == {"commit": commit, "tag": tag}, (path, line)
                    used.add(action)
                else:
                    assert "uses:" not in line, f"{path}: {line.strip()} is not a pinned action"
    assert used == set(PINS), "a pin of ci/github-actions.yml is used by no workflow"


def load(path: Path) -> dict[str, Any]:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True)  # YAML 1.1 reads the key `on` as true
    return workflow


@pytest.mark.parametrize("name", uses("github"))
def test_github_workflows_keep_the_rules(rendered: dict[str, Path], name: str) -> None:
    project, given = rendered[name], answers(name)
    flows = {p.stem: load(p) for p in workflows(project)}
    assert set(flows) == {"ci", "train", "monitor", "audit", "deploy", "rollback"}
    for flow in flows.values():
        assert flow["permissions"] == {}
        assert flow["concurrency"]["group"]
        for job in flow["jobs"].values():
            assert "permissions" in job
            for step in job.get("steps", []):
                assert "${{" not in step.get("run", ""), step  # values come through env:
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False
    label = given["gpu_runner_label"]
    config = yaml.safe_load((project / ".github" / "actionlint.yaml").read_text())
    assert config["self-hosted-runner"]["labels"] == [label]
    assert f"'{label}'" in flows["train"]["jobs"]["train"]["runs-on"]
    assert set(flows["train"]["on"]) == {"workflow_dispatch", "schedule"}
    matrix = flows["ci"]["jobs"]["test"]["strategy"]["matrix"]["python"]
    assert matrix == versions_from(given["python_version"])
    # Audit: on lock changes and weekly, and a gate of deploy (not of lint or tests).
    assert flows["audit"]["on"]["push"]["paths"] == ["uv.lock"]
    assert flows["audit"]["on"]["schedule"]
    deploy = flows["deploy"]["jobs"]["deploy"]
    assert deploy["needs"] == "audit"
    assert deploy["environment"] == "production"
    assert "needs" not in flows["ci"]["jobs"]["lint"]
    steps = {s.get("name", s.get("uses", "")).split("@")[0]: s for s in deploy["steps"]}
    build = steps["Build the champion's image and push it, if the champion changed"]
    assert "nox -s ci-deploy" in build["run"]
    sbom = steps["Keep the SBOM"]
    assert sbom["with"]["path"] == "build/sbom/*.cdx.json"
    assert "steps.image.outputs.digest != ''" in sbom["if"]  # nothing shipped: nothing kept
    attest = steps["Attest the build provenance"]
    assert attest["uses"].startswith("actions/attest-build-provenance@")
    # Private repositories without artifact attestations skip it instead of failing.
    assert "github.event.repository.visibility == 'public'" in attest["if"]
    assert set(deploy["permissions"]) == {"contents", "packages", "id-token", "attestations"}
    # Training: the runner from a variable (CPU fallback), a first run pulls what exists, a
    # promotion is committed back and starts Deploy.
    train = flows["train"]["jobs"]["train"]
    assert "vars.TRAIN_RUNNER" in train["runs-on"]
    assert "retrain" in flows["train"]["on"]["workflow_dispatch"]["inputs"]
    runs = [step.get("run", "") for step in train["steps"]]
    assert any("nox -s ci-train -- " in run for run in runs)
    assert any("nox -s commit-back -- " in run for run in runs)
    started = flows["train"]["jobs"]["deploy"]
    assert "promoted == 'true'" in started["if"]
    assert "gh workflow run deploy.yml" in started["steps"][0]["run"]
    assert started["permissions"] == {"actions": "write"}
    # Monitoring starts a retraining only on its verdict.
    retrain = flows["monitor"]["jobs"]["retrain"]
    assert "gh workflow run train.yml" in retrain["steps"][0]["run"]
    assert "-f retrain=true" in retrain["steps"][0]["run"]
    assert "retrain == 'true'" in retrain["if"]
    rollback = flows["rollback"]
    assert rollback["jobs"]["rollback"]["environment"] == "production"
    groups = {
        flow: flows[flow]["concurrency"]["group"].replace(
            "${{ github.workflow }}", flows[flow]["name"]
        )
        for flow in ("deploy", "rollback")
    }
    assert groups["rollback"] != groups["deploy"], groups  # a queued rollback is never cancelled
    assert "docker" not in json.dumps(rollback)  # redeploys a built image, never builds one
    # Cloud access: OIDC for the DVC remote, no long-lived key; pinned uv and nox everywhere.
    cloud = (
        given.get("dvc_remote", "").partition("://")[0]
        if "://" in given.get("dvc_remote", "")
        else None
    )
    for flow in flows.values():
        assert flow["env"]["NOX"] == f"nox=={NOX_VERSION}"
        for job in flow["jobs"].values():
            text = json.dumps(job)
            for key in (
                "AWS_SECRET_ACCESS_KEY",
                "GOOGLE_APPLICATION_CREDENTIALS",
                "CONNECTION_STRING",
            ):
                assert key not in text, key
            for step in job.get("steps", []):
                if step.get("uses", "").startswith("astral-sh/setup-uv@"):
                    assert step["with"]["version"] == UV_VERSION
    for flow, job in (("train", "train"), ("monitor", "monitor")):
        permissions = flows[flow]["jobs"][job]["permissions"]
        assert ("id-token" in permissions) == (cloud is not None), (flow, permissions)


def resolved(pipeline: dict[str, Any], name: str) -> dict[str, Any]:
    """A GitLab job with its `extends` merged as GitLab does: hashes deeply, the rest replaced."""
    job = pipeline[name]
    bases = job.get("extends", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, resolved(pipeline, base))
    return _merge(merged, {k: v for k, v in job.items() if k != "extends"})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def test_gitlab_pipelines_match_the_schema(rendered: dict[str, Path]) -> None:
    files = [rendered[n] / ".gitlab-ci.yml" for n in uses("gitlab")]
    result = lint(tool("check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", uses("gitlab"))
def test_gitlab_pipeline_keeps_the_rules(rendered: dict[str, Path], name: str) -> None:
    given = answers(name)
    text = (rendered[name] / ".gitlab-ci.yml").read_text()
    pipeline = yaml.safe_load(text)
    rules = " ".join(rule["if"] for rule in pipeline["workflow"]["rules"])
    for source in ("push", "merge_request_event", "schedule", "web", "pipeline"):
        assert re.search(rf"\b{source}\b", rules), source
    # No pipeline variable decides anything: new GitLab.com projects restrict them.
    assert "$PIPELINE" not in text
    assert "PIPELINE" not in pipeline["variables"]
    keywords = {"workflow", "stages", "variables", "default", "include"}
    jobs = {n: resolved(pipeline, n) for n in pipeline if n[0] != "." and n not in keywords}
    assert {"lint", "test", "audit", "train", "monitor", "retrain", "deploy"} <= set(jobs)
    assert pipeline["variables"]["TRAIN_RUNNER_TAG"]["value"] == given["gpu_runner_label"]
    assert pipeline["default"]["cache"]["key"]["files"] == ["uv.lock"]
    assert pipeline["default"]["interruptible"] is True
    assert pipeline["variables"]["NOX"] == f"nox=={NOX_VERSION}"
    assert f"uv:{UV_VERSION}-python" in pipeline["default"]["image"]
    matrix = pipeline["test"]["parallel"]["matrix"][0]["UV_PYTHON"]
    assert matrix == versions_from(given["python_version"])
    assert pipeline["test"]["artifacts"]["reports"]["junit"] == "reports/junit.xml"
    assert {"changes": ["uv.lock"]} in pipeline["audit"]["rules"]
    assert "needs" not in pipeline["lint"]
    for name_, job in jobs.items():
        for rule in job.get("rules", []):
            if rule.get("when") == "manual":  # a manual job never leaves a pipeline "blocked"
                assert rule.get("allow_failure") is True, name_
    # Training: its runner tag from a variable, a first run without dvc.lock, commit-back.
    for job in ("train", "retrain"):
        assert jobs[job]["tags"] == ["$TRAIN_RUNNER_TAG"]
        assert jobs[job]["interruptible"] is False
        assert any("nox -s ci-train -- " in line for line in jobs[job]["script"])
        assert any("nox -s commit-back -- " in line for line in jobs[job]["script"])
    assert "--retrain" in " ".join(jobs["retrain"]["script"])
    assert jobs["retrain"]["needs"] == ["monitor"]
    assert any("nox -s ci-monitor" in line for line in jobs["monitor"]["script"])
    deploy = jobs["deploy"]
    assert "audit" in deploy["needs"]
    assert deploy["rules"][0]["when"] == "manual"
    assert deploy["environment"]["name"] == "production"
    assert deploy["artifacts"]["reports"]["cyclonedx"] == "build/sbom/*.cdx.json"
    assert any("nox -s ci-deploy" in line for line in deploy["script"])
    # Docker-in-Docker over TLS.
    assert deploy["variables"]["DOCKER_HOST"] == "tcp://docker:2376"
    assert deploy["variables"]["DOCKER_TLS_CERTDIR"] == "/certs"
    trained = jobs["deploy-trained"]
    assert {need["job"] for need in trained["needs"]} == {"train", "retrain"}
    rollback = jobs["rollback"]
    assert any("nox -s ci-rollback" in line for line in rollback["script"])
    assert rollback["resource_group"] != deploy["resource_group"]
    assert "services" not in rollback  # the previous image again: nothing is built
    # Cloud access: the job's OIDC token, never a long-lived key.
    cloud = "://" in given.get("dvc_remote", "")
    for job in ("train", "retrain", "monitor"):
        assert ("id_tokens" in jobs[job]) == cloud, job
    for key in ("AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "CONNECTION_STRING"):
        assert key not in text, key


def test_jenkinsfiles_pass_groovy_lint(rendered: dict[str, Path], npm_bin: Path) -> None:
    """One npm-groovy-lint run (a JVM start, ~10 s) over every rendered Jenkinsfile."""
    files = [str(rendered[n] / "Jenkinsfile") for n in uses("jenkins")]
    command = [npm_bin / "npm-groovy-lint", "--noserver", "--config", "recommended-jenkinsfile"]
    result = lint(*command, "--output", "json", *files)
    report = json.loads(result.stdout)
    assert report["summary"]["totalFilesLinted"] == len(files)
    found = {k: v for k, v in report["summary"].items() if k.startswith("totalFound")}
    assert found["totalFoundErrorNumber"] == 0, result.stdout
    assert found["totalFoundWarningNumber"] == 0, result.stdout


@pytest.mark.parametrize("name", uses("jenkins"))
def test_jenkinsfile_keeps_the_rules(rendered: dict[str, Path], name: str) -> None:
    # No Groovy parser at hand (groovy-lint checks syntax above): check the lines that matter.
    text = (rendered[name] / "Jenkinsfile").read_text()
    for needed in (
        "timeout(time:",
        "disableConcurrentBuilds(",
        "parameters {",
        "parameterizedCron(",
        "junit testResults:",
        "credentials('mlflow-tracking-uri')",
        "input {",
        "sh '$NOX -s ci-rollback'",
        "build/sbom/*.cdx.json",
        f"defaultValue: '{answers(name)['gpu_runner_label']}'",
    ):
        assert needed in text, needed
    versions = ", ".join(f"'{v}'" for v in versions_from(answers(name)["python_version"]))
    assert f"values {versions}\n" in text
    # Parameters reach the shell as environment variables: no Groovy interpolation in sh steps.
    assert not re.search(r'\bsh\s+"', text)
    assert not re.search(r"\bsh\s+'''[^']*\$\{", text)


def test_renovate_config_matches_the_schema(rendered: dict[str, Path]) -> None:
    files = [p / "renovate.json" for p in rendered.values() if (p / "renovate.json").exists()]
    result = lint(tool("check-jsonschema"), "--builtin-schema", "vendor.renovate", *files)
    assert result.returncode == 0, result.stdout + result.stderr


# --- The Jenkinsfile's structure: its blocks, read by matching braces (groovy-lint, above, has
# checked the syntax). Strings in this file hold balanced braces only (`${...}`).


def _block(text: str, opening: int) -> str:
    """The text between the brace at ``opening`` and its match."""
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1 : index]
    raise AssertionError(f"unbalanced braces from offset {opening}")


def _directive(body: str, name: str) -> str | None:
    """The body of ``name { ... }`` at the top level of ``body`` (not in a nested block)."""
    depth = 0
    for index, char in enumerate(body):
        word_start = index == 0 or not (body[index - 1].isalnum() or body[index - 1] == "_")
        if depth == 0 and word_start and re.match(rf"{name}\s*\{{", body[index:]):
            return _block(body, body.index("{", index))
        depth += {"{": 1, "}": -1}.get(char, 0)
    return None


def jenkins_stages(text: str) -> dict[str, str]:
    """Every stage('Name') of the Jenkinsfile (nested ones included) and its body."""
    return {
        match.group(1): _block(text, match.end() - 1)
        for match in re.finditer(r"stage\('([^']+)'\)\s*\{", text)
    }


@pytest.mark.parametrize("name", uses("jenkins"))
def test_jenkins_input_waits_only_in_builds_that_run_its_stage(
    rendered: dict[str, Path], name: str
) -> None:
    """Declarative Jenkins asks for an `input` before it evaluates `when`, unless the `when`
    says `beforeInput true`: without it every build would stop at the question."""
    text = (rendered[name] / "Jenkinsfile").read_text()
    asking = {n: body for n, body in jenkins_stages(text).items() if _directive(body, "input")}
    released = (rendered[name] / "deploy" / "k8s").is_dir()  # release_target: kubernetes
    assert set(asking) == {"Deploy", "Rollback", *(["Release"] if released else [])}
    assert len(re.findall(r"\binput\s*\{", text)) == len(asking)  # no input elsewhere
    for stage, body in asking.items():
        when = _directive(body, "when")
        assert when is not None, stage
        assert re.search(r"^\s*beforeInput true$", when, re.MULTILINE), (stage, when)


@pytest.mark.parametrize("name", uses("jenkins"))
def test_jenkins_crons_fire_on_main_only(rendered: dict[str, Path], name: str) -> None:
    text = (rendered[name] / "Jenkinsfile").read_text()
    pipeline = _directive(text, "pipeline")
    assert pipeline is not None
    triggers = _directive(pipeline, "triggers")
    assert triggers is not None
    code = re.sub(r"//[^\n]*", "", triggers).strip()
    match = re.fullmatch(
        r"parameterizedCron\(env\.BRANCH_NAME == 'main' \? '\'\'(.*?)'\'\' : ''\)", code, re.S
    )
    assert match, code
    lines = [line.split() for line in match.group(1).strip().splitlines()]
    pipelines = {line[-1] for line in lines}
    assert pipelines == {"%PIPELINE=monitor", "%PIPELINE=train", "%PIPELINE=audit"}
    assert all(len(line) == 6 for line in lines), lines  # five cron fields and the parameter


@pytest.mark.parametrize("name", uses("jenkins"))
def test_jenkins_agents_get_what_their_stages_call(rendered: dict[str, Path], name: str) -> None:
    """Stages in the uv image find uvx there; a stage on a labelled agent installs uv first
    (the pinned version, into this agent's workspace) and calls nox through it."""
    text = (rendered[name] / "Jenkinsfile").read_text()
    top = _directive(_directive(text, "pipeline") or "", "agent")
    assert top is not None
    assert re.search(r"image 'ghcr\.io/astral-sh/uv:[\d.]+-python", top)
    environment = _directive(_directive(text, "pipeline") or "", "environment") or ""
    uv_version = re.search(r"UV_VERSION = '([\d.]+)'", environment)
    assert uv_version
    assert f"uv:{uv_version.group(1)}-python" in top  # one uv version everywhere
    labelled = {}
    for stage, body in jenkins_stages(text).items():
        agent = _directive(body, "agent")
        if agent is not None and "label" in agent:
            labelled[stage] = body
    released = (rendered[name] / "deploy" / "k8s").is_dir()  # release_target: kubernetes
    assert set(labelled) == {"Train", "Deploy", *(["Release"] if released else [])}
    for stage, body in labelled.items():
        env = _directive(body, "environment") or ""
        tools = '"${env.WORKSPACE}@tmp/tools/bin/uvx --from nox=='
        assert re.search(rf"NOX = {re.escape(tools)}[\d.]+ nox\"", env), (stage, env)
        for variable in ("UV_CACHE_DIR", "HOME"):  # this agent's workspace, not the first's
            assert f'{variable} = "${{env.WORKSPACE}}@tmp/' in env, (stage, variable)
        steps = _directive(body, "steps") or ""
        install = steps.index('python3 -m venv "$WORKSPACE@tmp/tools"')
        assert '"$WORKSPACE@tmp/tools/bin/pip" install' in steps
        assert '"uv==$UV_VERSION"' in steps
        assert install < steps.index("$NOX"), stage  # installed before it is called


# --- OIDC: the job's token becomes the DVC remote's cloud identity (noxfile.py), no key ------


def _noxfile(project: Path, name: str) -> Any:
    """The rendered noxfile, imported without registering its sessions."""
    import importlib.util

    import nox

    def unregistered(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args and callable(args[0]) else (lambda func: func)

    spec = importlib.util.spec_from_file_location(name, project / "noxfile.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nox, "session", unregistered)
        spec.loader.exec_module(module)
    return module


IDENTITY = {  # the variables a project sets (README, "OIDC"), and what the SDK is handed
    "s3": ({"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/ct"}, "AWS_WEB_IDENTITY_TOKEN_FILE"),
    "gs": (
        {
            "GCP_WORKLOAD_IDENTITY_PROVIDER": "projects/1/locations/global/"
            "workloadIdentityPools/ci/providers/gitlab",
            "GCP_SERVICE_ACCOUNT": "dvc@project.iam.gserviceaccount.com",
        },
        "GOOGLE_APPLICATION_CREDENTIALS",
    ),
    "azure": (
        {"AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001"},
        "AZURE_FEDERATED_TOKEN_FILE",
    ),
}
OIDC_VARIABLES = ("CI_OIDC_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN")


@pytest.mark.parametrize("name", ["github", "gitlab", "jenkins"])  # s3, gs, azure remotes
def test_gitlab_oidc_token_becomes_the_cloud_identity_without_a_key(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    noxfile = _noxfile(rendered[name], f"noxfile_oidc_{name}")
    kind = noxfile.REMOTE_KIND
    variables, handed = IDENTITY[kind]
    for variable in (*OIDC_VARIABLES, *(v for given, _ in IDENTITY.values() for v in given)):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CI_OIDC_TOKEN", "header.payload.signature")
    assert noxfile._cloud_identity() == {}  # no identity configured: nothing asked, nothing written
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    identity = noxfile._cloud_identity()
    assert set(identity) == {handed}
    path = Path(identity[handed])
    assert path.is_relative_to(tmp_path)  # outside the project
    assert path.parent.stat().st_mode & 0o777 == 0o700
    if kind == "gs":
        config = json.loads(path.read_text())
        assert config["type"] == "external_account"  # a configuration, not a key
        assert "private_key" not in config
        assert (
            config["audience"]
            == f"//iam.googleapis.com/{variables['GCP_WORKLOAD_IDENTITY_PROVIDER']}"
        )
        assert variables["GCP_SERVICE_ACCOUNT"] in config["service_account_impersonation_url"]
        path = Path(config["credential_source"]["file"])
    assert path.read_text() == "header.payload.signature"


def test_github_oidc_token_is_asked_from_the_runner_for_the_clouds_audience(
    rendered: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """GitHub hands a token to whoever asks its runner's URL with the job's request token."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import parse_qs, urlparse

    asked: list[tuple[dict[str, list[str]], str | None]] = []

    class Runner(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append((parse_qs(urlparse(self.path).query), self.headers["Authorization"]))
            body = json.dumps({"value": "github.jwt.token"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Runner)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        noxfile = _noxfile(rendered["github"], "noxfile_oidc_github_runner")  # s3 remote
        for variable in OIDC_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        url = f"http://127.0.0.1:{server.server_port}/token?api-version=2.0"
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", url)
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-token")
        monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/ct")
        identity = noxfile._cloud_identity()
    finally:
        server.shutdown()
    assert asked == [
        ({"api-version": ["2.0"], "audience": ["sts.amazonaws.com"]}, "bearer request-token")
    ]
    assert Path(identity["AWS_WEB_IDENTITY_TOKEN_FILE"]).read_text() == "github.jwt.token"
