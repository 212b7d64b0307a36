"""End to end: the production canary's analysis, judged by a real Prometheus on real servers.

The trained project's champion is shipped (`nox -s deploy`) and served several times on loopback
(`nox -s serve`), each with a BentoML home of its own (two servers sharing one share, and clear,
their metrics files): a "stable" server, and in turn three canaries: a healthy one; one limited
to one request at a time (`traffic.max_concurrency`, a misconfiguration a release could bring),
which refuses the rest with 429; and one made slow by stopping and resuming its processes in
turn, as a container's CPU quota throttles it. A
Prometheus server from Debian's package, started here with a temporary config, scrapes them
every second, each target labelled with the pod-template hash and namespace Argo Rollouts and the
scrape config would give it. The AnalysisTemplate's queries and success conditions are read from
the rendered production overlay (the same text a cluster gets), their arguments substituted as
Argo Rollouts does, and evaluated against that Prometheus: the healthy canary passes every
metric, the failing ones fail theirs. The alert rules load into the same server, and every
panel query of the Grafana dashboard runs against it. `nox -s release` is run in its dry run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from e2e import Project, free_port, start_service
from helpers import NO_CLUSTER, system_tool

pytestmark = pytest.mark.e2e

NAMESPACE = "my-ml-project"
WINDOW = "20s"  # the analysis window here (production: 5m); scraped every 2 seconds
LOAD_S = 25  # seconds of traffic per phase, more than the window
MIN_REQUESTS = "50"
# Argo Rollouts' success conditions are expr-lang; these are the only forms analysis.yaml uses.
CONDITION = re.compile(r"^[\w\s\[\]().<>=!&|+-]+$")


@dataclass
class Server:
    name: str  # its pod-template hash label
    url: str
    proc: subprocess.Popen
    marker: str  # an environment variable value its processes (workers included) carry


def processes(marker: str) -> list[int]:
    """The live processes started with MARKER=marker (BentoML workers have their own sessions)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"RELEASE_TEST_MARKER={marker}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def served(project: Project, name: str, port: int, folder: Path, **env: str) -> Iterator[Server]:
    """``nox -s serve`` on ``port`` (Prometheus' config names it), stopped on exit; its BentoML
    home a copy of the project's in ``folder``: BentoML keeps a server's metrics files there
    and a server starting in the same home deletes them."""
    marker = uuid.uuid4().hex
    home = folder / f"bentoml-{name}"
    shutil.copytree(project.path / ".bentoml", home, ignore=shutil.ignore_patterns("prometheus_*"))
    env = {"BENTOML_HOME": str(home), "PREDICTION_LOG_DIR": str(folder / f"log-{name}"), **env}
    proc, url = start_service(project, port, RELEASE_TEST_MARKER=marker, **env)
    try:
        yield Server(name, url, proc, marker)
    finally:
        for pid in processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def throttled(server: Server, run_s: float = 0.02, stop_s: float = 0.25) -> Iterator[None]:
    """Stop and resume the server's processes in turn: what a container's CPU quota does. Each
    request may wait a whole stop (p99 >= 0.25 s), and a scrape still gets its answer within
    the scrape timeout (at 5 ms a turn, scrapes timed out on a busy machine: no samples)."""
    done = threading.Event()

    def cycle() -> None:
        pids = processes(server.marker)
        while not done.is_set():
            for sig, pause in ((signal.SIGSTOP, stop_s), (signal.SIGCONT, run_s)):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(pause)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for pid in processes(server.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def load(urls: list[str], body: bytes, seconds: float, clients: int = 3) -> dict[int, int]:
    """POST body to each URL from ``clients`` threads for ``seconds``; status counts."""
    deadline = time.monotonic() + seconds

    def client(url: str) -> dict[int, int]:
        counts: dict[int, int] = {}
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    answer.read()
                    status = answer.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 0
            counts[status] = counts.get(status, 0) + 1
        return counts

    totals: dict[int, int] = {}
    with ThreadPoolExecutor(len(urls) * clients) as pool:
        for counts in pool.map(client, [u for u in urls for _ in range(clients)]):
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
    return totals


def prometheus_config(targets: dict[str, int], rules: Path) -> str:
    static = [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "namespace": NAMESPACE,
                "rollouts_pod_template_hash": name,
                "app_kubernetes_io_component": "model-server",
            },
        }
        for name, port in targets.items()
    ]
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "1s", "scrape_timeout": "2s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "model-server", "static_configs": static}],
    }
    return yaml.safe_dump(config)


