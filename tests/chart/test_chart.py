"""Tests of the Helm chart in chart/: rendered with Helm's own engine (helm-python-sdk), linted in
strict mode, validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), and
checked for what the objects mean."""

from __future__ import annotations

import copy
import functools
import math
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions, latest_version

import render

CHART_DIR = render.CHART_DIR
P = "nvidia-installer.gardenlinux.io"
CHART = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())

# Values files under test: the chart's defaults, the original system's two values files, and variants.
# "defaults": the chart's defaults plus what every release must set (the chart refuses to render
# without it: test_a_release_without_driver_or_bucket_does_not_render).
REQUIRED = Path(__file__).resolve().parent / "required-values.yaml"
CASES: dict[str, list[Path]] = {"defaults": [REQUIRED]}
CASES.update({path.stem: [path] for path in sorted((CHART_DIR / "ci").glob("*.yaml"))})
SEED_COMPILER = "seed-compiler-values"
SEED_INSTALLER = "seed-installer-values"

# Kubernetes versions: the oldest the chart claims (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships.
_claimed = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)-0", CHART["kubeVersion"])
assert _claimed, f"kubeVersion {CHART['kubeVersion']!r} is not of the form '>=X.Y.Z-0'"
OLDEST = _claimed.group(1)
NEWEST = latest_version()
KUBE_VERSIONS = [OLDEST, NEWEST]

# Custom resources kubernetes-validate has no schema for; these kinds, and only these, are not
# validated against a Kubernetes schema.
NOT_VALIDATED = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
# Custom resources validated against their CRD's schema instead: the prometheus-operator's, vendored
# in crds/ (test_monitoring.py).
CRD_VALIDATED = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

# Containers that run as root on purpose, without any capability: `modulus` writes the build output
# to a root-owned host directory.
ROOT_WITHOUT_CAPABILITIES = {"modulus"}


# --- helpers ---------------------------------------------------------------------------------------

@functools.cache
def _render_case(case: str, namespace: str, kube_version: str | None = None) -> tuple[list[dict[str, Any]], str]:
    templates = render.render_templates(render.user_values(CASES[case]), namespace=namespace,
                                        kube_version=kube_version)
    return render.objects(templates), render.notes(templates)


def objects(case: str, namespace: str = render.NAMESPACE, kube_version: str | None = None) -> list[dict[str, Any]]:
    """The case's objects; rendered for kube_version ("1.28.0") as `helm template --kube-version`
    does, or for Helm's default version."""
    version = None if kube_version is None else f"v{kube_version}"
    return copy.deepcopy(_render_case(case, namespace, version)[0])


