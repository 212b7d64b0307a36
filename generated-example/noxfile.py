#!/usr/bin/env -S uv run --script
# /// script
# dependencies = ["nox>=2025.2.9"]
# ///
"""Every command of the project, once. The Makefile and the CI pipelines only call these sessions.

All sessions share ONE environment (``.venv``, or ``$UV_PROJECT_ENVIRONMENT``): what
``uv sync --locked`` makes from the committed ``uv.lock``, with the PyTorch build that fits this
machine. Each session brings it up to date first (a fraction of a second when it is), then runs
its commands in it through ``uv run --no-sync``, so DVC's stages find the same ``python``.

PyTorch build (README, "Choosing the PyTorch build"): uv.lock pins torch's version; the build is
picked at install time from the accelerator answer (auto), or else, first set wins:
  TORCH_FIND_LINKS  a folder of wheels (air-gapped machines, CI caches); no index is asked for torch
  TORCH_INDEX_URL   a PyTorch wheel index or mirror, e.g. https://download.pytorch.org/whl/cu128
  UV_TORCH_BACKEND  uv's name of a build (cpu, cu128, ..., auto: CUDA if a driver is found)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "none"

ROOT = Path(__file__).parent.resolve()
PACKAGE = "my_ml_project"
# UV_PYTHON (uv's own setting; CI sets it per job of its Python matrix) picks another version.
PYTHON = os.environ.get("UV_PYTHON") or "3.11"
TORCH_BACKEND = "auto"  # the accelerator answer, as uv's --torch-backend names it
VENV = ROOT / os.environ.get("UV_PROJECT_ENVIRONMENT", ".venv")
sys.path.insert(0, str(ROOT))
from tools import environment  # noqa: E402  (the environment's plumbing: uv, the torch build)


def project_env(session: nox.Session, compile: bool = False) -> dict[str, str | None]:
    """Bring the shared environment up to date (see tools/environment.py); return its env."""
    return environment.sync(session, VENV, PYTHON, TORCH_BACKEND, compile=compile)


def run(
    session: nox.Session, *args: str, env: dict[str, str | None], **kwargs
) -> str | bool | None:
    """Run a program of the project environment, activated (as `uv run --no-sync` would)."""
    return environment.run(session, VENV, *args, env=env, **kwargs)


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """Lock the dependencies into uv.lock (`-- --upgrade` moves them all forward); commit it."""
    environment.lock(session, *session.posargs)


@nox.session(default=False)
def install(session: nox.Session) -> None:
    """Create or update the environment every session shares: uv.lock, this machine's torch."""
    env = project_env(session, compile=True)
    check = (
        f"import torch, {PACKAGE}; "
        "print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
    )
    run(session, "python", "-c", check, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """Every hook of .pre-commit-config.yaml: ruff, mypy, codespell, secrets, the CI files, ...

    `-- HOOK ...` runs only those (`nox -s lint -- mypy`). Fixers (ruff, whitespace) fix what
    they can and still fail the run: look at the changes, then run it again.
    """
    _pre_commit(session, project_env(session), *session.posargs)


@nox.session(default=False)
def secrets(session: nox.Session) -> None:
    """Scan the files git would commit for secrets (the detect-secrets hook; `lint` runs it too).

    New findings fail, naming the file and line. A false positive is marked in the code
    (`# pragma: allowlist secret`) or audited into .secrets.baseline (`detect-secrets scan
    --baseline .secrets.baseline`, then `detect-secrets audit .secrets.baseline`).
    """
    _pre_commit(session, project_env(session), "detect-secrets")


def _pre_commit(session: nox.Session, env: dict[str, str | None], *hooks: str) -> None:
    """pre-commit's hooks (all, or those named) over every file git tracks or would add (a new
    file not yet added is checked too: a secret in it must not wait for the commit)."""
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    found = run(session, *listed, env=env, silent=True, success_codes=[0, 128])
    files = [f for f in found.split("\0") if f and (ROOT / f).is_file()]
    if not files:
        session.error("lint: no files to check (not a git repository? `git init` first)")
    command = ["pre-commit", "run", *hooks, "--show-diff-on-failure", "--files", *files]
    run(session, *command, env=env)


@nox.session
def test(session: nox.Session) -> None:
    """Run the unit tests (seconds, CPU)."""
    env = project_env(session)
    run(session, "pytest", *session.posargs, env=env)


@nox.session(default=False)
def train(session: nox.Session) -> None:
    """Run the DVC pipeline (prepare -> train -> evaluate); only changed stages re-run."""
    env = project_env(session)
    _repro(session, *session.posargs, env=env)
    _show_metrics(session)


# Exit codes of the sessions that run the pipeline (README, "Exit codes"): the gate's own,
# which `dvc repro` would report as 1 like any failed stage, and nox as 1 again.
GATE_EXIT = {"failed": 3, "undecided": 4}


def _repro(session: nox.Session, *args: str, env: dict[str, str | None]) -> None:
    """`dvc repro ARGS`; when the gate stops the pipeline, exit with the gate's code (3 failed,
    4 undecided) rather than 1, so that CI can tell "not good enough" from "cannot decide"."""
    gate = ROOT / "metrics" / "gate.json"
    started = time.time()
    try:
        run(session, "dvc", "repro", *args, env=env)
    except CommandFailed:
        if gate.exists() and gate.stat().st_mtime >= started:
            decision = json.loads(gate.read_text(encoding="utf-8")).get("decision")
            if decision in GATE_EXIT:
                session.log(f"gate: {decision} (exit code {GATE_EXIT[decision]})")
                raise SystemExit(GATE_EXIT[decision]) from None
        raise


def _show_metrics(session: nox.Session) -> None:
    """The test metrics and the gate's decision, from the stage outputs.

    Read here rather than with `dvc metrics show`, a second DVC process (~1.5 s) on every run.
    """
    metrics, gate = ROOT / "metrics" / "evaluate.json", ROOT / "metrics" / "gate.json"
    if metrics.exists():
        values = json.loads(metrics.read_text(encoding="utf-8"))
        shown = ("accuracy", "f1", "roc_auc", "log_loss", "baseline_f1")
        session.log("test: " + ", ".join(f"{k} {values[k]:.4f}" for k in shown if k in values))
    if gate.exists():
        decision = json.loads(gate.read_text(encoding="utf-8"))
        session.log(f"gate: {decision['decision']} ({decision['reason']})")


@nox.session(default=False)
def evaluate(session: nox.Session) -> None:
    """Re-run the evaluation stage only (metrics, plots and the promotion gate).

    ``-- --replace-unloadable-champion`` promotes a passing model even when the current
    champion cannot be loaded or scored (the gate refuses that by default).
    """
    env = project_env(session)
    unknown = [a for a in session.posargs if a != "--replace-unloadable-champion"]
    if unknown:
        session.error(f"unknown arguments {unknown}: only --replace-unloadable-champion")
    if session.posargs:
        env = {**env, "REPLACE_UNLOADABLE_CHAMPION": "1"}  # reaches the stage through dvc
    _repro(session, "--force", "--single-item", "evaluate", env=env)


@nox.session(name="mlflow-ui", default=False)
def mlflow_ui(session: nox.Session) -> None:
    """Start the MLflow UI for the project's tracking store on http://127.0.0.1:5000."""
    env = project_env(session)
    store = f"{PACKAGE}.registry.store"
    uri = run(session, "python", "-m", store, "uri", env=env, silent=True).strip()
    port = session.posargs[0] if session.posargs else "5000"
    # Through the environment, not the command line nox prints: the URI may hold credentials.
    env = {**env, "MLFLOW_BACKEND_STORE_URI": uri}
    # No server-side jobs (MLflow 3's GenAI evaluation, unused here): their seven polling job
    # runners kept a quarter of a core busy (0.26 measured) while the UI sat idle.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    run(session, "mlflow", "ui", "--host", "127.0.0.1", "--port", port, env=env)


@nox.session(default=False)
def push(session: nox.Session) -> None:
    """Push data and models to the DVC remote."""
    run(session, "dvc", "push", *session.posargs, env=project_env(session))


@nox.session(default=False)
def pull(session: nox.Session) -> None:
    """Pull data and models from the DVC remote."""
    run(session, "dvc", "pull", *session.posargs, env=project_env(session))


def _serving_env(session: nox.Session) -> dict[str, str | None]:
    """The environment, with BentoML's store inside the project and the PyTorch build named."""
    home = os.environ.get("BENTOML_HOME") or str(ROOT / ".bentoml")
    return {**project_env(session), "BENTOML_HOME": home, "TORCH_BACKEND": TORCH_BACKEND,
            "BENTOML_DO_NOT_TRACK": "true"}  # fmt: skip


@nox.session(default=False)
def deploy(session: nox.Session) -> None:
    """Build a Bento (`-- --version N | --alias A`, default champion; `--containerize`)."""
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "deploy", *session.posargs, env=env)