@contextlib.contextmanager
def prometheus(folder: Path, config: str) -> Iterator[str]:
    (folder / "prometheus.yml").write_text(config)
    port = free_port()
    command = [
        system_tool("prometheus"),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus never got ready"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer,
            ):
                if answer.status == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(url: str, promql: str) -> list[float]:
    """An instant query's values (a vector's samples, or a scalar), as Argo Rollouts reads them."""
    params = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    data = body["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data["result"]]


def substitute(text: str, args: dict[str, str]) -> str:
    """Argo Rollouts' {{args.NAME}} placeholders, filled in; an unknown one fails the test."""

    def value(match: re.Match) -> str:
        assert match.group(1) in args, f"no argument {match.group(1)}"
        return args[match.group(1)]

    return re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", value, text)


def succeeds(condition: str, result: list[float]) -> bool:
    """An expr-lang success condition of analysis.yaml on a measurement (Python's comparisons
    treat NaN as Go's do: every comparison with NaN is false)."""
    assert CONDITION.match(condition), f"condition outside the supported forms: {condition}"
    python = condition.replace("&&", " and ").replace("||", " or ")
    return bool(eval(python, {"__builtins__": {}}, {"result": result, "len": len}))


def analysis(project: Project) -> dict:
    proc = subprocess.run(
        [system_tool("kubectl"), "kustomize", "deploy/k8s/overlays/production"],
        cwd=project.path,
        capture_output=True,
        text=True,
        check=True,
    )
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (template,) = [d for d in docs if d["kind"] == "AnalysisTemplate"]
    return template


def judge(url: str, template: dict, **given: str) -> dict[str, tuple[list[float], bool]]:
    """Each metric of the AnalysisTemplate, measured once: (result, success)."""
    args = {a["name"]: a["value"] for a in template["spec"]["args"] if "value" in a}
    args |= {"namespace": NAMESPACE, "window": WINDOW, "min-requests": MIN_REQUESTS} | given
    verdicts = {}
    for metric in template["spec"]["metrics"]:
        promql = substitute(metric["provider"]["prometheus"]["query"], args)
        result = query(url, promql)
        verdicts[metric["name"]] = (
            result,
            succeeds(substitute(metric["successCondition"], args), result),
        )
    return verdicts


def settled(url: str, template: dict, **given: str) -> dict[str, tuple[list[float], bool]]:
    """``judge``, again each second (up to 10 s) while a metric has no samples yet: the last
    scrape of a phase may land after its traffic ends. Argo Rollouts' own measurements repeat
    on an interval in the same way."""
    deadline = time.monotonic() + 10
    while True:
        verdicts = judge(url, template, **given)
        if all(result for result, _ in verdicts.values()) or time.monotonic() > deadline:
            return verdicts
        time.sleep(1)


def passed(verdicts: dict[str, tuple[list[float], bool]]) -> dict[str, bool]:
    return {name: ok for name, (_, ok) in verdicts.items()}


@pytest.fixture(scope="module")
def shipped(trained: Project) -> Project:
    trained.nox("deploy")
    return trained


@pytest.fixture(scope="module")
def body(shipped: Project) -> bytes:
    frame = shipped.py(
        "-c",
        "from my_ml_project.data.prepare import load_frame; f, s = load_frame('test'); "
        "print(f[s.features].head(2).to_json(orient='records'))",
    ).stdout
    return json.dumps({"rows": json.loads(frame)}).encode()


def test_canary_analysis_against_prometheus(shipped: Project, body: bytes, tmp_path: Path) -> None:
    template = analysis(shipped)
    rules = tmp_path / "alerts.yml"
    rules.write_text((shipped.path / "deploy" / "prometheus" / "alerts.yml").read_text())
    ports = {name: free_port() for name in ("stable", "healthy", "erroring", "slow")}
    config = prometheus_config(ports, rules)
    with prometheus(tmp_path, config) as prom:
        with served(shipped, "stable", ports["stable"], tmp_path) as stable:
            # 1. A healthy canary: the same model, the same traffic.
            with served(shipped, "healthy", ports["healthy"], tmp_path) as canary:
                counts = load([stable.url, canary.url], body, LOAD_S)
                assert set(counts) == {200}, counts
                healthy = settled(
                    prom, template, **{"canary-hash": "healthy", "stable-hash": "stable"}
                )
                starved = judge(
                    prom,
                    template,
                    **{
                        "canary-hash": "healthy",
                        "stable-hash": "stable",
                        "min-requests": "1000000",
                    },
                )
                panels = dashboard_results(shipped, prom)
            assert all(passed(healthy).values()), healthy
            assert not passed(starved)["canary-requests"], starved  # too little traffic: fail
            # 2. A canary that takes one request at a time and refuses the others (429).
            one_at_a_time = 'services."my-ml-project".traffic.max_concurrency=1'
            with served(
                shipped,
                "erroring",
                ports["erroring"],
                tmp_path,
                BENTOML_CONFIG_OPTIONS=one_at_a_time,
            ) as canary:
                counts = load([stable.url, canary.url], body, LOAD_S)
                assert counts.get(429, 0) > 0, counts
                erroring = settled(
                    prom, template, **{"canary-hash": "erroring", "stable-hash": "stable"}
                )
            assert passed(erroring)["canary-requests"], erroring
            assert not passed(erroring)["error-rate-increase"], erroring
            # 3. A canary whose processes are stopped most of the time: slow answers.
            with served(shipped, "slow", ports["slow"], tmp_path) as canary, throttled(canary):
                load([stable.url, canary.url], body, LOAD_S)
                slow = settled(prom, template, **{"canary-hash": "slow", "stable-hash": "stable"})
            assert passed(slow)["canary-requests"], slow
            assert passed(slow)["error-rate-increase"], slow
            assert not passed(slow)["p99-latency-increase"], slow
        rules_state = rule_health(prom)
    assert len(rules_state) == 10, rules_state  # the ten alerts of alerts.yml, loaded
    assert set(rules_state.values()) == {"ok"}, rules_state
    # Every panel's query ran (query() fails on an error); those fed by the servers show data.
    fed = ("Requests by status", "Latency percentiles", "Model version", "Rows per model call",
           "Prediction log")  # fmt: skip
    for start in fed:
        (title,) = [t for t in panels if t.startswith(start)]
        assert panels[title], f"{title}: no data"


def dashboard_results(project: Project, prom: str) -> dict[str, bool]:
    """Panel title -> whether one of its queries returned a number (each must run)."""
    dashboard = json.loads((project.path / "deploy" / "grafana" / "dashboard.json").read_text())
    variables = {"$__rate_interval": WINDOW, "$namespace": NAMESPACE}
    results: dict[str, bool] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            promql = target["expr"]
            for key, value in variables.items():
                promql = promql.replace(key, value)
            values = query(prom, promql)
            real = [v for v in values if not math.isnan(v)]
            results[panel["title"]] = results.get(panel["title"], False) or bool(real)
    return results


def rule_health(prom: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10) as answer:
        groups = json.loads(answer.read())["data"]["groups"]
    return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}


