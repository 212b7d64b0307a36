"""Release the served model to Kubernetes (``nox -s release -- --to staging|production``).

Renders ``deploy/k8s/overlays/<env>`` with kustomize (``kubectl kustomize``), the image set to
``<IMAGE_REPOSITORY>:model-v<N>`` (the tag ``nox -s ci-deploy`` pushes for model version N) and
the pods labelled ``app.kubernetes.io/version: <N>``, writes it to
``build/release/<env>.yaml``, and applies it with ``kubectl apply --server-side``. Staging is a
plain rolling update; production is an Argo Rollouts canary that Prometheus judges
(``deploy/k8s/overlays/production/analysis.yaml``).

``--version N``: the model version (image tag ``model-vN``); default: the registry's ``champion``.
``--image REPO``: the image repository; default: ``$IMAGE_REPOSITORY`` (as ``nox -s deploy
-- --containerize`` uses it). ``--dry-run``: show what would be applied, apply nothing (with a
cluster reachable, the API server checks it too: ``--dry-run=server``).

Exit codes: 0 applied (or, with ``--dry-run``, shown); 1 ``kubectl apply`` failed; 2 bad input
(unknown environment, no image repository, a tag kustomize cannot render, no kubectl);
3 no cluster reachable: the manifests were shown, NOTHING was applied.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..core.config import ProjectError, cli_errors
from ..core.paths import BUILD_DIR

ENVIRONMENTS = ("staging", "production")
OVERLAYS = Path("deploy/k8s/overlays")
OUT = BUILD_DIR / "release"
IMAGE = "model-server"  # the image name in deploy/k8s/base/deployment.yaml
FIELD_MANAGER = "release"  # who owns the applied fields (kubectl apply --server-side)
NO_CLUSTER = 3
# Docker's rules for a tag and (lowercase) for a repository, so that kustomize never renders
# an image reference the cluster would refuse.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")  # a label's value
REPOSITORY = re.compile(
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
)


class ReleaseError(ProjectError):
    """The release cannot go ahead (the message says why)."""


def kubectl() -> str:
    """The kubectl program (kustomize is built in since 1.14; 1.27+ has kustomize 5)."""
    path = shutil.which("kubectl")
    if path is None:
        raise ReleaseError(
            "kubectl is not on PATH: install it (https://kubernetes.io/docs/tasks/tools/)"
        )
    return path


def image_tag(version: str) -> str:
    """The image tag of model version ``version``: what ``nox -s ci-deploy`` pushes."""
    return f"model-v{version}"


def kustomization(env: str, repository: str, version: str) -> str:
    """A kustomization over the environment's overlay: the image and the version label set."""
    overlay = Path("..", "..", "..", OVERLAYS, env).as_posix()  # from build/release/<env>/
    return (
        "# Written by `nox -s release`: what was rendered for this release.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{overlay}]\n"
        f"images: [{{name: {IMAGE}, newName: {repository}, newTag: '{image_tag(version)}'}}]\n"
        "labels:\n"
        f"  - pairs: {{app.kubernetes.io/version: '{version}'}}\n"
        "    includeTemplates: true\n"
    )


def render(root: Path, env: str, repository: str, version: str) -> str:
    """The manifests of ``env``, as kustomize renders them for this image and version."""
    if env not in ENVIRONMENTS:
        raise ReleaseError(f"unknown environment {env!r}: expected {' or '.join(ENVIRONMENTS)}")
    if not (root / OVERLAYS / env / "kustomization.yaml").is_file():
        raise ReleaseError(f"no {OVERLAYS.as_posix()}/{env}/kustomization.yaml in {root}")
    if not REPOSITORY.fullmatch(repository):
        raise ReleaseError(
            f"image repository {repository!r} is not valid (lowercase, e.g. ghcr.io/org/name)"
        )
    if not TAG.fullmatch(image_tag(version)) or not LABEL.fullmatch(version):
        raise ReleaseError(f"model version {version!r} is not a valid image tag")
    folder = root / OUT / env
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(kustomization(env, repository, version), "utf-8")
    proc = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if line.strip()] or ["?"]
        raise ReleaseError(f"kubectl kustomize {folder}: {said[-1]}")
    return proc.stdout


def cluster_reachable(timeout_s: int = 10) -> bool:
    """Whether kubectl's current context answers (its API server's version)."""
    command = [kubectl(), "version", "--output=json", f"--request-timeout={timeout_s}s"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 5)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and '"serverVersion"' in proc.stdout


def apply(manifests: str, dry_run: bool) -> int:
    """``kubectl apply --server-side`` of the manifests; kubectl's exit code."""
    command = [kubectl(), "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"]
    if dry_run:
        command.append("--dry-run=server")
    return subprocess.run(command, input=manifests, text=True).returncode


def champion_version() -> str:
    """The registry's champion version (what `nox -s deploy` ships by default)."""
    from ..core.config import load_params
    from ..registry import store as registry

    params = load_params().mlflow
    registry.configure(params)
    version = registry.get_alias_version(params.model_name, registry.CHAMPION)
    if version is None:
        raise ReleaseError(
            f"no champion of '{params.model_name}' in the registry: train first, or pass --version"
        )
    return version


def summary(manifests: str) -> list[str]:
    """One line per object: kind/name."""
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s release --", description=__doc__.split("\n")[0])
    parser.add_argument("--to", required=True, choices=ENVIRONMENTS, help="the environment")
    parser.add_argument("--version", help="model version = image tag (default: the champion)")
    parser.add_argument("--image", help="image repository (default: $IMAGE_REPOSITORY)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be applied")
    args = parser.parse_args(argv)
    repository = (args.image or os.environ.get("IMAGE_REPOSITORY", "")).strip()
    if not repository:
        raise ReleaseError("no image repository: pass --image REPO or set IMAGE_REPOSITORY")
    version = args.version or champion_version()
    manifests = render(Path.cwd(), args.to, repository, version)
    out = OUT / f"{args.to}.yaml"
    out.write_text(manifests, encoding="utf-8")
    image = f"{repository}:{image_tag(version)}"
    objects = summary(manifests)
    print(f"release: {args.to}, image {image}, {len(objects)} objects ({out})", file=sys.stderr)
    if not cluster_reachable():
        sys.stdout.write(manifests)
        print(
            f"release: no Kubernetes cluster reachable (kubectl's current context): NOTHING "
            f"applied; above is what `kubectl apply --server-side` would apply ({out})",
            file=sys.stderr,
        )
        return 0 if args.dry_run else NO_CLUSTER
    if args.dry_run:
        sys.stdout.write(manifests)
    code = apply(manifests, args.dry_run)
    if code != 0:
        print(f"release: kubectl apply failed (exit {code}): see above", file=sys.stderr)
        return 1
    done = "checked by the API server (dry run), not applied" if args.dry_run else "applied"
    print(f"release: {args.to} {done}: {', '.join(objects)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