@nox.session(default=False)
def serve(session: nox.Session) -> None:
    """Serve the champion's Bento on 127.0.0.1:3000 (`-- --port P --host H`; `--bento TAG`)."""
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "serve", *session.posargs, env=env)


@nox.session(default=False)
def request(session: nox.Session) -> None:
    """Write a ready /predict body from the test split to build/request.json (`-- --rows N`)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "example", *session.posargs, env=env)


@nox.session(default=False)
def audit(session: nox.Session) -> None:
    """Check uv.lock against the OSV advisory database (audit-ignore.toml: accepted advisories).

    Runs without the project environment (uv and the lock are all it needs, so a CI audit job
    installs no torch). Exits with the audit's own code: 1 something to fix, 2 bad input,
    3 the advisory service could not be reached (see tools/audit.py).
    """
    # UV_PYTHON may name an interpreter (a path): the audit wants a version.
    version = PYTHON if PYTHON[:1].isdigit() else "3.11"
    command = [sys.executable, "tools/audit.py", "--python-version", version]
    session.log(" ".join(["python", *command[1:]]))
    env = dict(os.environ)
    code = subprocess.run([*command, *session.posargs], cwd=ROOT, env=env).returncode
    if code:
        # nox would turn any failure into exit code 1; SystemExit passes the audit's code on.
        raise SystemExit(code)


@nox.session(default=False)
def predict(session: nox.Session) -> None:
    """Batch scoring: -- --input FILE --output FILE [--version N | --alias A] (serving/batch.py)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.serving.batch", *session.posargs, env=env)