def values(case: str) -> dict[str, Any]:
    """The values the release uses: chart defaults coalesced with the case's files."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(render.user_values(CASES[case]))


def mode(v: dict[str, Any]) -> str:
    return "compiler" if v["forceCompile"] else "installer"


def component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def find(objs: list[dict[str, Any]], kind: str, comp: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (comp is None or component(o) == comp)]


def one(objs: list[dict[str, Any]], kind: str, comp: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, comp)
    assert len(found) == 1, f"expected one {kind} of component {comp}, found {len(found)}"
    return found[0]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("DaemonSet", "Deployment")]


def containers(workload: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = workload["spec"]["template"]["spec"]
    for section in ("initContainers", "containers"):
        for container in spec.get(section, []):
            yield section, container


def container(workload: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    for sec, c in containers(workload):
        if sec == section and c["name"] == name:
            return c
    raise AssertionError(f"no {section} container {name} in {workload['metadata']['name']}")


def flags(args: list[str]) -> dict[str, str | bool]:
    """--key=value -> {"--key": "value"}, --switch -> {"--switch": True}; positional args are skipped."""
    parsed: dict[str, str | bool] = {}
    for arg in args:
        if arg.startswith("--"):
            key, sep, value = arg.partition("=")
            parsed[key] = value if sep else True
    return parsed


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels AND all matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and key in labels and labels[key] in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# The device plugin leaves a node while its driver is switched (upgrade.enabled): every required
# node selector term of its affinity carries this requirement (test_upgrade.py).
SWITCHING = {"key": f"{P}/upgrade-state", "operator": "NotIn", "values": ["unloading", "installing", "validating"]}


def without_switching(affinity: dict[str, Any]) -> dict[str, Any]:
    """The affinity without the SWITCHING requirement (as nvidiaInstaller.nodeAffinity gave it)."""
    affinity = copy.deepcopy(affinity)
    required = affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    for term in required.get("nodeSelectorTerms", []):
        term["matchExpressions"] = [e for e in term.get("matchExpressions", []) if e != SWITCHING]
        if not term["matchExpressions"]:
            del term["matchExpressions"]
    return affinity


def namespace_labels(name: str, inject: str | None) -> dict[str, str]:
    labels = {"kubernetes.io/metadata.name": name}
    if inject is not None:
        labels[f"{P}/inject"] = inject
    return labels


def installer_cases() -> list[str]:
    return [c for c in CASES if mode(values(c)) == "installer"]


def webhook_cases() -> list[str]:
    return [c for c in installer_cases() if values(c)["webhook"]["enabled"]]


# --- Helm: render and lint --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_renders(case: str) -> None:
    objs = objects(case)
    assert objs, "nothing rendered"
    for obj in objs:
        assert obj["metadata"]["name"]
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                           "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
            continue
        # `helm test`'s own namespace, and the test's right to create pods there (test_selftest.py).
        if obj["kind"] == "Namespace":
            assert component(obj) == "selftest" and "namespace" not in obj["metadata"]
            continue
        if obj["kind"] in ("Role", "RoleBinding") and component(obj) == "selftest":
            assert obj["metadata"]["namespace"] == one(objs, "Namespace", "selftest")["metadata"]["name"]
            continue
        # The one exception: the installer's right to record Events about Nodes, which live in `default`.
        node_events = obj["kind"] in ("Role", "RoleBinding") and obj["metadata"]["name"].endswith("-node-events")
        assert obj["metadata"]["namespace"] == ("default" if node_events else render.NAMESPACE)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "two objects with the same kind and name"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str, kube_version: str) -> None:
    report = helm.lint(CHART_DIR, render.user_values(CASES[case]), strict=True,
                       namespace=render.NAMESPACE, kube_version=f"v{kube_version}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_lint_reports_a_typo() -> None:
    report = helm.lint(CHART_DIR, {"webhook": {"failurPolicy": "Ignore"}}, strict=True)
    assert any("failurPolicy" in error for error in report["errors"])


# --- Kubernetes schemas -------------------------------------------------------------------------------

def test_validated_versions_have_bundled_schemas() -> None:
    bundled = set(all_versions())
    assert OLDEST in bundled, f"kubernetes-validate has no schemas for the claimed minimum {OLDEST}"
    assert NEWEST in bundled
    assert tuple(map(int, OLDEST.split("."))) < tuple(map(int, NEWEST.split(".")))


def test_strict_validation_rejects_unknown_fields() -> None:
    service = one(objects("defaults"), "Service", "webhook")
    service["spec"]["ports"][0]["targetPorts"] = "https"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, NEWEST, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_objects_match_kubernetes_schemas(case: str, kube_version: str) -> None:
    # Rendered for that version: objects of APIs it lacks (the node guard's before 1.30) are left out.
    validated = 0
    for obj in objects(case, kube_version=kube_version):
        if (obj["apiVersion"], obj["kind"]) in NOT_VALIDATED | CRD_VALIDATED:
            continue
        try:
            used = kubernetes_validate.validate(obj, kube_version, strict=True)
        except SchemaNotFoundError as error:
            pytest.fail(error.message)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {list(error.path)}: {error.message}")
        assert used == re.sub(r"^(\d+\.\d+).*", r"\1", kube_version)
        validated += 1
    assert validated > 0


def test_only_cert_manager_objects_are_skipped() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for case in CASES for o in objects(case)}
    assert NOT_VALIDATED <= kinds, "a skipped kind is no longer rendered; drop it from NOT_VALIDATED"
    assert all(api.startswith("cert-manager.io/") for api, _ in NOT_VALIDATED)


# --- privileges and security ---------------------------------------------------------------------------

def expected_privileged(v: dict[str, Any]) -> set[tuple[str, str, str]]:
    if mode(v) == "compiler":
        return {("compiler", "containers", "dev")}
    section = "containers" if v["debug"] else "initContainers"
    expected = {("installer", section, "install")}
    if v["devicePlugin"]["enabled"]:
        # NVML opens the GPU device nodes; NVIDIA's chart runs it privileged with device specs too.
        expected.add(("device-plugin", "containers", "device-plugin"))
    return expected


@pytest.mark.parametrize("case", CASES)
def test_privileged_containers_are_exactly_the_expected_ones(case: str) -> None:
    privileged = {
        (component(w), section, c["name"])
        for w in workloads(objects(case))
        for section, c in containers(w)
        if c.get("securityContext", {}).get("privileged")
    }
    assert privileged == expected_privileged(values(case))


@pytest.mark.parametrize("case", ["defaults", SEED_INSTALLER, "allow-compilation-values"])
def test_installer_privileged_step_is_the_init_container_only(case: str) -> None:
    daemonset = one(objects(case), "DaemonSet", "installer")
    install = container(daemonset, "initContainers", "install")
    assert install["securityContext"]["privileged"] is True
    assert install["args"][0] == "install"
    main = daemonset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in main] == ["status"]
    status = main[0]
    assert status["args"][:2] == ["status", "--watch"]
    assert not status["securityContext"].get("privileged")
    # status sees the driver directory and the loaded module's version, read-only, not the host's root.
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    mounted = {volumes[m["name"]]["hostPath"]["path"]: (m["mountPath"], m.get("readOnly"))
               for m in status["volumeMounts"]}
    assert mounted == {
        "/opt/nvidia-installer": ("/host/opt/nvidia-installer", True),
        "/sys/module": ("/host/sys/module", True),
    }


@pytest.mark.parametrize("case", CASES)
def test_unprivileged_containers_are_locked_down(case: str) -> None:
    for workload in workloads(objects(case)):
        pod = workload["spec"]["template"]["spec"]
        pod_seccomp = pod.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for section, c in containers(workload):
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                continue
            where = f"{workload['metadata']['name']}/{section}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert (sc.get("seccompProfile", {}).get("type") or pod_seccomp) == "RuntimeDefault", where
            if c["name"] in ROOT_WITHOUT_CAPABILITIES:
                assert sc.get("runAsUser") == 0, where
            else:
                assert sc.get("runAsNonRoot") is True, where
                assert sc.get("runAsUser", 0) != 0, where
            for mount in c.get("volumeMounts", []):
                volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                if "hostPath" in volume and volume["hostPath"]["path"] != render_compile_out(case):
                    assert mount.get("readOnly") is True, f"{where} mounts {volume['hostPath']['path']} writable"


def render_compile_out(case: str) -> str | None:
    v = values(case)
    return v["compiler"]["outHostPath"] if mode(v) == "compiler" else None


@pytest.mark.parametrize("case", CASES)
def test_node_pods_run_system_node_critical(case: str) -> None:
    objs = objects(case)
    for daemonset in find(objs, "DaemonSet"):
        assert daemonset["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"
    for deployment in find(objs, "Deployment"):
        assert deployment["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"


@pytest.mark.parametrize("case", CASES)
def test_service_accounts_hold_only_what_they_need(case: str) -> None:
    objs = objects(case)
    v = values(case)
    cluster_roles = {r["metadata"]["name"]: r["rules"] for r in find(objs, "ClusterRole")}
    roles = {r["metadata"]["name"]: r["rules"] for r in find(objs, "Role")}
    if mode(v) == "compiler":
        assert cluster_roles == {} and roles == {}
        compiler = one(objs, "DaemonSet", "compiler")
        assert compiler["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        return
    installer = one(objs, "ClusterRole", "installer")
    # With live upgrades it also reads its own Node's upgrade order (test_upgrade.py).
    assert installer["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}] + (
        [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}] if v["upgrade"]["enabled"] else [])
    # Events about Nodes go to `default`, and only there.
    [events] = [r for r in find(objs, "Role") if component(r) == "installer"]
    assert events["metadata"]["namespace"] == "default"
    assert events["rules"] == [{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    [events_binding] = [b for b in find(objs, "RoleBinding") if component(b) == "installer"]
    assert events_binding["metadata"]["namespace"] == "default"
    assert events_binding["roleRef"]["name"] == events["metadata"]["name"]
    assert events_binding["subjects"] == [{"kind": "ServiceAccount", "name": installer_sa(objs),
                                           "namespace": render.NAMESPACE}]
    # Only the install step holds the API token.
    daemonset = one(objs, "DaemonSet", "installer")
    assert daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert token_holders(daemonset) == {"install"}
    for plugin in find(objs, "DaemonSet", "device-plugin"):
        assert plugin["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    if not v["webhook"]["enabled"]:
        return
    webhook_roles = [r for r in find(objs, "Role") + find(objs, "ClusterRole") if component(r) == "webhook"]
    deployment = one(objs, "Deployment", "webhook")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    if v["webhook"]["certManager"]["enabled"]:
        assert webhook_roles == []
        assert token_holders(deployment) == set()
        return
    # The serving container, which faces the network, holds no token; the certs container does.
    assert token_holders(deployment) == {"certs"}
    secret = pod["volumes"][0]["secret"]["secretName"]
    mwc = one(objs, "MutatingWebhookConfiguration")["metadata"]["name"]
    role = one(objs, "Role", "webhook")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    cluster_role = one(objs, "ClusterRole", "webhook")
    assert cluster_role["rules"] == [
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": [mwc], "verbs": ["get", "patch"]},
    ]
    for binding in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        subjects = binding["subjects"]
        assert len(subjects) == 1 and subjects[0]["kind"] == "ServiceAccount"


def token_holders(workload: dict[str, Any]) -> set[str]:
    """Names of the containers that mount the service account token where the API clients look."""
    return {c["name"] for _, c in containers(workload)
            for m in c.get("volumeMounts", [])
            if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"}


def installer_sa(objs: list[dict[str, Any]]) -> str:
    return one(objs, "DaemonSet", "installer")["spec"]["template"]["spec"]["serviceAccountName"]


def seconds(duration: str) -> float:
    """A Go/humantime-style duration (1m30s, 1.5s, 500ms) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    terms = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)", duration)
    assert "".join(n + u for n, u in terms) == duration, duration
    return sum(float(n) * units[u] for n, u in terms)


