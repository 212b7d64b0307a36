"""Ship a registered model as a Bento (``nox -s deploy``), and serve it (``nox -s serve``).

``deploy [--version N | --alias A] [--containerize]``: import the version (default: the
``champion``) into BentoML's model store, with the registry name and version, the MLflow run id,
the git commit, the data hashes and the test metrics as metadata (with ``serve.shadow: true`` in
params.yaml, the ``challenger`` too, as the shadow model); build the Bento (the service's modules
only; Python packages from uv.lock, never locked again at build time); start it on a free
loopback port, check its answers on the test split against the model's own; write a CycloneDX
SBOM of the Python packages it ships (``build/sbom/<bento>-<version>.cdx.json``); print the
Bento tag. A version already imported and a Bento of the same sources are reused: nothing is
rebuilt.

``serve [--host H] [--port P] [--reload]``: the latest Bento in the foreground (``--reload``:
the service from the source tree, restarted on edits).

``example [--rows N]``: write a ready ``/predict`` body, the first N rows of the test split, to
``build/request.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from ..core import layout
from ..core.config import ProjectError, cli_errors, load_params
from ..core.paths import (
    DEPLOYMENT_FILE,
    EXAMPLE_REQUEST,
    IMAGE_ENV_FILE,
    MODEL_NAME,
    PACKAGE,
    PREDICTION_LOG_ENV,
    SBOM_DIR,
    WEIGHTS,
    module,
)
from ..core.paths import SOURCE_DIR as SRC
from .contract import ServeSettings, torch_backend
from .predlog import log_folder

SERVICE = f"{module('serving.service')}:Predictor"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{}"
GRACE_S = 25
CUDA_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"


class DeployError(ProjectError):
    """The model cannot be shipped or served (the message says why and what to do)."""


def import_model(name: str, selector: dict[str, str]) -> Any:
    """The BentoML model of a registry version (imported now unless it is there already)."""
    import bentoml

    from ..model.network import save_model
    from ..registry import store as registry

    registry.configure(load_params().mlflow)
    version = selector.get("version") or registry.get_alias_version(name, selector["alias"])
    if version is None:
        raise DeployError(f"no version of '{name}' has alias '{selector['alias']}': train first")
    details = registry.version_details(name, version)
    for model in _listed(bentoml.models.list):
        meta = model.info.metadata
        same = (meta.get("registry_version"), meta.get("run_id")) == (version, details["run_id"])
        if same and "test_metrics" in meta:  # imported before test metrics were kept: again
            return model
    model = registry.load_version(name, version)
    tags = details["tags"]
    metadata = {
        "registry_name": name,
        "registry_version": version,
        "run_id": details["run_id"],
        "git_commit": tags.get("git.commit", "unknown"),
        "data_version": {k: v for k, v in tags.items() if k.startswith("data.")},
        "test_metrics": details["test_metrics"],
        "config": model.config(),
    }
    with bentoml.models.create(MODEL_NAME, metadata=metadata, labels={"stage": "served"}) as bm:
        save_model(model, bm.path_of(WEIGHTS))
    return bentoml.models.get(bm.tag)


def shadow_model(name: str, served: Any) -> Any:
    """The challenger, imported, to score in the shadow of ``served`` (None: no challenger)."""
    from ..registry import store as registry

    version = registry.get_alias_version(name, registry.CHALLENGER)
    if version is None or version == served.info.metadata["registry_version"]:
        print("shadow scoring: no challenger to shadow (serve.shadow is on)")
        return None
    print(f"shadow scoring: challenger v{version} scores beside the served model")
    return import_model(name, {"version": version})


def _listed(lister: Any) -> list[Any]:
    """The models or Bentos named after the project ([] when none: BentoML raises)."""
    import bentoml

    try:
        return lister(MODEL_NAME)
    except bentoml.exceptions.NotFound:
        return []


# How the image's installer (uv) must read the requirements: from every index, the best match
# (its default takes a package from the first index listing it: PyTorch's lists numpy, jinja2...).
INSTALLER_ENV = {"UV_INDEX_STRATEGY": "unsafe-best-match"}
# The platform a Bento's image runs on, for the lock's environment markers.
IMAGE_PLATFORM = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def _requirements(folder: Path) -> Path:
    """requirements.txt of the serving closure: the packages the service's modules import and
    what they need, at uv.lock's versions (no resolution); torch pinned to the accelerator's
    build (``2.9.1+cpu``), from its index."""
    locked = serving_closure()
    lines = [f"{name}=={version}" for name, version in sorted(locked.items()) if name != "torch"]
    path = folder / "bento-requirements.txt"
    text = "\n".join([f"--extra-index-url {_torch_index()}", *lines, f"torch=={_torch_pin()}"])
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def serving_closure(lock_file: Path | None = None) -> dict[str, str]:
    """{package: version} of uv.lock that the service needs: the distributions of the modules it
    imports (:func:`layout.external_imports`), then their dependencies (and the extras asked
    for), those whose markers hold on the image's platform. torch's own dependencies are left
    to its index (the accelerator's build has its own)."""
    from importlib.metadata import packages_distributions

    from packaging.markers import Marker

    lock = tomllib.loads((lock_file or SRC.parent / "uv.lock").read_text(encoding="utf-8"))
    entries: dict[str, list[dict[str, Any]]] = {}
    for package in lock["package"]:
        entries.setdefault(_normal(package["name"]), []).append(package)
    owners = packages_distributions()
    todo: list[tuple[str, tuple[str, ...], str | None]] = [
        (_normal(dist), (), None)
        for module in layout.external_imports("serving.service")
        for dist in owners.get(module, [module])
    ]
    python = {"python_version": _python(), "python_full_version": f"{_python()}.0"}
    platform = {**IMAGE_PLATFORM, **python, "platform_machine": os.uname().machine}
    chosen: dict[str, tuple[dict[str, Any], set[str]]] = {}
    while todo:
        name, extras, version = todo.pop()
        candidates = [e for e in entries.get(name, []) if version in (None, e["version"])]
        # A package locked at several versions (a fork by Python version): the image's.
        forks = [e for e in candidates if _holds(e.get("resolution-markers"), platform)]
        if not candidates:
            continue
        entry = (forks or candidates)[0]
        new = name not in chosen
        _, seen = chosen.setdefault(name, (entry, set()))
        wanted = set(extras) - seen
        seen |= wanted
        deps = list(entry.get("dependencies", [])) if new and name != "torch" else []
        for extra in sorted(wanted):
            deps += entry.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            if "marker" not in dep or Marker(dep["marker"]).evaluate(platform):
                todo.append((_normal(dep["name"]), tuple(dep.get("extra", ())), dep.get("version")))
    return {name: entry["version"] for name, (entry, _) in chosen.items() if "version" in entry}


def _holds(markers: list[str] | None, platform: dict[str, str]) -> bool:
    """Whether any of a lock entry's resolution markers holds on ``platform`` (none: it does)."""
    from packaging.markers import Marker

    return not markers or any(Marker(marker).evaluate(platform) for marker in markers)


def _torch_version() -> str:
    """The installed torch's release (2.9.1 of 2.9.1+cpu): what the Bento pins."""
    return subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _torch_index() -> str:
    """The PyTorch wheel index of the accelerator's build (CUDA, else CPU)."""
    backend = torch_backend()
    return PYTORCH_INDEX.format(backend if backend.startswith("cu") else "cpu")


def _torch_pin() -> str:
    """The torch release with the accelerator's build as its local version (``2.9.1+cpu``):
    only that build's index has it, so no installer can take another index's torch."""
    backend = torch_backend()
    build = backend if backend.startswith("cu") else "cpu"
    return f"{_torch_version()}+{build}"


def _export(*args: str) -> str:
    """``uv export`` of uv.lock's runtime packages (no resolution, no dev group)."""
    command = ["uv", "export", "--frozen", "--no-dev", "--no-emit-project", *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:  # an old uv without the CycloneDX format, a missing lock
        said = [line for line in proc.stderr.splitlines() if line.strip()] or ["?"]
        raise DeployError(f"{' '.join(command[:2])} failed: {said[-1]}")
    return proc.stdout


def write_sbom(bento: Any, folder: Path = SBOM_DIR) -> Path:
    """A CycloneDX 1.5 SBOM of the Python packages the Bento ships, from uv.lock.

    uv's export of the lock, kept to what the Bento's requirements pin: the serving closure,
    and torch at the version pinned, with the build and index it comes from (PyPI's files and
    hashes for torch are not what ships). The packages torch brings from that index when the
    image is built are not pinned by the lock, so not listed: scan the image for those.
    """
    preview = ("--preview-features", "sbom-export", "--format", "cyclonedx1.5")
    bom = json.loads(_export(*preview, "--extra", "torch"))
    pinned = set(serving_closure()) | {"torch"}
    kept = [c for c in bom["components"] if _normal(c["name"]) in pinned]
    refs = {c["bom-ref"] for c in kept} | {bom["metadata"]["component"]["bom-ref"]}
    for component in kept:
        if component["name"] == "torch":
            version = _torch_version()
            component |= {"version": version, "purl": f"pkg:pypi/torch@{version}"}
            component["externalReferences"] = [{"type": "distribution", "url": _torch_index()}]
            component["properties"] = [{"name": "torch:backend", "value": torch_backend()}]
    bom["components"] = kept
    bom["dependencies"] = [
        {**d, "dependsOn": [r for r in d.get("dependsOn", []) if r in refs]}
        for d in bom["dependencies"]
        if d["ref"] in refs
    ]
    bom["metadata"]["properties"] = [{"name": "bentoml:bento", "value": str(bento.tag)}]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bento.tag.name}-{bento.tag.version}.cdx.json"
    path.write_text(json.dumps(bom, indent=2) + "\n", encoding="utf-8")
    return path


def _source_hash(models: dict[str, str | None]) -> str:
    digest = hashlib.sha256(json.dumps(models, sort_keys=True).encode())
    digest.update(torch_backend().encode())
    for path in [*layout.source_files("serving.service"), SRC.parent / "uv.lock"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_bento(model: Any, shadow: Any = None) -> Any:
    """The Bento of the service with ``model`` (and the ``shadow`` model, scored beside it);
    an existing one when nothing changed."""
    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema  # what build() takes

    models = {"model": str(model.tag), "shadow": str(shadow.tag) if shadow else None}
    source = _source_hash(models)
    for bento in _listed(bentoml.bentos.list):
        if bento.info.labels.get("source") == source:
            return bento
    cuda = torch_backend().startswith("cu")
    docker: dict[str, Any] = {"env": {"TORCH_BACKEND": torch_backend(), **INSTALLER_ENV}}
    docker |= {"base_image": CUDA_IMAGE} if cuda else {"python_version": _python()}
    # BentoML reads these files only inside build_ctx: written there for the build, then removed.
    requirements = _requirements(SRC)
    deployment = SRC / PACKAGE / "serving" / DEPLOYMENT_FILE
    deployment.write_text(json.dumps(models, indent=2) + "\n", encoding="utf-8")
    try:
        return bentoml.bentos.build(
            SERVICE,
            name=MODEL_NAME,
            labels={
                "source": source,
                "model_version": str(model.info.metadata["registry_version"]),
                **{k: v for k, v in models.items() if v},
            },
            build_ctx=str(SRC),
            include=_included(deployment),
            python={"requirements_txt": requirements.name, "lock_packages": False},
            docker=docker,
            # Set before the image installs the requirements (and in the running image).
            envs=[BentoEnvSchema(name=k, value=v, stage="build") for k, v in INSTALLER_ENV.items()],
            models=[tag for tag in models.values() if tag],
        )
    finally:
        requirements.unlink()
        deployment.unlink()


def _included(*extra: Path) -> list[str]:
    """What the Bento holds of the project, relative to ``src/``: the subpackages the service
    imports (derived from its imports, never listed by hand), and ``extra``."""
    files = [*layout.source_files("serving.service"), *(p.resolve() for p in extra)]
    package = layout.ROOT.parent
    return [path.relative_to(package).as_posix() for path in files]


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Seconds until ``/readyz`` answers 200; DeployError when the server exits or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise DeployError(f"the service exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"the service was not ready after {timeout:.0f} s")


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """POST JSON; (status, parsed body, headers) whatever the status."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = {"error": text.decode(errors="replace")}
        return exc.code, parsed, dict(exc.headers)


def smoke_test(tag: str) -> None:
    """Serve the Bento on a free loopback port; its answers on the test split must be the
    model's own (labels equal, probabilities within 1e-5)."""
    import bentoml

    from ..data.prepare import load_frame
    from ..model.network import load_model, predict_frame

    frame, schema = load_frame("test")
    rows = json.loads(frame[schema.features].to_json(orient="records"))
    stored = bentoml.models.get(bentoml.get(tag).info.labels["model"])
    model = load_model(stored.path_of(WEIGHTS))
    expected = predict_frame(model, frame[schema.features])
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="smoke-log-") as logs:
        env = {**os.environ, PREDICTION_LOG_ENV: logs, "SERVICE_API_TOKEN": ""}
        proc = subprocess.Popen(
            ["bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}", proc)
            status, body, _ = post(f"http://127.0.0.1:{port}/predict", {"rows": rows})
        finally:
            stop(proc)
    if status != 200:
        raise DeployError(f"smoke test: /predict answered {status}: {body}")
    _compare(body["predictions"], expected, model.class_names)
    print(f"smoke test: {len(rows)} test rows answered as the model does (ready in {ready:.1f} s)")


def _compare(answers: list[dict], expected: Any, classes: list[str]) -> None:
    labels = [a["label"] for a in answers]
    if labels != expected["label"].tolist():
        raise DeployError("smoke test: the service's labels differ from the model's")
    for answer, (_, row) in zip(answers, expected.iterrows(), strict=True):
        if any(abs(answer["probabilities"][c] - row[c]) > 1e-5 for c in classes):
            raise DeployError("smoke test: the service's probabilities differ from the model's")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the server's process group; SIGKILL if it lingers; then its workers.

    BentoML starts each worker in a session of its own, so a signal to the group does not
    reach them: they stop when the arbiter stops them, and any left (the arbiter killed or
    crashed) are found as its descendants, recorded before, and stopped here.
    """
    import psutil  # a BentoML dependency

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.terminate()
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for worker in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def containerize(tag: str) -> None:
    """``bentoml containerize``, where a container engine answers.

    With IMAGE_REPOSITORY set (CI: the provider's registry), the image is named
    ``<repository>:<Bento version>`` and pushed there.
    """
    engine = next((e for e in ("docker", "podman") if shutil.which(e)), None)
    if engine is None or subprocess.run([engine, "info"], capture_output=True).returncode != 0:
        raise DeployError("no container engine (docker or podman) is running here: image not built")
    repository = os.environ.get("IMAGE_REPOSITORY", "").strip().lower()  # registries want lowercase
    named = ["--image-tag", f"{repository}:{tag.partition(':')[2]}"] if repository else []
    subprocess.run(["bentoml", "containerize", tag, "--backend", engine, *named], check=True)
    if repository:
        push_image(engine, named[1])


def push_image(engine: str, image: str) -> None:
    """Push ``image``; write its repository and digest to build/image.env (CI attests them)."""
    subprocess.run([engine, "push", image], check=True)
    inspect = [engine, "image", "inspect", "--format", "{{index .RepoDigests 0}}", image]
    pinned = subprocess.run(inspect, check=True, capture_output=True, text=True).stdout.strip()
    repository, _, digest = pinned.partition("@")
    out = IMAGE_ENV_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"image={repository}\ndigest={digest}\n", encoding="utf-8")
    print(f"pushed: {repository}@{digest}")


def champion_bento(name: str) -> str:
    """The newest Bento that serves the registry's current champion: what `serve` runs, so a
    rollback or a promotion reaches the service at its next start, never "the latest built"."""
    import bentoml

    from ..registry import store as registry

    registry.configure(load_params().mlflow)
    try:
        champion = registry.get_alias_version(name, registry.CHAMPION)
    except Exception as exc:  # the store is down: serving some other model would be a guess
        raise DeployError(
            f"the registry cannot say which version is champion ({type(exc).__name__}): check "
            "MLFLOW_TRACKING_URI, or serve a given Bento with `nox -s serve -- --bento TAG`"
        ) from None
    if champion is None:
        raise DeployError(f"'{name}' has no champion yet: train first (`nox -s train`)")
    bentos = sorted(_listed(bentoml.bentos.list), key=lambda b: b.info.creation_time, reverse=True)
    for bento in bentos:
        if _served_version(bento) == champion:
            return str(bento.tag)
    raise DeployError(f"no Bento of champion v{champion} yet: run `nox -s deploy` first")


def _served_version(bento: Any) -> str | None:
    """The registry version a Bento serves (its label; else its model's metadata)."""
    import bentoml

    if version := bento.info.labels.get("model_version"):
        return str(version)
    try:
        model = bentoml.models.get(bento.info.labels["model"])
    except (KeyError, bentoml.exceptions.NotFound):
        return None
    return str(model.info.metadata.get("registry_version"))


def serve(host: str, port: int, reload: bool, bento: str | None = None) -> None:
    """Replace this process with ``bentoml serve`` (signals reach it directly: no orphans);
    DeployError, before anything starts, for a non-loopback ``host`` with no token."""
    refused = ServeSettings.from_env().exposure_error(host)
    if refused:
        raise DeployError(refused)
    if reload:
        target = [SERVICE, "--working-dir", str(SRC), "--reload"]
    else:
        tag = bento or champion_bento(load_params().mlflow.model_name)
        print(f"serving {tag}")
        target = [tag]
    # Resolved here: bentoml serve runs the service from the Bento's folder.
    os.environ[PREDICTION_LOG_ENV] = str(log_folder().resolve())
    os.environ["SERVE_BIND_HOST"] = host  # a Host header naming the address is accepted
    # SIGTERM: requests in flight get this long to finish (Kubernetes waits 30 s, then kills).
    grace = ["--timeout-graceful-shutdown", str(GRACE_S)]
    command = ["bentoml", "serve", *target, "--host", host, "--port", str(port), *grace]
    os.execvp(command[0], command)


def example_request(rows: int) -> dict[str, Any]:
    """A ready ``/predict`` body: the test split's first ``rows`` rows, as JSON carries them."""
    from ..data.prepare import load_frame

    frame, schema = load_frame("test")
    return {"rows": json.loads(frame[schema.features].head(rows).to_json(orient="records"))}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ship = sub.add_parser("deploy", help="import, build, smoke-test; print the Bento tag")
    which = ship.add_mutually_exclusive_group()
    which.add_argument("--version", help="registry version (default: the alias)")
    which.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    ship.add_argument("--containerize", action="store_true", help="also build the image")
    run = sub.add_parser("serve", help="serve the champion's Bento in the foreground")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=3000)
    run.add_argument("--reload", action="store_true", help="serve the source tree, reload on edits")
    run.add_argument("--bento", help="serve this Bento tag instead of the champion's")
    show = sub.add_parser("example", help=f"write a /predict body to {EXAMPLE_REQUEST}")
    show.add_argument("--rows", type=int, default=1, help="rows of the test split (default: 1)")
    args = parser.parse_args(argv)
    if args.command == "example":
        EXAMPLE_REQUEST.parent.mkdir(parents=True, exist_ok=True)
        EXAMPLE_REQUEST.write_text(json.dumps(example_request(args.rows), indent=2) + "\n")
        print(f"request: {EXAMPLE_REQUEST} ({args.rows} rows of the test split)")
        return 0
    if args.command == "serve":
        serve(args.host, args.port, args.reload, args.bento)
        return 0
    selector = {"version": args.version} if args.version else {"alias": args.alias}
    params = load_params()
    name = params.mlflow.model_name
    model = import_model(name, selector)
    shadow = shadow_model(name, model) if params.serve.shadow else None
    bento = build_bento(model, shadow)
    smoke_test(str(bento.tag))
    # Before the image: the SBOM is there even where no container engine is.
    print(f"sbom: {write_sbom(bento)}")
    if args.containerize:
        containerize(str(bento.tag))
    print(f"bento: {bento.tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