@nox.session(default=False)
def monitor(session: nox.Session) -> None:
    """Drift and quality of served traffic (`-- --last N | --since T | --current F | --no-fail`)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.monitoring.monitor", *session.posargs, env=env)


@nox.session(default=False)
def simulate(session: nox.Session) -> None:
    """Demo traffic: -- --url URL --rows N --drift D [--seed S] [--feedback] (monitoring/)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.monitoring.simulate", *session.posargs, env=env)


@nox.session(default=False)
def retrain(session: nox.Session) -> None:
    """Labelled production rows -> a new DVC version of the raw data -> the pipeline and gate."""
    env = project_env(session)
    state = ROOT / "data" / "retrain.json"
    before = state.read_bytes() if state.exists() else None
    run(session, "python", "-m", f"{PACKAGE}.monitoring.retrain", *session.posargs, env=env)
    if "--dry-run" in session.posargs or (state.read_bytes() if state.exists() else None) == before:
        return  # nothing added: the pipeline is not rerun
    _repro(session, env=env)
    _show_metrics(session)


@nox.session(default=False)
def rollback(session: nox.Session) -> None:
    """Move `champion` back to the previous champion, then ship it as `deploy` does."""
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.registry.store", "rollback", env=env)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "deploy", env=env)
    session.log("restart the service (`nox -s serve`) to serve the rolled-back model")


@nox.session(default=False)
def exp(session: nox.Session) -> None:
    """A DVC experiment in the project environment: -- [`dvc exp run` options], e.g.
    `-S train.lr=0.01`. Its model is registered and tagged with the experiment's name; it never
    moves champion (apply, commit and `nox -s evaluate` for that)."""
    env = project_env(session)
    run(session, "dvc", "exp", "run", *session.posargs, env=env)
    _show_metrics(session)


@nox.session(default=False)
def unblock(session: nox.Session) -> None:
    """Let a rolled-back version be promoted again: -- VERSION (rollback blocks the one it left)."""
    if len(session.posargs) != 1 or not session.posargs[0].isdigit():
        session.error("usage: nox -s unblock -- VERSION (a registered version number)")
    env = project_env(session)
    store = f"{PACKAGE}.registry.store"
    run(session, "python", "-m", store, "unblock", session.posargs[0], env=env)