# --- the webhook ------------------------------------------------------------------------------------

@pytest.mark.parametrize("namespace", ["kube-system", "gpu-system"])
@pytest.mark.parametrize("case", ["defaults", SEED_INSTALLER, "webhook-failure-ignore-values",
                                  "webhook-cert-manager-values"])
def test_webhook_never_matches_kube_system(case: str, namespace: str) -> None:
    mwc = one(objects(case, namespace), "MutatingWebhookConfiguration")
    [hook] = mwc["webhooks"]
    selector = hook["namespaceSelector"]
    never = ["kube-system", namespace, *values(case)["webhook"]["excludedNamespaces"]]
    for name in never:
        assert not selector_matches(selector, namespace_labels(name, "enabled")), name
        assert not selector_matches(selector, namespace_labels(name, None)), name
    assert selector_matches(selector, namespace_labels("team-a", "enabled"))
    assert not selector_matches(selector, namespace_labels("team-a", None))
    assert not selector_matches(selector, namespace_labels("team-a", "disabled"))


@pytest.mark.parametrize("case", webhook_cases())
def test_webhook_configuration(case: str) -> None:
    v = values(case)
    objs = objects(case)
    [hook] = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"},
                             {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
                              "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"}]
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == v["webhook"]["failurePolicy"]
    assert hook["timeoutSeconds"] == v["webhook"]["timeoutSeconds"]
    assert hook["admissionReviewVersions"] == ["v1"]
    service = one(objs, "Service", "webhook")
    assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": render.NAMESPACE,
                                               "path": "/mutate", "port": 443}
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    deployment = one(objs, "Deployment", "webhook")
    serve = container(deployment, "containers", "webhook")
    assert {"name": "https", "containerPort": 8443, "protocol": "TCP"} in serve["ports"]
    # Pods labelled inject=false never reach the webhook; others do.
    assert not selector_matches(hook["objectSelector"], {f"{P}/inject": "false"})
    assert selector_matches(hook["objectSelector"], {})
    # The annotation opt-out and the GPU-pod filter are CEL match conditions.
    conditions = {c["name"]: c["expression"] for c in hook["matchConditions"]}
    assert f"object.metadata.annotations['{P}/inject'] != 'false'" in conditions["not-opted-out"]
    gpu = conditions["gpu-pod-or-opted-in"]
    assert f"object.metadata.annotations['{P}/inject'] == 'true'" in gpu
    assert "object.spec.initContainers" in gpu
    for resource in v["injection"]["gpuResources"]:
        term = f"r.startsWith('{resource[:-1]}')" if resource.endswith("*") else f"r == '{resource}'"
        assert term in gpu


