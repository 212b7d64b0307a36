"""The release files of a rendered project, checked with the real tools, no cluster needed.

deploy/k8s/ rendered by `kubectl kustomize` and validated offline: built-in kinds with
kubernetes-validate, the custom ones (Rollout, AnalysisTemplate, HTTPRoute) against their
published CRD schemas (tests/data/crds/); checkov on what the release would apply; the release's
dry run; deploy/prometheus/ with `promtool check rules` and `promtool test rules`; the Grafana
dashboard rebuilt from its builder, every panel query parsed by promtool.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import NO_CLUSTER, render, system_tool

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "crds"
K8S_VERSION = "1.32.0"  # the kubectl these tests run; kubernetes-validate's schemas of it
ENVIRONMENTS = ("staging", "production")
PACKAGE = "my_ml_project"
IMAGE = "ghcr.io/acme/my-ml-project"

# checkov findings accepted on the rendered manifests, each with its reason. The test fails on
# any other finding, and on a reason kept here for a check that no longer fails.
CHECKOV_ACCEPTED = {
    "CKV_K8S_43": "the image is pinned by its tag, the model version, which the release never "
    "moves; a digest is only known after the push (build/image.env), not when manifests render",
    "CKV_K8S_35": "the service reads its token from SERVICE_API_TOKEN (src/*/serving.py); the "
    "value comes from a Secret reference, never from a file in the repository",
    "CKV_K8S_40": "images built by `bentoml containerize` run as their bentoml user, uid 1034, "
    "which owns the Bento's files; another uid is not known to read them",
}


def _render(dst: Path, **answers: Any) -> Path:
    return render(dst, **answers)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _render(tmp_path_factory.mktemp("release") / "my-ml-project")


@pytest.fixture(scope="module")
def cuda_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _render(tmp_path_factory.mktemp("release-cuda") / "my-ml-project", accelerator="cuda")


def kustomize(folder: Path) -> list[dict]:
    proc = subprocess.run(
        [system_tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def overlay(project: Path, env: str) -> list[dict]:
    return kustomize(project / "deploy" / "k8s" / "overlays" / env)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- validation ------------------------------------------------------------------------------


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of each vendored CRD version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


CRD_SCHEMAS = crd_schemas()


def unknown_fields(value: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server would silently drop them (pruning)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get(
        "x-kubernetes-int-or-string"
    ):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        sub = schema["additionalProperties"]
        return [
            f for key, item in value.items() for f in unknown_fields(item, sub, f"{path}.{key}")
        ]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        sub = schema["items"]
        return [
            f for i, item in enumerate(value) for f in unknown_fields(item, sub, f"{path}[{i}]")
        ]
    return []


def validation_errors(doc: dict) -> list[str]:
    """What is wrong with one object: [] when the cluster would accept it as written."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{name}: {exc.message} at {'.'.join(map(str, exc.path))}"]
        return []
    errors = [
        f"{name}: {e.message} at {'.'.join(map(str, e.absolute_path))}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    return errors + [f"{name}: unknown field {f}" for f in unknown_fields(body, schema)]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_overlay_renders_and_validates(project: Path, env: str) -> None:
    docs = overlay(project, env)
    assert [e for doc in docs for e in validation_errors(doc)] == []
    kinds = {doc["kind"] for doc in docs}
    base = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert base | {"NetworkPolicy", "ServiceAccount"} <= kinds
    if env == "production":
        assert {"Rollout", "AnalysisTemplate", "HTTPRoute", "PersistentVolumeClaim"} <= kinds
    namespaces = {doc["metadata"].get("namespace") for doc in docs}
    assert namespaces == {"my-ml-project-staging" if env == "staging" else "my-ml-project"}


def test_validation_refuses_broken_objects(project: Path) -> None:
    """The checks above can fail: a typo in a CRD field, a bad type, a missing built-in field."""
    docs = overlay(project, "production")
    rollout = one(docs, "Rollout")
    typo = {**rollout, "spec": {**rollout["spec"], "strategy": {"canary": {"setps": []}}}}
    assert any("unknown field .spec.strategy.canary.setps" in e for e in validation_errors(typo))
    route = one(docs, "HTTPRoute")
    weights = json.loads(json.dumps(route).replace('"weight": 0', '"weight": "none"'))
    assert validation_errors(weights)
    deployment = one(docs, "Deployment")
    broken = json.loads(json.dumps(deployment))
    del broken["spec"]["template"]["spec"]["containers"]
    assert validation_errors(broken)


# --- what the pods get -----------------------------------------------------------------------


def pod_template(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "model-server")["spec"]["template"]


def service_timeout(project: Path) -> float:
    """traffic.timeout of the @bentoml.service decorator in serving/service.py (the drain bound)."""
    source = project / "src" / PACKAGE / "serving" / "service.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "traffic":
            return ast.literal_eval(node.value)["timeout"]
    raise AssertionError("no traffic= in service.py's @bentoml.service")


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_pods_are_hardened_probed_and_drained(project: Path, env: str) -> None:
    docs = overlay(project, env)
    template = pod_template(docs)
    spec = template["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # The drain fits the grace period: the preStop pause, then the requests in flight.
    grace = spec["terminationGracePeriodSeconds"]
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace <= 30
    assert pause + service_timeout(project) < grace
    # Writable places are volumes, the prediction log among them.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env_vars = {e["name"]: e for e in container["env"]}
    log_volume = volumes[mounts[env_vars["PREDICTION_LOG_DIR"]["value"]]]
    assert ("persistentVolumeClaim" if env == "production" else "emptyDir") in log_volume
    if env == "production":  # one folder per pod on the shared claim
        (log_mount,) = [m for m in container["volumeMounts"] if m["name"] == log_volume["name"]]
        assert log_mount["subPathExpr"] == "$(POD_NAME)"
        assert env_vars["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Secrets by reference only: no value in any file, no Secret object rendered.
    for name, var in env_vars.items():
        if re.search("TOKEN|SECRET|PASSWORD|KEY", name):
            assert "value" not in var, name
            assert "secretKeyRef" in var["valueFrom"], name
    assert "Secret" not in {doc["kind"] for doc in docs}
    # No GPU unless the accelerator answer asks for one.
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "tolerations" not in spec


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_selectors_reach_the_pods(project: Path, env: str) -> None:
    docs = overlay(project, env)
    labels = pod_template(docs)["metadata"]["labels"]
    services = [d for d in docs if d["kind"] == "Service"]
    selectors = [s["spec"]["selector"] for s in services] + [
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector, selector
        assert selector.items() <= labels.items(), selector
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert one(docs, target["kind"], target["name"])


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_cuda_answer_asks_for_a_gpu(cuda_project: Path, env: str) -> None:
    docs = overlay(cuda_project, env)
    spec = pod_template(docs)["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert [e for doc in docs for e in validation_errors(doc)] == []


def duration_s(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([smh])", text).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def test_production_is_a_canary_judged_by_prometheus(project: Path) -> None:
    docs = overlay(project, "production")
    rollout = one(docs, "Rollout", "model-server")
    canary = rollout["spec"]["strategy"]["canary"]
    steps = canary["steps"]
    assert [s["setWeight"] for s in steps if "setWeight" in s] == [10, 50, 100]
    # An analysis after each partial weight, after a pause at least as long as its window.
    template = one(docs, "AnalysisTemplate")
    window = duration_s(next(a["value"] for a in template["spec"]["args"] if a["name"] == "window"))
    needed = {a["name"] for a in template["spec"]["args"] if "value" not in a}
    for weight in (10, 50):
        i = steps.index({"setWeight": weight})
        assert duration_s(steps[i + 1]["pause"]["duration"]) >= window
        analysis = steps[i + 2]["analysis"]
        assert [t["templateName"] for t in analysis["templates"]] == [template["metadata"]["name"]]
        assert {a["name"] for a in analysis["args"]} == needed
    metrics = {m["name"] for m in template["spec"]["metrics"]}
    assert metrics == {"canary-requests", "error-rate-increase", "p99-latency-increase"}
    # Traffic: the HTTPRoute's two backends are the Rollout's stable and canary Services.
    route = one(
        docs,
        "HTTPRoute",
        canary["trafficRouting"]["plugins"]["argoproj-labs/gatewayAPI"]["httpRoute"],
    )
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {canary["stableService"]: 100, canary["canaryService"]: 0}
    for name in backends:
        assert one(docs, "Service", name)
    # The pod template is the Deployment's (which runs no pods); the autoscaler scales the Rollout.
    ref = rollout["spec"]["workloadRef"]
    assert one(docs, ref["kind"], ref["name"])["spec"]["replicas"] == 0
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Rollout", "model-server")


def test_release_target_none_leaves_the_manifests_out(tmp_path: Path) -> None:
    project = _render(tmp_path / "p", release_target="none")
    assert not (project / "deploy" / "k8s").exists()
    assert not (project / "src" / PACKAGE / "serving" / "release.py").exists()
    tree = ast.parse((project / "noxfile.py").read_text(encoding="utf-8"))
    sessions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "release" not in sessions
    assert "monitor_export" in sessions
    assert (project / "deploy" / "prometheus" / "alerts.yml").is_file()
    readme = (project / "README.md").read_text(encoding="utf-8")
    assert "nox -s release" not in readme


# --- the release's dry run ---------------------------------------------------------------------


def release(project: Path, *args: str, kubeconfig: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m <package>.serving.release ARGS`` in the project; kubectl finds no cluster."""
    environ = {**os.environ, "PYTHONPATH": str(project / "src"), "KUBECONFIG": str(kubeconfig)}
    environ.pop("IMAGE_REPOSITORY", None)
    system_tool("kubectl")
    return subprocess.run(
        [sys.executable, "-m", f"{PACKAGE}.serving.release", *args],
        cwd=project,
        env={**environ, **env},
        capture_output=True,
        text=True,
    )


@pytest.fixture
def no_cluster(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(NO_CLUSTER)
    return path


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_release_dry_run_shows_what_it_would_apply(
    project: Path, no_cluster: Path, env: str
) -> None:
    args = ("--to", env, "--version", "7", "--image", IMAGE, "--dry-run")
    proc = release(project, *args, kubeconfig=no_cluster)
    assert proc.returncode == 0, proc.stderr
    assert "no Kubernetes cluster reachable" in proc.stderr
    assert "NOTHING applied" in proc.stderr
    shown = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    written = project / "build" / "release" / f"{env}.yaml"
    assert shown == [doc for doc in yaml.safe_load_all(written.read_text()) if doc]
    # The overlay, with the image and the version set, and nothing else changed.
    plain = overlay(project, env)
    assert [(d["kind"], d["metadata"]["name"]) for d in shown] == [
        (d["kind"], d["metadata"]["name"]) for d in plain
    ]
    template = pod_template(shown)
    assert template["spec"]["containers"][0]["image"] == f"{IMAGE}:model-v7"
    assert template["metadata"]["labels"]["app.kubernetes.io/version"] == "7"
    assert [e for doc in shown for e in validation_errors(doc)] == []


def test_release_without_cluster_applies_nothing_and_says_so(
    project: Path, no_cluster: Path
) -> None:
    proc = release(
        project, "--to", "staging", "--version", "7", kubeconfig=no_cluster, IMAGE_REPOSITORY=IMAGE
    )
    assert proc.returncode == 3, proc.stderr
    assert "NOTHING applied" in proc.stderr
    assert (
        pod_template([d for d in yaml.safe_load_all(proc.stdout) if d])["spec"]["containers"][0][
            "image"
        ]
        == f"{IMAGE}:model-v7"
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--to", "staging", "--version", "7"), "no image repository"),
        (("--to", "staging", "--version", "7 beta", "--image", IMAGE), "not a valid image tag"),
        (("--to", "staging", "--version", "7", "--image", "GHCR.io/Acme"), "is not valid"),
    ],
)
def test_release_refuses_bad_input_in_one_line(
    project: Path, no_cluster: Path, args: tuple[str, ...], said: str
) -> None:
    proc = release(project, *args, kubeconfig=no_cluster)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert said in proc.stderr
    assert "Traceback" not in proc.stderr


def test_release_refuses_an_unknown_environment(project: Path, no_cluster: Path) -> None:
    proc = release(
        project, "--to", "prod", "--version", "7", "--image", IMAGE, kubeconfig=no_cluster
    )
    assert proc.returncode == 2
    assert "invalid choice: 'prod'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- security scan -----------------------------------------------------------------------------


def checkov_spec() -> str:
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    (spec,) = groups["scan"]
    return spec


def test_checkov_finds_nothing_unaccepted(project: Path, no_cluster: Path, tmp_path: Path) -> None:
    from uv import find_uv_bin

    scanned = tmp_path / "scanned"
    scanned.mkdir()
    for env in ENVIRONMENTS:
        args = ("--to", env, "--version", "7", "--image", IMAGE, "--dry-run")
        proc = release(project, *args, kubeconfig=no_cluster)
        (scanned / f"{env}.yaml").write_text(proc.stdout)
    command = [find_uv_bin(), "tool", "run", "--from", checkov_spec(), "checkov"]
    command += [
        "--framework",
        "kubernetes",
        "-d",
        str(scanned),
        "--quiet",
        "--compact",
        "-o",
        "json",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    results = report if isinstance(report, list) else [report]
    assert sum(r["summary"]["parsing_errors"] for r in results) == 0
    assert sum(r["summary"]["passed"] for r in results) > 100
    failed = {
        (c["check_id"], c["resource"]) for r in results for c in r["results"]["failed_checks"]
    }
    assert {check for check, _ in failed} - CHECKOV_ACCEPTED.keys() == set(), sorted(failed)
    # Every accepted finding is still one: a reason kept for nothing would hide the next one.
    assert {check for check, _ in failed} == CHECKOV_ACCEPTED.keys()


# --- Prometheus rules --------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True)


def test_alert_rules_check_and_pass_their_tests(project: Path) -> None:
    folder = project / "deploy" / "prometheus"
    checked = promtool("check", "rules", "alerts.yml", cwd=folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml", cwd=folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load((folder / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((folder / "alerts.test.yml").read_text())["tests"]
    firing = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    assert firing == alerts  # every alert is seen firing in a test
    wanted = {"ModelServerDown", "ModelServerErrorRate", "ModelServerLatencyP99",
              "PredictionLogDropping", "PredictionLogWriteErrors", "NoPredictionsLogged",
              "ModelDrift", "ModelDegraded"}  # fmt: skip
    assert wanted <= alerts


def test_each_alert_test_fails_without_its_alert(project: Path, tmp_path: Path) -> None:
    """The unit tests test something: with one alert taken out, `promtool test rules` fails."""
    folder = project / "deploy" / "prometheus"
    rules = yaml.safe_load((folder / "alerts.yml").read_text())
    (tmp_path / "alerts.test.yml").write_text((folder / "alerts.test.yml").read_text())
    for group in rules["groups"]:
        for rule in list(group["rules"]):
            group["rules"].remove(rule)
            (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
            proc = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
            assert proc.returncode != 0, f"the tests pass without {rule['alert']}"
            group["rules"].append(rule)


# --- Grafana -------------------------------------------------------------------------------------

# Grafana's variables, as a query would be sent for one namespace.
VARIABLES = {"$__rate_interval": "1m", "$namespace": "my-ml-project"}


def dashboard_queries(dashboard: dict) -> dict[str, list[str]]:
    """Panel title -> its PromQL, Grafana's variables substituted."""
    queries: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.setdefault(panel["title"], []).append(expr)
    return queries


def test_dashboard_is_built_by_its_builder_and_every_query_parses(
    project: Path, tmp_path: Path
) -> None:
    folder = project / "deploy" / "grafana"
    built = subprocess.run(
        [sys.executable, "dashboard.py"], cwd=folder, capture_output=True, text=True, check=True
    )
    committed = json.loads((folder / "dashboard.json").read_text())
    assert json.loads(built.stdout) == committed, "dashboard.json is stale: rebuild it"
    queries = dashboard_queries(committed)
    titles = " ".join(queries).lower()
    for topic in (
        "requests",
        "latency",
        "errors",
        "rows per model call",
        "dropped",
        "version",
        "monitor",
    ):
        assert topic in titles, topic
    # promtool parses PromQL when it checks rules: each query becomes a recording rule.
    rules = [
        {"record": f"panel:query:{i}", "expr": q}
        for i, q in enumerate(q for qs in queries.values() for q in qs)
    ]
    (tmp_path / "panels.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]})
    )
    proc = promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = [{"record": "panel:broken", "expr": "sum(rate(x[1m])"}]
    (tmp_path / "broken.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "b", "rules": broken}]})
    )
    assert promtool("check", "rules", "broken.yml", cwd=tmp_path).returncode != 0