# --- CI helpers: what the pipelines (.github/, .gitlab-ci.yml, Jenkinsfile) need besides the
# sessions above, kept here so that no pipeline carries logic of its own.
MONITOR_RESULT = ROOT / "reports" / "monitoring" / "latest" / "result.json"
RETRAIN_ON = ("drift", "degraded")  # monitoring statuses that start the training pipeline


@nox.session(name="check-pipeline", default=False)
def check_pipeline(session: nox.Session) -> None:
    """Quick DVC pipeline check: dvc.yaml and params parse, the stages' status (no data needed)."""
    run(session, "dvc", "status", env=project_env(session))


@nox.session(default=False)
def metrics(session: nox.Session) -> None:
    """The test metrics and the gate decision as Markdown, appended to `-- FILE` (else printed)."""
    paths = [ROOT / "metrics" / "evaluate.json", ROOT / "metrics" / "gate.json"]
    if missing := [p.relative_to(ROOT).as_posix() for p in paths if not p.exists()]:
        session.error(f"no {', '.join(missing)}: run `nox -s train` first")
    values, gate = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
    rows = [f"| {k} | {v:.4f} |" for k, v in values.items() if isinstance(v, int | float)]
    text = "\n".join(
        [
            "### Training",
            f"**Gate: {gate['decision']}** ({gate['reason']})",
            "",
            "| metric | value |",
            "|---|---|",
            *rows,
            "",
        ]
    )
    _write_or_print(session, session.posargs, text)