@pytest.mark.parametrize("case", webhook_cases())
def test_injection_settings_agree_with_the_daemonsets(case: str) -> None:
    v = values(case)
    objs = objects(case)
    serve = container(one(objs, "Deployment", "webhook"), "containers", "webhook")
    assert serve["args"][0] == "serve"
    webhook = flags(serve["args"])
    assert webhook["--listen"] == "0.0.0.0:8443"
    assert (webhook["--tls-cert"], webhook["--tls-key"]) == ("/tls/tls.crt", "/tls/tls.key")

    installer = one(objs, "DaemonSet", "installer")
    status = container(installer, "containers", "status")
    assert webhook["--installer-image"] == status["image"]
    assert webhook["--image-pull-policy"] == status["imagePullPolicy"]
    assert webhook["--mount-path"] == v["injection"]["mountPath"]
    assert webhook["--gpu-resources"] == ",".join(v["injection"]["gpuResources"])
    assert webhook["--set-library-path"] == str(v["injection"]["setLibraryPath"]).lower()
    assert webhook["--wait-timeout"] == v["injection"]["waitTimeout"]
    # The installer writes the driver root under its host root.
    assert flags(status["args"])["--host-root"] == "/host"
    host_root = next(vol for vol in installer["spec"]["template"]["spec"]["volumes"] if vol["name"] == "host-root")
    assert host_root["hostPath"]["path"] == "/"
    assert webhook["--driver-root"] == "/opt/nvidia-installer"

    if v["devicePlugin"]["enabled"]:
        plugin = one(objs, "DaemonSet", "device-plugin")
        wait = container(plugin, "initContainers", "wait")
        assert wait["args"][0] == "wait"
        assert wait["image"] == webhook["--installer-image"]
        assert wait["imagePullPolicy"] == webhook["--image-pull-policy"]
        assert flags(wait["args"])["--timeout"] == webhook["--wait-timeout"] == v["injection"]["waitTimeout"]
        assert flags(wait["args"])["--driver-root"] == webhook["--driver-root"]
        driver_root = next(vol for vol in plugin["spec"]["template"]["spec"]["volumes"]
                           if vol["name"] == "driver-root")
        assert driver_root["hostPath"]["path"] == webhook["--driver-root"]
        mount = next(m for m in wait["volumeMounts"] if m["name"] == "driver-root")
        assert mount["mountPath"] == flags(wait["args"])["--host-root"] + webhook["--driver-root"]