def test_release_dry_run_through_nox(shipped: Project, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(NO_CLUSTER)
    env = {"KUBECONFIG": str(kubeconfig), "IMAGE_REPOSITORY": "ghcr.io/acme/my-ml-project"}
    champion = str(shipped.registry()["champion"])
    proc = shipped.nox("release", "--", "--to", "production", "--dry-run", **env)
    # Printed whole (after the environment's own output), and kept in build/release/.
    written = (shipped.path / "build" / "release" / "production.yaml").read_text()
    assert written in proc.stdout
    docs = [d for d in yaml.safe_load_all(written) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/acme/my-ml-project:model-v{champion}"  # what ci-deploy pushes
    assert "NOTHING applied" in proc.stderr
    assert {"Rollout", "AnalysisTemplate", "HTTPRoute"} <= {d["kind"] for d in docs}
    # Without --dry-run and without a cluster: nothing applied, exit code 3 through nox.
    applied = shipped.nox("release", "--", "--to", "staging", check=False, **env)
    assert applied.returncode == 3, applied.stderr[-2000:]
    assert "NOTHING applied" in applied.stderr


def test_ci_release_ships_what_the_deploy_job_shipped(shipped: Project, tmp_path: Path) -> None:
    """`nox -s ci-release`, as every provider's release job calls it after `ci-deploy`."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(NO_CLUSTER)
    env = {"KUBECONFIG": str(kubeconfig)}
    shipped_file = shipped.path / "build" / "image.env"
    shipped_file.unlink(missing_ok=True)
    # The deploy job shipped nothing (the champion was deployed already): nothing to release.
    idle = shipped.nox("ci-release", "--", "--to", "staging", **env)
    assert "shipped no image" in idle.stderr
    assert "kubectl" not in idle.stderr  # nothing rendered, nothing asked of a cluster

    # It shipped model v12 (build/image.env as ci-deploy writes it): that image, that version,
    # and without a cluster the job fails with the release's own code, nothing applied.
    shipped_file.parent.mkdir(parents=True, exist_ok=True)
    shipped_file.write_text("image=ghcr.io/acme/shipped\ntag=model-v12\nmodel_version=12\n")
    try:
        proc = shipped.nox("ci-release", "--", "--to", "production", check=False, **env)
    finally:
        shipped_file.unlink()
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "NOTHING applied" in proc.stderr
    written = (shipped.path / "build" / "release" / "production.yaml").read_text()
    assert written in proc.stdout  # printed whole, after the environment's own output
    docs = [d for d in yaml.safe_load_all(written) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    assert template["spec"]["containers"][0]["image"] == "ghcr.io/acme/shipped:model-v12"
    assert template["metadata"]["labels"]["app.kubernetes.io/version"] == "12"
    # A file that names no version is refused in one line (exit 2), nothing rendered.
    shipped_file.write_text("image=ghcr.io/acme/shipped\n")
    try:
        bad = shipped.nox("ci-release", "--", "--to", "production", check=False, **env)
    finally:
        shipped_file.unlink()
    assert bad.returncode == 2
    assert "names no image and model_version" in bad.stderr