@nox.session(name="retrain-check", default=False)
def retrain_check(session: nox.Session) -> None:
    """Whether the latest monitoring report asks for retraining (drift or degraded).

    `-- --output FILE` appends `status=...` and `retrain=true|false` (GitHub step outputs,
    GitLab dotenv); `--summary FILE` appends a Markdown line; `--fail-when-due` fails the
    session when retraining is due (for CI systems that branch on a job's failure).
    """
    parser = argparse.ArgumentParser(prog="nox -s retrain-check --")
    parser.add_argument("--output", help="append status=... and retrain=... lines here")
    parser.add_argument("--summary", help="append a Markdown line here")
    parser.add_argument("--fail-when-due", action="store_true", help="fail when retraining is due")
    args = parser.parse_args(session.posargs)
    try:
        status = json.loads(MONITOR_RESULT.read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        session.error(f"no monitoring status in {MONITOR_RESULT.relative_to(ROOT)}: {error}")
    due = status in RETRAIN_ON
    session.log(f"monitoring status: {status}; retraining {'due' if due else 'not due'}")
    if args.output:
        _write_or_print(session, [args.output], f"status={status}\nretrain={str(due).lower()}\n")
    if args.summary:
        verdict = "retraining started" if due else "no retraining"
        _write_or_print(session, [args.summary], f"### Monitoring\n**{status}**: {verdict}\n")
    if due and args.fail_when_due:
        session.error(f"retraining due: monitoring found {status}")


def _write_or_print(session: nox.Session, posargs: list[str], text: str) -> None:
    """Append ``text`` to the file named in ``posargs`` (CI summaries and outputs), else print."""
    if not posargs:
        print(text)
        return
    with Path(posargs[0]).open("a", encoding="utf-8") as out:
        out.write(text)


# --- Continuous training and delivery in CI: what the train, monitor and deploy jobs run. They
# hold on a project's very first run (no dvc.lock, no traffic yet, no champion) and fail closed,
# in one line, where a run would otherwise look green and leave nothing behind.
TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXIT_NOT_CONFIGURED = 2  # a CI job without the tracking server or push token it needs
GATE = ROOT / "metrics" / "gate.json"
# What a promoted training commits back: the pipeline's lock, and the git-tracked outputs
# (metrics, plots, the run's record, the schema) and data versions (`*.dvc`, retrain.json).
COMMITTED_BACK = ("dvc.lock", "metrics", "plots", "models", "data")
BOT = ("-c", "user.name=ct-bot", "-c", "user.email=ct-bot@users.noreply.invalid")


def _fail_closed(message: str) -> None:
    """One line on stderr and exit code 2 (EXIT_NOT_CONFIGURED): CI shows the line as the cause."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_NOT_CONFIGURED)


def _require_tracking_server() -> None:
    """A CI job must record to a tracking server: a SQLite file on a runner vanishes with it,
    and so would the champion it "promoted" (deploy would fail later, and misleadingly)."""
    uri = os.environ.get(TRACKING_ENV, "").strip()
    if not uri:
        _fail_closed(
            f"{TRACKING_ENV} is not set: set it to the MLflow tracking server "
            '(a CI/CD variable or secret; README, "Pipelines")'
        )
    if uri.startswith("sqlite:"):
        _fail_closed(
            f"{TRACKING_ENV} is a SQLite file, which vanishes with the CI runner: "
            "set it to the MLflow tracking server"
        )


# The DVC remote's cloud identity through OIDC: the CI job's short-lived token (GitLab: the
# `id_tokens` variable CI_OIDC_TOKEN; GitHub: asked from the runner, `id-token: write`) becomes
# what the cloud's SDK reads. No long-lived key anywhere: the token and the configuration that
# points at it are written to a private temporary folder, outside the project.
REMOTE_KIND = "local"
OIDC_AUDIENCE = {"s3": "sts.amazonaws.com", "azure": "api://AzureADTokenExchange"}
GCP_PROVIDER = "GCP_WORKLOAD_IDENTITY_PROVIDER"


def _oidc_token(audience: str) -> str | None:
    """The job's OIDC token for ``audience`` (None outside a CI job that may have one)."""
    if token := os.environ.get("CI_OIDC_TOKEN"):
        return token
    url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not (url and bearer):
        return None
    import urllib.parse
    import urllib.request

    asked = f"{url}&audience={urllib.parse.quote(audience, safe='')}"
    request = urllib.request.Request(asked, headers={"Authorization": f"bearer {bearer}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["value"]


def _cloud_identity() -> dict[str, str]:
    """The environment that makes the DVC remote's SDK use the job's OIDC token ({}: none)."""
    provider = os.environ.get(GCP_PROVIDER, "")
    if REMOTE_KIND == "gs" and provider:
        audience = f"https://iam.googleapis.com/{provider}"
    elif REMOTE_KIND in OIDC_AUDIENCE and os.environ.get(
        {"s3": "AWS_ROLE_ARN", "azure": "AZURE_CLIENT_ID"}[REMOTE_KIND]
    ):
        audience = OIDC_AUDIENCE[REMOTE_KIND]
    else:
        return {}  # a local remote, or the identity comes from elsewhere (runner, credentials)
    token = _oidc_token(audience)
    if token is None:
        return {}
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="oidc-"))  # 0700
    token_file = folder / "token"
    token_file.write_text(token, encoding="utf-8")
    if REMOTE_KIND == "s3":  # with AWS_ROLE_ARN: boto3 assumes the role
        return {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file)}
    if REMOTE_KIND == "azure":  # with AZURE_CLIENT_ID, AZURE_TENANT_ID: azure-identity
        return {"AZURE_FEDERATED_TOKEN_FILE": str(token_file)}
    account = os.environ.get("GCP_SERVICE_ACCOUNT", "")
    config = {  # workload identity federation: a configuration, no key
        "type": "external_account",
        "audience": f"//iam.googleapis.com/{provider}",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": str(token_file)},
        **({"service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/"
            f"projects/-/serviceAccounts/{account}:generateAccessToken"} if account else {}),
    }  # fmt: skip
    (folder / "gcp.json").write_text(json.dumps(config), encoding="utf-8")
    return {"GOOGLE_APPLICATION_CREDENTIALS": str(folder / "gcp.json")}


