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
import subprocess
import sys
from pathlib import Path

import nox

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
    run(session, "dvc", "repro", *session.posargs, env=env)
    _show_metrics(session)


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
    run(session, "dvc", "repro", "--force", "--single-item", "evaluate", env=env)


@nox.session(name="mlflow-ui", default=False)
def mlflow_ui(session: nox.Session) -> None:
    """Start the MLflow UI for the project's tracking store on http://127.0.0.1:5000."""
    env = project_env(session)
    store = f"{PACKAGE}.registry.store"
    uri = run(session, "python", "-m", store, "uri", env=env, silent=True).strip()
    port = session.posargs[0] if session.posargs else "5000"
    # Through the environment, not the command line nox prints: the URI may hold credentials.
    env = {**env, "MLFLOW_BACKEND_STORE_URI": uri}
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
    """Serve the latest Bento on 127.0.0.1:3000 (`-- --port P --host H`; `--reload`: the source)."""
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "serve", *session.posargs, env=env)


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
    run(session, "dvc", "repro", env=env)
    _show_metrics(session)


@nox.session(default=False)
def rollback(session: nox.Session) -> None:
    """Move `champion` back to the previous champion, then ship it as `deploy` does."""
    env = _serving_env(session)
    run(session, "python", "-m", f"{PACKAGE}.registry.store", "rollback", env=env)
    run(session, "python", "-m", f"{PACKAGE}.serving.deploy", "deploy", env=env)
    session.log("restart the service (`nox -s serve`) to serve the rolled-back model")


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


if __name__ == "__main__":
    nox.main()
