"""End to end, on the trained project: what git sees, where secrets go, and that DVC's remote
gives back the data and the model bit for bit."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e import SECRET_MARKER, Project

pytestmark = pytest.mark.e2e


def committable(project: Project) -> set[str]:
    """What a user commits after a run: dvc.lock and the outputs dvc.yaml keeps out of DVC's
    cache (`cache: false`: small metrics, plots, schema), which are git's to version."""
    stages = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]
    paths = {"dvc.lock"}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                if isinstance(out, dict):
                    ((path, options),) = out.items()
                    if options.get("cache") is False:
                        paths.add(path)
    return paths


# Run state that must never reach git, with a file of each kind written before looking.
NEVER = {
    ".env": "SERVICE_API_TOKEN=x\n",
    ".env.production": "AWS_SECRET_ACCESS_KEY=x\n",
    "deploy-key.pem": "-----BEGIN PRIVATE KEY-----\n",
    "logs/predictions/date=2026-01-01/part-0.jsonl": "{}\n",
    "reports/monitoring/latest/result.json": "{}\n",
    ".mypy_cache/CACHEDIR.TAG": "x\n",
}


def _status(project: Project) -> list[str]:
    out = project.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    return sorted(line[3:] for line in out.splitlines())


def test_git_sees_only_what_a_user_should_commit(trained: Project) -> None:
    written = [trained.path / rel for rel in NEVER]
    try:
        for path, text in zip(written, NEVER.values(), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        changed = _status(trained)
    finally:
        for path in written:
            path.unlink()
    # Beside them, the .gitignore files DVC writes next to the outputs it caches.
    # And params.yaml, the user's own file: earlier tests of this shared project edit it.
    allowed = committable(trained) | {"params.yaml"}
    unexpected = [p for p in changed if p not in allowed and Path(p).name != ".gitignore"]
    assert not unexpected, f"git would offer to commit run state: {unexpected}"
    assert "dvc.lock" in changed  # the run really changed what it should
    # The run's own state exists, and git ignores it (the loop above saw none of it).
    for state in ("mlflow.db", "mlartifacts", "models", "data/processed/train.parquet"):
        assert (trained.path / state).exists(), state


def test_dvc_ignores_the_run_state(trained: Project) -> None:
    paths = [".venv", ".nox", "mlartifacts", "logs", ".bentoml", "mlruns", ".mypy_cache"]
    made = [trained.path / p for p in paths if not (trained.path / p).exists()]
    try:
        for folder in made:  # the patterns name folders: DVC matches them only as such
            folder.mkdir()
        dvc = str(trained.venv / "bin" / "dvc")
        out = trained.run(dvc, "check-ignore", *paths, check=False).stdout.split()
    finally:
        for folder in made:
            folder.rmdir()
    assert sorted(out) == sorted(paths)


def test_fake_secrets_reach_no_file_log_or_mlflow_record(trained: Project) -> None:
    marker = SECRET_MARKER.encode()
    leaks = [
        str(path.relative_to(trained.path))
        for path in trained.path.rglob("*")
        if path.is_file() and marker in path.read_bytes()
    ]
    assert not leaks
    assert trained.train_log  # the run's output was captured
    assert SECRET_MARKER not in trained.train_log
    # MLflow, through its API: every run's params and tags, every registered version's tags.
    dump = trained.py("-c", MLFLOW_DUMP, f"sqlite:///{trained.path / 'mlflow.db'}").stdout
    records = json.loads(dump)
    assert records["runs"] >= 1
    assert records["params"] > 10  # the run's params were really read
    assert SECRET_MARKER not in dump


MLFLOW_DUMP = """
import json, sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
versions = client.search_model_versions()
print(json.dumps({
    "runs": len(runs),
    "params": sum(len(r.data.params) for r in runs),
    "data": [[r.data.params, r.data.tags] for r in runs],
    "versions": [v.tags for v in versions],
}))
"""


def _digests(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        for path in sorted([root / rel] if (root / rel).is_file() else (root / rel).rglob("*")):
            if path.is_file() and path.name != ".gitignore":
                out[path.relative_to(root).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return out


def test_push_then_pull_in_a_fresh_clone_restores_data_and_model(trained, tmp_path) -> None:
    # A copy: committing the run must not change the shared project. The remote
    # (../my-ml-project-dvc-storage) is a sibling folder, shared by the copy and the clone.
    work = Project(tmp_path / "my-ml-project", trained.venv)
    shutil.copytree(trained.path, work.path, symlinks=True)
    work.run("git", "add", "-A")
    work.run("git", "commit", "-qm", "pipeline results")
    stages = yaml.safe_load((work.path / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s["outs"]]
    # DVC deletes a stage's outputs before running it: raw data must never be one.
    assert not [o for o in outs if o.startswith("data/raw")]
    restored = ["data/raw", "data/processed", "models"]
    before = _digests(work.path, restored)
    assert any(p.startswith("models/") for p in before)
    assert any(p.startswith("data/raw/") for p in before)
    raw_md5 = yaml.safe_load((work.path / "data/raw/breast_cancer.csv.dvc").read_text())["outs"]
    raw = (work.path / "data/raw/breast_cancer.csv").read_bytes()
    assert hashlib.md5(raw).hexdigest() == raw_md5[0]["md5"]  # the run left it untouched

    work.nox("push")
    # A sibling of the copy: the remote's relative path (from .dvc/) names the same folder.
    clone = Project(tmp_path / "my-ml-project-clone", trained.venv)
    subprocess.run(["git", "clone", "-q", str(work.path), str(clone.path)], check=True)
    missing = set(before) - set(_digests(clone.path, restored))
    assert any(p.startswith("models/") for p in missing)  # the cached files: DVC's, not git's
    assert any(p.startswith("data/raw/") for p in missing)
    clone.nox("pull")
    assert _digests(clone.path, restored) == before