@nox.session(name="ci-train", default=False)
def ci_train(session: nox.Session) -> None:
    """CI's training: pull, train (`-- --retrain`: first the new labelled traffic), gate, push.

    `--when-due`: only if the latest monitoring report asks for it; `--force` re-runs every
    stage; `--output FILE` appends promoted=..., model_version=... (step outputs, dotenv);
    `--summary FILE` appends the metrics as Markdown. Exit code 2: MLFLOW_TRACKING_URI unset.
    """
    parser = argparse.ArgumentParser(prog="nox -s ci-train --")
    parser.add_argument("--retrain", action="store_true", help="add labelled traffic first")
    parser.add_argument("--when-due", action="store_true", help="only when monitoring asks")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("--output", help="append promoted=... and model_version=... here")
    parser.add_argument("--summary", help="append the metrics as Markdown here")
    args = parser.parse_args(session.posargs)
    for path in (args.output, args.summary):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.when_due:
        status = json.loads(MONITOR_RESULT.read_text(encoding="utf-8"))["status"]
        if status not in RETRAIN_ON:
            session.log(f"monitoring status: {status}; retraining not due: nothing to do")
            if args.output:
                _write_or_print(session, [args.output], "promoted=false\nmodel_version=\n")
            return
    _require_tracking_server()
    env = {**project_env(session), **_cloud_identity()}
    # A new project has no dvc.lock yet: the stage outputs it would list are not an error.
    run(session, "dvc", "pull", "--allow-missing", env=env)
    if args.retrain:
        # The commit is commit-back's, with the lock and metrics, once the gate has promoted.
        run(session, "python", "-m", f"{PACKAGE}.monitoring.retrain", "--no-commit", env=env)
    before = GATE.read_bytes() if GATE.exists() else None
    _repro(session, *(["--force"] if args.force else []), env=env)
    _show_metrics(session)
    run(session, "dvc", "push", env=env)
    decision = json.loads(GATE.read_text(encoding="utf-8"))
    # The gate ran now (an up-to-date pipeline keeps the committed decision) and promoted.
    promoted = GATE.read_bytes() != before and decision["decision"] == "promoted"
    if args.summary:
        session.notify("metrics", [args.summary])
    if args.output:
        version = decision.get("candidate_version", "")
        text = f"promoted={str(promoted).lower()}\nmodel_version={version}\n"
        _write_or_print(session, [args.output], text)


def _push_url() -> str:
    """Where commit-back pushes: CT_GIT_PUSH_URL, else this repository with CT_PUSH_TOKEN."""
    if url := os.environ.get("CT_GIT_PUSH_URL", "").strip():
        return url
    token = os.environ.get("CT_PUSH_TOKEN", "").strip()
    if not token:
        _fail_closed(
            "CT_PUSH_TOKEN is not set: a token that may push to the branch is needed to commit "
            'the promoted model\'s dvc.lock back (README, "Pipelines")'
        )
    if server := os.environ.get("CI_SERVER_HOST"):  # GitLab
        return f"https://ct-bot:{token}@{server}/{os.environ['CI_PROJECT_PATH']}.git"
    if repository := os.environ.get("GITHUB_REPOSITORY"):
        host = os.environ.get("GITHUB_SERVER_URL", "https://github.com").removeprefix("https://")
        return f"https://x-access-token:{token}@{host}/{repository}.git"
    if url := os.environ.get("GIT_URL", "").removeprefix("https://"):  # Jenkins
        return f"https://ct-bot:{token}@{url}"
    _fail_closed("no repository to push to: set CT_GIT_PUSH_URL")
    raise AssertionError  # unreachable: _fail_closed exits