@pytest.mark.parametrize("case", webhook_cases())
def test_webhook_deployment_is_highly_available_and_secure(case: str) -> None:
    v = values(case)
    objs = objects(case)
    deployment = one(objs, "Deployment", "webhook")
    spec = deployment["spec"]
    assert spec["replicas"] == v["webhook"]["replicas"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    spread = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in spread
    for constraint in pod["topologySpreadConstraints"]:
        assert selector_matches(constraint["labelSelector"], spec["template"]["metadata"]["labels"])
    pdbs = find(objs, "PodDisruptionBudget", "webhook")
    if v["webhook"]["replicas"] > 1:
        [pdb] = pdbs
        assert pdb["spec"]["minAvailable"] == 1
        assert selector_matches(pdb["spec"]["selector"], spec["template"]["metadata"]["labels"])
    else:
        assert pdbs == []
    serve = container(deployment, "containers", "webhook")
    webhook = flags(serve["args"])
    assert webhook["--shutdown-delay"] == v["webhook"]["shutdownDelay"]
    assert webhook["--drain-timeout"] == v["webhook"]["drainTimeout"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > seconds(webhook["--shutdown-delay"]) + seconds(webhook["--drain-timeout"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert serve[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    tls = next(vol for vol in pod["volumes"] if vol["name"] == "tls")
    assert tls["secret"]["optional"] is True
    # The serving pair only: the CA's private key is not mounted.
    assert tls["secret"]["items"] == [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]
    assert {"name": "tls", "mountPath": "/tls", "readOnly": True} in serve["volumeMounts"]


@pytest.mark.parametrize(("delay", "drain", "least"), [
    ("5s", "20s", 25), ("1m", "1.5s", 61.5), ("500ms", "1m30s", 90.5), ("1h", "0s", 3600),
    ("0.5m", "0s", 30), ("0.25h", "1.125s", 901.125), ("1s", "1000000ns", 1.001), ("250us", "2s", 2.00025),
    ("20000000us", "0s", 20), ("1h1m1s", "1ms", 3661.001),
])
def test_webhook_grace_period_outlasts_the_drain(delay: str, drain: str, least: float) -> None:
    values = yaml.safe_load(REQUIRED.read_text()) | {"webhook": {"shutdownDelay": delay, "drainTimeout": drain}}
    templates = render.render_templates(values)
    pod = one(render.objects(templates), "Deployment", "webhook")["spec"]["template"]["spec"]
    assert seconds(delay) + seconds(drain) == pytest.approx(least)
    # The drain, rounded up to whole seconds, and 5 s for the process to exit.
    assert pod["terminationGracePeriodSeconds"] == math.ceil(round(least, 6)) + 5


def test_certs_container_manages_the_mounted_secret() -> None:
    objs = objects("defaults")
    deployment = one(objs, "Deployment", "webhook")
    pod = deployment["spec"]["template"]["spec"]
    certs = container(deployment, "containers", "certs")
    assert certs["args"][0] == "certs"
    args = flags(certs["args"])
    assert args["--watch"] is True
    assert args["--namespace"] == render.NAMESPACE
    assert args["--secret"] == next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    assert args["--service"] == one(objs, "Service", "webhook")["metadata"]["name"]
    assert args["--webhook-config"] == one(objs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert token_holders(deployment) == {"certs"}
    [token] = [v for v in pod["volumes"] if v["name"] == "api-token"]
    sources = token["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert sources[1]["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    mwc = one(objs, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in mwc["metadata"].get("annotations", {})


def test_cert_manager_replaces_the_certs_container() -> None:
    objs = objects("webhook-cert-manager-values")
    deployment = one(objs, "Deployment", "webhook")
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["webhook"]
    secret = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    certificates = {c["metadata"]["name"]: c for c in find(objs, "Certificate")}
    issuers = {i["metadata"]["name"]: i for i in find(objs, "Issuer")}
    serving = next(c for c in certificates.values() if c["spec"]["secretName"] == secret["secret"]["secretName"])
    service = one(objs, "Service", "webhook")["metadata"]["name"]
    assert f"{service}.{render.NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    assert serving["spec"]["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    ca_cert = next(c for c in certificates.values() if c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"])
    assert ca_cert["spec"]["isCA"] is True
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]
    mwc = one(objs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{render.NAMESPACE}/{serving['metadata']['name']}"


# --- installer, compiler, device plugin ---------------------------------------------------------------

@pytest.mark.parametrize("case", [SEED_INSTALLER, SEED_COMPILER])
def test_bucket_secret_env_uses_the_seed_keys(case: str) -> None:
    v = values(case)
    refs = {}
    for workload in workloads(objects(case)):
        for _, c in containers(workload):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == v["driverBucketSecret"]
                    refs[(c["name"], env["name"])] = (ref["key"], ref.get("optional", False))
    step = "modulus" if mode(v) == "compiler" else "install"
    assert refs == {
        (step, "AWS_ACCESS_KEY_ID"): ("accessKeyId", False),
        (step, "AWS_SECRET_ACCESS_KEY"): ("secretAccessKey", False),
        (step, "NVIDIA_INSTALLER_BUCKET"): ("bucket", False),
        (step, "AWS_REGION"): ("region", True),
        (step, "NVIDIA_INSTALLER_S3_ENDPOINT"): ("endpoint", True),
    }


def test_role_based_credentials_pass_no_secret() -> None:
    objs = objects("role-credentials-values")
    for workload in workloads(objs):
        for _, c in containers(workload):
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))
    install = container(one(objs, "DaemonSet", "installer"), "initContainers", "install")
    args = flags(install["args"])
    assert args["--bucket"] == "nvidia-drivers"
    assert args["--region"] == "eu-central-1"
    assert args["--s3-endpoint"] == "https://s3.example.com"
    account = one(objs, "ServiceAccount", "installer")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert install["image"] == ("registry.example.com/nvidia-installer:1.2.3@sha256:"
                                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert install["imagePullPolicy"] == "Always"


def test_seed_installer_values_keep_their_meaning() -> None:
    v = values(SEED_INSTALLER)
    seed = yaml.safe_load(CASES[SEED_INSTALLER][0].read_text())
    objs = objects(SEED_INSTALLER)
    daemonset = one(objs, "DaemonSet", "installer")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["affinity"]["nodeAffinity"] == seed["nvidiaInstaller"]["nodeAffinity"]
    install = container(daemonset, "initContainers", "install")
    assert install["args"][0] == "install"
    args = flags(install["args"])
    assert args["--driver-version"] == "450.80.02"
    assert args["--gardenlinux-version"] == "184.0.0"
    assert args["--host-root"] == "/host"
    assert args["--modules"] == ",".join(v["nvidiaInstaller"]["modules"])
    assert "--allow-compilation" not in args
    assert install["command"] == ["/usr/local/bin/nvidia-installer"]
    host = {m["name"]: m for m in install["volumeMounts"]}["host-root"]
    assert host == {"name": "host-root", "mountPath": "/host", "mountPropagation": "HostToContainer"}
    env = {e["name"]: e for e in install["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists"} in pod["tolerations"]
    assert find(objs, "DaemonSet", "compiler") == []


def test_seed_compiler_pods_run_modulus_and_dev_in_parallel() -> None:
    seed = yaml.safe_load(CASES[SEED_COMPILER][0].read_text())
    objs = objects(SEED_COMPILER)
    # Only the compiler instance: no installer, webhook or device plugin on the compile node pool.
    assert {component(w) for w in workloads(objs)} == {"compiler"}
    assert find(objs, "MutatingWebhookConfiguration") == []
    daemonset = one(objs, "DaemonSet", "compiler")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["affinity"]["nodeAffinity"] == seed["nvidiaInstaller"]["nodeAffinity"]
    assert [c["name"] for c in pod["containers"]] == ["modulus", "dev"]
    assert [c["name"] for c in pod["initContainers"]] == ["copy-installer"]
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in pod["containers"]}
    assert mounts["modulus"]["/cmd"] == mounts["dev"]["/cmd"] == "cmd"
    assert volumes["cmd"] == {"name": "cmd", "emptyDir": {}}
    assert mounts["modulus"]["/out"] == mounts["dev"]["/out"]
    assert volumes[mounts["dev"]["/out"]]["hostPath"]["path"] == values(SEED_COMPILER)["compiler"]["outHostPath"]
    # The dev image has no nvidia-installer: the init container copies it into /cmd.
    copy_bin = pod["initContainers"][0]
    assert copy_bin["command"] == ["cp", "/usr/local/bin/nvidia-installer", "/cmd/nvidia-installer"]
    assert {"name": "cmd", "mountPath": "/cmd"} in copy_bin["volumeMounts"]
    dev = container(daemonset, "containers", "dev")
    assert dev["command"] == ["/cmd/nvidia-installer"]
    assert dev["args"][:3] == ["dev-serve", "--cmd-dir=/cmd", "--out-dir=/out"]
    assert dev["image"] == "ghcr.io/gardenlinux/gardenlinux/kmodbuild:184.0.0"
    modulus = container(daemonset, "containers", "modulus")
    assert modulus["args"][0] == "modulus"
    args = flags(modulus["args"])
    assert (args["--cmd-dir"], args["--out-dir"]) == ("/cmd", "/out")
    assert args["--driver-version"] == "450.80.02"
    assert args["--gardenlinux-version"] == "184.0.0"
    assert args["--driver-source"] == \
        "https://us.download.nvidia.com/tesla/450.80.02/NVIDIA-Linux-x86_64-450.80.02.run"
    assert args["--publish"] is True
    assert args["--flavor"] == "auto"


def test_debug_runs_the_install_step_as_a_main_container() -> None:
    daemonset = one(objects("debug-values"), "DaemonSet", "installer")
    pod = daemonset["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["install", "status"]
    install = container(daemonset, "containers", "install")
    assert install["securityContext"]["privileged"] is True
    assert {"name": "RUST_LOG", "value": "debug"} in install["env"]
    assert flags(install["args"])["--log-format"] == "text"


def test_allow_compilation_runs_the_install_step_in_the_dev_image() -> None:
    daemonset = one(objects("allow-compilation-values"), "DaemonSet", "installer")
    pod = daemonset["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["copy-installer", "install"]
    install = container(daemonset, "initContainers", "install")
    assert install["image"] == "ghcr.io/gardenlinux/gardenlinux/kmodbuild:1592.6"
    assert install["command"] == ["/cmd/nvidia-installer"]
    assert flags(install["args"])["--allow-compilation"] is True
    assert {"name": "cmd", "mountPath": "/cmd"} in install["volumeMounts"]
    assert {"name": "cmd", "emptyDir": {}} in pod["volumes"]
    # No privileged container stays behind once the driver is loaded.
    assert [c["name"] for c in pod["containers"]] == ["status"]


def test_device_plugin_uses_the_staged_driver() -> None:
    plugin = one(objects("defaults"), "DaemonSet", "device-plugin")
    pod = plugin["spec"]["template"]["spec"]
    main = container(plugin, "containers", "device-plugin")
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["DEVICE_DISCOVERY_STRATEGY"] == "nvml"
    assert env["PASS_DEVICE_SPECS"] == "true"
    assert env["DEVICE_LIST_STRATEGY"] == "envvar"
    assert env["NVIDIA_DRIVER_ROOT"] == "/"
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["driver-root"]["readOnly"] is True
    assert env["DRIVER_ROOT_CTR_PATH"] == mounts["driver-root"]["mountPath"] + "/current"
    assert env["LD_LIBRARY_PATH"].split(":")[0] == env["DRIVER_ROOT_CTR_PATH"] + "/lib"
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    assert volumes["kubelet-device-plugins"]["hostPath"]["path"] == "/var/lib/kubelet/device-plugins"
    assert mounts["kubelet-device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins"
    installer = one(objects("defaults"), "DaemonSet", "installer")["spec"]["template"]["spec"]
    # The installer's, and the device plugin leaves a node while its driver is switched.
    assert without_switching(pod["affinity"]) == installer["affinity"]
    assert pod["affinity"] != installer["affinity"]
    assert pod["tolerations"] == installer["tolerations"]


def test_device_plugin_can_be_left_out() -> None:
    objs = objects("device-plugin-disabled-values")
    assert find(objs, "DaemonSet", "device-plugin") == []
    assert find(objs, "ServiceAccount", "device-plugin") == []
    assert find(objs, "DaemonSet", "installer")


# --- values schema ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"forceCompie": True},
    {"nvidiaInstaller": {"driverVersoin": "450.80.02"}},
    {"nvidiaInstaller": {"nodeAffinity": {"requiredDuringScheduling": {}}}},
    {"nvidiaInstaller": {"tolerations": [{"key": "nvidia.com/gpu", "operater": "Exists"}]}},
    {"webhook": {"failurePolicy": "fail"}},
    {"webhook": {"certManager": {"enable": True}}},
    {"webhook": {"timeoutSeconds": 60}},
    {"devicePlugin": {"image": {"tags": "v0.19.0"}}},
    {"gardenlinuxVersion": 1443.3},
    {"injection": {"gpuResources": ["nvidia.com/gpu'"]}},
], ids=lambda bad: yaml.safe_dump(bad, default_flow_style=True).strip())
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(bad)


def test_schema_forbids_unknown_keys_at_every_level() -> None:
    schema = yaml.safe_load((CHART_DIR / "values.schema.json").read_text())
    open_maps = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                extra = node.get("additionalProperties")
                if "properties" in node:
                    assert extra is False, f"{path} accepts unknown keys"
                elif extra is not False:
                    open_maps.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")
    # Maps whose keys are names chosen by the user (annotations, labels, node selector, resource
    # names), Kubernetes objects passed through as they are (an EnvVar's valueFrom, extra volumes, pod
    # (anti-)affinity), and `global`, which Helm passes to every chart.
    assert all(re.search(r"(annotations|podAnnotations|labels|nodeSelector|limits|requests|valueFrom"
                         r"|extraVolumes/items|podAffinity|podAntiAffinity|global)$", p)
               for p in open_maps), open_maps


def test_every_value_is_documented_and_in_the_schema() -> None:
    """Each key of values.yaml has a comment right above it and a schema entry, and the schema has no
    entry without a default in values.yaml. Defaults that are Kubernetes objects (node affinity,
    tolerations, resources) are documented as a whole."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    passthrough = {"#/definitions/nodeAffinity", "#/definitions/tolerations", "#/definitions/resources",
                   "#/definitions/affinity"}
    text = (CHART_DIR / "values.yaml").read_text()
    lines = text.splitlines()
    problems = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(mapping: yaml.MappingNode, node: dict[str, Any], path: str) -> None:
        keys = set()
        for key_node, value_node in mapping.value:
            key = key_node.value
            keys.add(key)
            if key not in node["properties"]:
                problems.append(f"{path}{key}: not in values.schema.json")
                continue
            above = key_node.start_mark.line - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            if above < 0 or not lines[above].strip().startswith("#"):
                problems.append(f"{path}{key}: no comment")
            prop = node["properties"][key]
            if prop.get("$ref") in passthrough:
                continue
            sub = resolve(prop)
            if isinstance(value_node, yaml.MappingNode) and "properties" in sub:
                walk(value_node, sub, f"{path}{key}.")
        for key in set(node["properties"]) - keys - {"global"}:
            problems.append(f"{path}{key}: in the schema but not in values.yaml")

    walk(yaml.compose(text), schema, "")
    assert problems == []


# --- NOTES and the render.py command line -------------------------------------------------------------

def test_notes_tell_the_user_what_to_do() -> None:
    text = _render_case("defaults", render.NAMESPACE)[1]
    assert f"kubectl label namespace <namespace> {P}/inject=enabled" in text
    assert f"kubectl get nodes -L {P}/driver-ready -L {P}/driver-version" in text
    seed = _render_case(SEED_INSTALLER, render.NAMESPACE)[1]
    assert "WARNING" not in seed


@pytest.mark.parametrize("values,message", [
    ({}, "nvidiaInstaller.driverVersion is required"),
    ({"driverBucketSecret": "s"}, "nvidiaInstaller.driverVersion is required"),
    ({"nvidiaInstaller": {"driverVersion": "535.261.03"}}, "driverBucketSecret is required"),
    ({"allowCompilation": True, "forceCompile": True, "nvidiaInstaller": {"driverVersion": "535.261.03"}},
     "driverBucketSecret is required: the Secret with accessKeyId, secretAccessKey and bucket the compiler"),
    ({"allowCompilation": True, "driverBucketSecret": "s",
      "nvidiaInstaller": {"driverVersion": "535.261.03",
                          "trustedKeys": ["RWRxzjF94ieO6GKcSPXFQ+E5K+DqTo2NNgCecc1DNHiWtriDMEKU0X3Z"]}},
     "allowCompilation builds unsigned bundles on the GPU nodes"),
])
def test_a_release_without_driver_or_bucket_does_not_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception) as failure:
        render.objects(render.render_templates(values))
    assert message in str(failure.value)


def test_render_cli_prints_the_objects() -> None:
    script = Path(render.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--values", str(CASES[SEED_INSTALLER][0]),
         "--set", "webhook.failurePolicy=Ignore", "--set-string", "nvidiaInstaller.driverVersion=535.0"],
        capture_output=True, text=True, check=True, cwd="/",
    )
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == \
        [(o["kind"], o["metadata"]["name"]) for o in render.render(CASES[SEED_INSTALLER])]
    [hook] = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    install = container(one(docs, "DaemonSet", "installer"), "initContainers", "install")
    assert flags(install["args"])["--driver-version"] == "535.0"


def test_render_cli_reports_rejected_values() -> None:
    result = subprocess.run([sys.executable, str(Path(render.__file__)), "--set", "forceCompile=true"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "needs allowCompilation: true" in result.stderr
    assert result.stdout == ""


# --- the images -------------------------------------------------------------------------------------

REPO_ROOT = CHART_DIR.parent
CONTAINERFILES = {"nvidiaInstaller": REPO_ROOT / "installer/Containerfile",
                  "webhook": REPO_ROOT / "webhook/Containerfile"}


def image_contents(containerfile: Path) -> tuple[str, set[str], str]:
    """The default (last) stage's base image, the paths it and the stages it is built on copy in
    from other stages, and its USER. Stages built FROM an earlier stage are followed to the image
    they start from, with ARG defaults substituted."""
    text = containerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages: dict[str, tuple[str, str]] = {}
    chunks = re.split(r"^FROM ", text, flags=re.M)[1:]
    for chunk in chunks:
        words = [w for w in chunk.split("\n", 1)[0].split() if not w.startswith("--")]
        name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
        stages[name] = (re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0]), chunk)
    base, body = stages[list(stages)[-1]]
    bodies = [body]
    while base in stages:
        base, body = stages[base]
        bodies.append(body)
    copied = {path for body in bodies for path in re.findall(r"^COPY --from=\S+ \S+ (\S+)$", body, re.M)}
    users = [user for body in reversed(bodies) for user in re.findall(r"^USER (\S+)$", body, re.M)]
    return base, copied, users[-1]


@pytest.mark.parametrize("case", CASES)
def test_the_images_hold_what_the_chart_runs(case: str) -> None:
    v = values(case)
    objs = objects(case)
    repositories = {v[key]["image"]["repository"]: key for key in CONTAINERFILES}
    runs: list[tuple[str, list[str], int | None]] = []
    for workload in workloads(objs):
        for _, c in containers(workload):
            # registry[:port]/path[:tag][@digest] -> registry[:port]/path
            repository = re.sub(r"(:[^/:@]+)?(@.+)?$", "", c["image"])
            if repository in repositories:
                runs.append((repositories[repository], c["command"], c["securityContext"].get("runAsUser")))
    if v["webhook"]["enabled"] and mode(v) == "installer":
        # The init container the webhook injects runs the installer image by name, on PATH.
        runs.append(("nvidiaInstaller", ["nvidia-installer"], 65532))
    assert runs
    for key, command, user in runs:
        base, copied, image_user = image_contents(CONTAINERFILES[key])
        program = command[0]
        if program == "cp":
            assert base.startswith("docker.io/library/debian:"), f"{key}: cp needs a base with coreutils"
            assert command[1] in copied, command
        elif "/" in program:
            assert program in copied, f"{key} image lacks {program}"
        else:
            assert f"/usr/local/bin/{program}" in copied, f"{key} image lacks {program} on PATH"
        assert image_user == "65532:65532"
        assert user in (None, 0, 65532)


# --- signed bundles ---------------------------------------------------------------------------------

PUBLIC_KEY = "RWRxzjF94ieO6GKcSPXFQ+E5K+DqTo2NNgCecc1DNHiWtriDMEKU0X3Z"
ROTATED_KEY = "RWQfR7xS3qY5W4m7n8o9p0a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7"


def test_trusted_keys_reach_the_install_step() -> None:
    objs = render.render([REQUIRED], [f"nvidiaInstaller.trustedKeys={{{PUBLIC_KEY},{ROTATED_KEY}}}",
                                      "nvidiaInstaller.allowUnsigned=true"])
    install = container(one(objs, "DaemonSet", "installer"), "initContainers", "install")
    assert f"--trusted-keys={PUBLIC_KEY},{ROTATED_KEY}" in install["args"]
    assert "--allow-unsigned" in install["args"]
    # The seed's values set none: signatures are not checked, as in the original system.
    seed = container(one(objects(SEED_INSTALLER), "DaemonSet", "installer"), "initContainers", "install")
    assert not any(a.startswith("--trusted-keys") or a == "--allow-unsigned" for a in seed["args"])


def test_the_signing_key_reaches_modulus_only() -> None:
    objs = render.render(CASES[SEED_COMPILER], ["compiler.signingKeySecret=nvidia-bundle-signing"])
    compiler = one(objs, "DaemonSet", "compiler")
    spec = compiler["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "signing-key"]
    assert volume["secret"] == {"secretName": "nvidia-bundle-signing", "defaultMode": 0o400,
                                "items": [{"key": "signing.key", "path": "signing.key"}]}
    for _, c in containers(compiler):
        mounts = [m["name"] for m in c.get("volumeMounts", [])]
        assert ("signing-key" in mounts) == (c["name"] == "modulus"), c["name"]
    modulus = container(compiler, "containers", "modulus")
    assert "--signing-key=/signing/signing.key" in modulus["args"]
    # The installer instance never has it.
    installer_objs = objects(SEED_INSTALLER)
    assert "nvidia-bundle-signing" not in yaml.safe_dump_all(installer_objs)


def test_trusted_keys_must_look_like_signify_public_keys() -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates({"nvidiaInstaller": {"trustedKeys": ["not a key"]}})


def test_the_module_signing_key_reaches_the_dev_container_only() -> None:
    objs = render.render(CASES[SEED_COMPILER], ["compiler.moduleSigningSecret=nvidia-module-signing"])
    compiler = one(objs, "DaemonSet", "compiler")
    for _, c in containers(compiler):
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        assert ("module-signing" in mounts) == (c["name"] == "dev"), c["name"]
    modulus = container(compiler, "containers", "modulus")
    assert "--module-signing-key=/module-signing/module-signing.key" in modulus["args"]
    assert "--module-signing-cert=/module-signing/module-signing.crt" in modulus["args"]
    [volume] = [v for v in compiler["spec"]["template"]["spec"]["volumes"] if v["name"] == "module-signing"]
    assert volume["secret"]["secretName"] == "nvidia-module-signing"
    assert "nvidia-module-signing" not in yaml.safe_dump_all(objects(SEED_INSTALLER))