@nox.session(name="commit-back", default=False)
def commit_back(session: nox.Session) -> None:
    """After a promotion: commit dvc.lock, metrics and data versions, push (`-- BRANCH`).

    Nothing when the gate did not promote. The commit says `[skip ci]`: the pipeline that
    pushed it starts the deployment itself. Exit code 2: no token to push with.
    """
    if not session.posargs:
        session.error("usage: nox -s commit-back -- BRANCH")
    branch = session.posargs[0]
    if not GATE.exists():
        session.log("no gate decision (no training ran): nothing to commit back")
        return
    decision = json.loads(GATE.read_text(encoding="utf-8"))
    if decision["decision"] != "promoted":
        session.log(f"gate: {decision['decision']}: nothing to commit back")
        return
    paths = [p for p in COMMITTED_BACK if (ROOT / p).exists()]
    session.run("git", "add", "--all", "--", *paths, external=True)
    staged = session.run("git", "diff", "--cached", "--name-only", external=True, silent=True)
    if not staged.strip():
        session.log("nothing changed in git: nothing to commit back")
        return
    url = _push_url()
    version = decision.get("candidate_version", "?")
    message = f"Training: model v{version} promoted (dvc.lock, metrics) [skip ci]"
    session.run("git", *BOT, "commit", "--quiet", "-m", message, external=True)
    # Not through session.run: its log line would show the URL, and the token in it.
    session.log(f"git push <repository> HEAD:refs/heads/{branch}")
    pushed = subprocess.run(["git", "push", "--quiet", url, f"HEAD:refs/heads/{branch}"],
                            cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if pushed.returncode:
        said = pushed.stderr.replace(url, "<repository>").strip().splitlines()
        session.error(f"push to {branch} refused: {said[-1] if said else pushed.returncode}")
    session.log(f"committed back to {branch}: {message}")


@nox.session(name="ci-monitor", default=False)
def ci_monitor(session: nox.Session) -> None:
    """CI's monitoring: the report and the retraining verdict; no traffic yet is neutral.

    With no prediction log (a new project, nothing served yet) it writes the status `no_data`
    and ends green, saying "no data yet"; else it pulls the reference (the train split) and
    runs `monitor -- --no-fail`. Then `retrain-check` (its arguments: these).
    """
    env = project_env(session)
    probe = (
        f"from {PACKAGE}.serving.predlog import PREDICTIONS, log_folder; "
        "f = log_folder(); "
        "print(f if any(f.glob(f'date=*/{PREDICTIONS}-*.jsonl')) else '')"
    )
    folder = run(session, "python", "-c", probe, env=env, silent=True).strip()
    if not folder:
        reason = "no data yet: no prediction log (nothing served, or PREDICTION_LOG_DIR unset)"
        MONITOR_RESULT.parent.mkdir(parents=True, exist_ok=True)
        result = {"status": "no_data", "reasons": [reason]}
        MONITOR_RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        session.log(f"monitoring: {reason}; neutral, nothing to judge")
    else:
        env = {**env, **_cloud_identity()}
        run(session, "dvc", "pull", "--allow-missing", "prepare", env=env)
        run(session, "python", "-m", f"{PACKAGE}.monitoring.monitor", "--no-fail", env=env)
    session.notify("retrain-check", session.posargs)


DEPLOYED = "deployed"  # the registry alias of the version whose image was shipped last


def _registry(session: nox.Session, env: dict[str, str | None], code: str) -> str:
    """Run ``code`` with ``registry`` configured and ``name`` the model's; return its output."""
    preamble = (
        f"from {PACKAGE}.registry import store as registry; "
        f"from {PACKAGE}.core.config import load_params; "
        "p = load_params().mlflow; registry.configure(p); name = p.model_name; "
    )
    return run(session, "python", "-c", preamble + code, env=env, silent=True)


def _aliases(session: nox.Session, env: dict[str, str | None]) -> tuple[str | None, str | None]:
    """The champion's and the deployed version's numbers (None: no such alias yet)."""
    aliases = ("champion", DEPLOYED)
    code = f"print(*(registry.get_alias_version(name, a) or '-' for a in {aliases!r}))"
    out = _registry(session, env, code).split()[-2:]
    champion, deployed = (None if v == "-" else v for v in out)
    return champion, deployed


def _set_deployed(session: nox.Session, env: dict[str, str | None], version: str) -> None:
    _registry(session, env, f"registry.set_alias(name, '{DEPLOYED}', '{version}')")


def _image_env(repository: str, version: str, digest: str = "") -> None:
    """build/image.env: the image shipped (its model-version tag), for the release step."""
    out = ROOT / "build" / "image.env"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"image={repository}", f"tag=model-v{version}", f"model_version={version}"]
    out.write_text("\n".join([*lines, *([f"digest={digest}"] if digest else [])]) + "\n")


@nox.session(name="ci-deploy", default=False)
def ci_deploy(session: nox.Session) -> None:
    """CI's delivery: when the champion changed, its image `IMAGE_REPOSITORY:model-v<N>`, pushed.

    Nothing to do (exit 0, said in one line) when there is no champion yet or its image was
    shipped already (the registry alias `deployed`); `-- --force` ships it again. Exit code 2:
    MLFLOW_TRACKING_URI or IMAGE_REPOSITORY unset.
    """
    _require_tracking_server()
    repository = os.environ.get("IMAGE_REPOSITORY", "").strip().lower()
    if not repository:
        _fail_closed("IMAGE_REPOSITORY is not set: the image's name in the container registry")
    (ROOT / "build" / "image.env").unlink(missing_ok=True)  # what this run ships, nothing older
    env = _serving_env(session)
    champion, deployed = _aliases(session, env)
    if champion is None:
        session.log("deploy: no champion yet (train first): nothing to deploy")
        return
    if champion == deployed and "--force" not in session.posargs:
        session.log(f"deploy: champion v{champion} is deployed already: nothing to do")
        return
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "deploy", "--version", champion,
        "--containerize", env=env)  # fmt: skip
    # deploy.py pushed <repository>:<Bento version> and wrote its digest: add the model's tag.
    built = dict(line.split("=", 1) for line in (ROOT / "build" / "image.env").read_text().split())
    image = f"{repository}:model-v{champion}"
    engine = next(e for e in ("docker", "podman") if shutil.which(e))
    session.run(engine, "tag", f"{built['image']}@{built['digest']}", image, external=True)
    session.run(engine, "push", image, external=True)
    _image_env(repository, champion, built["digest"])
    _set_deployed(session, env, champion)
    session.log(f"deploy: {image} (was {f'v{deployed}' if deployed else 'none'})")


@nox.session(name="ci-rollback", default=False)
def ci_rollback(session: nox.Session) -> None:
    """CI's rollback: the previous champion back, and its image (already built, never rebuilt)."""
    _require_tracking_server()
    repository = os.environ.get("IMAGE_REPOSITORY", "").strip().lower()
    if not repository:
        _fail_closed("IMAGE_REPOSITORY is not set: the image's name in the container registry")
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.registry.store", "rollback", env=env)
    champion, _ = _aliases(session, env)
    assert champion is not None  # rollback refuses when there is no previous champion
    _image_env(repository, champion)
    _set_deployed(session, env, champion)
    session.log(f"rollback: {repository}:model-v{champion} is the image to run again")


@nox.session(name="monitor-export", default=False)
def monitor_export(session: nox.Session) -> None:
    """The monitor's verdict as Prometheus metrics: printed, or `-- --push URL` (Pushgateway)."""
    env = project_env(session)
    run(session, "python", "-m", f"{PACKAGE}.monitoring.export", *session.posargs, env=env)


@nox.session(default=False)
def release(session: nox.Session) -> None:
    """Render deploy/k8s and apply it: -- --to staging|production [--version N] [--dry-run].

    Exits with release.py's own code: 2 bad input, 3 no cluster reachable (nothing applied).
    """
    _release(session, *session.posargs)


def _release(session: nox.Session, *args: str) -> None:
    env = {k: v for k, v in {**os.environ, **project_env(session)}.items() if v is not None}
    python = VENV / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    command = [str(python), "-m", f"{PACKAGE}.serving.release", *args]
    session.log(" ".join(["python", *command[1:]]))
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    if code:
        raise SystemExit(code)  # nox would make every failure exit code 1


@nox.session(name="ci-release", default=False)
def ci_release(session: nox.Session) -> None:
    """CI's release: the image this job shipped (build/image.env) to -- --to staging|production.

    Nothing to do (exit 0, said in one line) when the job shipped no image (the champion was
    deployed already). Otherwise `nox -s release` with that image and model version, and its
    exit codes: 3 when no cluster is reachable (KUBECONFIG), so the job fails and says so.
    """
    shipped = ROOT / "build" / "image.env"
    if not shipped.is_file():
        session.log("release: this job shipped no image (build/image.env): nothing to release")
        return
    fields = dict(line.split("=", 1) for line in shipped.read_text().split() if "=" in line)
    if not {"image", "model_version"} <= fields.keys():
        _fail_closed(f"{shipped.relative_to(ROOT)} names no image and model_version")
    _release(session, "--image", fields["image"], "--version", fields["model_version"],
             *session.posargs)  # fmt: skip


if __name__ == "__main__":
    nox.main()
