"""Live driver upgrades in the chart: the upgrade controller Deployment and its rights, the install
step's upgrade mode and its right to read its Node, and the device plugin leaving a node while its
driver is switched. The rendered objects of chart/ci/upgrade-values.yaml are also schema-validated,
linted and checked for privileges by test_chart.py, like every values file there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import render
from test_chart import (CASES, NEWEST, P, REQUIRED, SEED_COMPILER, SWITCHING, component, container, containers,
                        find, flags, installer_cases, mode, objects, one, selector_matches, token_holders, values,
                        without_switching)

UPGRADE = "upgrade-values"
COMPONENT = "upgrade-controller"


def upgrade_cases() -> list[str]:
    return [c for c in installer_cases() if values(c)["upgrade"]["enabled"]]


def with_values(*overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The required values merged with the overrides; every object is checked against the newest
    Kubernetes schema (strict) on the way."""
    merged = yaml.safe_load(REQUIRED.read_text())
    for override in overrides:
        merged = render.merge(merged, override)
    objs = render.objects(render.render_templates(merged))
    for obj in objs:
        if not obj["apiVersion"].startswith(("cert-manager.io/", "monitoring.coreos.com/")):
            kubernetes_validate.validate(obj, NEWEST, strict=True)
    return objs


def controller_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if component(o) == COMPONENT]


def controller(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return container(one(objs, "Deployment", COMPONENT), "containers", COMPONENT)


def install_step(objs: list[dict[str, Any]]) -> dict[str, Any]:
    daemonset = one(objs, "DaemonSet", "installer")
    [install] = [c for _, c in containers(daemonset) if c["name"] == "install"]
    return install


def terms(workload: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = workload["spec"]["template"]["spec"].get("affinity", {})
    return affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {}) \
        .get("nodeSelectorTerms", [])


def node_matches(node_terms: list[dict[str, Any]], labels: dict[str, str], name: str = "gpu-node-1") -> bool:
    """Required node affinity semantics: the terms are ORed, the requirements of one term ANDed; a
    term without requirements matches no node."""
    def term_matches(term: dict[str, Any]) -> bool:
        fields = term.get("matchFields", [])
        if not term.get("matchExpressions") and not fields:
            return False
        return (selector_matches({"matchExpressions": term.get("matchExpressions", [])}, labels)
                and selector_matches({"matchExpressions": fields}, {"metadata.name": name}))
    return any(term_matches(term) for term in node_terms)


# --- the controller -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", upgrade_cases())
def test_controller_args_are_the_values(case: str) -> None:
    v = values(case)
    objs = objects(case)
    deployment = one(objs, "Deployment", COMPONENT)
    c = controller(objs)
    assert c["command"] == ["/usr/local/bin/nvidia-installer"]
    assert c["args"][0] == "upgrade-controller"
    assert flags(c["args"]) == {
        "--namespace": "$(POD_NAMESPACE)",
        "--installer-labels": flags(c["args"])["--installer-labels"],
        "--max-unavailable": str(v["upgrade"]["maxUnavailable"]),
        "--drain-timeout": v["upgrade"]["drainTimeout"],
        "--on-drain-timeout": v["upgrade"]["onDrainTimeout"],
        "--switch-timeout": v["upgrade"]["switchTimeout"],
        "--gpu-resources": ",".join(v["injection"]["gpuResources"]),
        "--interval": v["upgrade"]["interval"],
        "--lease-name": deployment["metadata"]["name"],
        "--metrics-listen": f"0.0.0.0:{v['upgrade']['metrics']['port']}",
        "--log-format": v["logFormat"],
    }
    # $(POD_NAMESPACE) is the pod's own namespace, from the downward API: the installer pods'.
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # The pod's name, as its identity in the Lease.
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert deployment["metadata"]["namespace"] == one(objs, "DaemonSet", "installer")["metadata"]["namespace"]
    assert env["RUST_LOG"]["value"] == ("debug" if v["debug"] else v["logLevel"])
    # The installer's own image (the controller is a subcommand of nvidia-installer).
    status = container(one(objs, "DaemonSet", "installer"), "containers", "status")
    assert (c["image"], c["imagePullPolicy"]) == (status["image"], status["imagePullPolicy"])
    assert c["resources"] == v["upgrade"]["resources"]


@pytest.mark.parametrize("case", upgrade_cases())
def test_controller_finds_exactly_the_installer_pods(case: str) -> None:
    objs = objects(case)
    installer = one(objs, "DaemonSet", "installer")
    pairs = flags(controller(objs)["args"])["--installer-labels"].split(",")
    labels = dict(pair.split("=", 1) for pair in pairs)
    assert len(labels) == len(pairs)
    assert labels == installer["spec"]["selector"]["matchLabels"]
    # They select the installer pods and no other pods of the release.
    for workload in find(objs, "DaemonSet") + find(objs, "Deployment"):
        matches = selector_matches({"matchLabels": labels}, workload["spec"]["template"]["metadata"]["labels"])
        assert matches == (workload is installer), workload["metadata"]["name"]


@pytest.mark.parametrize("case", upgrade_cases())
def test_one_controller_at_a_time_locked_down(case: str) -> None:
    v = values(case)
    objs = objects(case)
    deployment = one(objs, "Deployment", COMPONENT)
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert selector_matches(spec["selector"], spec["template"]["metadata"]["labels"])
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == v["webhook"]["priorityClassName"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert controller(objs)["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "runAsUser": 65532, "runAsGroup": 65532, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert not any("hostPath" in volume for volume in pod["volumes"])
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount", COMPONENT)["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert one(objs, "ServiceAccount", COMPONENT)["automountServiceAccountToken"] is False
    assert token_holders(deployment) == {COMPONENT}


def test_controller_scheduling_labels_and_annotations() -> None:
    v = values(UPGRADE)["upgrade"]
    template = one(objects(UPGRADE), "Deployment", COMPONENT)["spec"]["template"]
    assert template["spec"]["nodeSelector"] == v["nodeSelector"]
    assert template["spec"]["affinity"] == v["affinity"]
    assert template["spec"]["tolerations"] == v["tolerations"]
    assert template["metadata"]["labels"]["team"] == "platform"
    assert template["metadata"]["annotations"] == v["podAnnotations"]
    defaults = one(objects("defaults"), "Deployment", COMPONENT)["spec"]["template"]
    assert not {"nodeSelector", "affinity", "tolerations"} & set(defaults["spec"])
    assert "annotations" not in defaults["metadata"]


def test_controller_pod_labels_cannot_replace_the_charts() -> None:
    with pytest.raises(helm.HelmError) as failure:
        with_values({"upgrade": {"podLabels": {"app.kubernetes.io/component": "other"}}})
    assert "upgrade.podLabels: app.kubernetes.io/component is one of the chart's own labels" in str(failure.value)


@pytest.mark.parametrize("given,rendered", [(1, "1"), (3, "3"), (250, "250"), ("25%", "25%"), ("100%", "100%")])
def test_max_unavailable_renders_as_the_controller_reads_it(tmp_path: Path, given: Any, rendered: str) -> None:
    # Through a values file, as Helm reads numbers (float64) from YAML.
    path = tmp_path / "values.yaml"
    path.write_text(REQUIRED.read_text() + yaml.safe_dump({"upgrade": {"maxUnavailable": given}}))
    objs = render.render([path])
    assert flags(controller(objs)["args"])["--max-unavailable"] == rendered


# --- RBAC ---------------------------------------------------------------------------------------

def deployment_lease(objs: list[dict[str, Any]]) -> str:
    """The Lease the controller holds, from its arguments."""
    return flags(controller(objs)["args"])["--lease-name"]


def rules(objs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    found = [r for r in find(objs, kind, COMPONENT)
             if namespace is None or r["metadata"].get("namespace") == namespace]
    return [rule for role in found for rule in role["rules"]]


@pytest.mark.parametrize("case", upgrade_cases())
def test_controller_rights_are_exactly_what_it_uses(case: str) -> None:
    v = values(case)
    objs = objects(case)
    force_after = v["upgrade"]["onDrainTimeout"] == "force-after"
    delete_pods = {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}
    assert rules(objs, "ClusterRole") == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    ] + ([delete_pods] if force_after else [])
    # Its Lease (create, and reading and renewing its own), and without force-after deleting only
    # the installer pods, in the release namespace.
    lease = deployment_lease(objs)
    assert rules(objs, "Role", render.NAMESPACE) == ([] if force_after else [delete_pods]) + [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
         "verbs": ["get", "update"]},
    ]
    # Events about Nodes, in `default` only.
    assert rules(objs, "Role", "default") == [
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
    assert len(find(objs, "Role", COMPONENT)) == (2 if force_after else 3)
    # Every binding binds its own role to the controller's ServiceAccount, and every role is bound.
    account = one(objs, "ServiceAccount", COMPONENT)["metadata"]["name"]
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
             for r in find(objs, "Role", COMPONENT) + find(objs, "ClusterRole", COMPONENT)}
    bound = set()
    for binding in find(objs, "RoleBinding", COMPONENT) + find(objs, "ClusterRoleBinding", COMPONENT):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": render.NAMESPACE}]
        role_kind = binding["roleRef"]["kind"]
        assert binding["kind"] == role_kind + "Binding"
        bound.add((role_kind, binding["metadata"].get("namespace"), binding["roleRef"]["name"]))
    assert bound == roles


def test_pods_are_deleted_cluster_wide_only_with_force_after() -> None:
    for policy in ("wait", "force-after", "skip-node"):
        objs = with_values({"upgrade": {"onDrainTimeout": policy}})
        cluster_wide = any("delete" in rule["verbs"] for rule in rules(objs, "ClusterRole"))
        assert cluster_wide == (policy == "force-after"), policy
        assert flags(controller(objs)["args"])["--on-drain-timeout"] == policy


@pytest.mark.parametrize("case", CASES)
def test_no_role_of_the_chart_uses_a_wildcard(case: str) -> None:
    for role in find(objects(case), "ClusterRole") + find(objects(case), "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)


# --- the install step -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", installer_cases())
def test_install_step_upgrades_through_the_controller_only_when_enabled(case: str) -> None:
    v = values(case)
    objs = objects(case)
    args = flags(install_step(objs)["args"])
    installer_rules = one(objs, "ClusterRole", "installer")["rules"]
    reads_node = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]} in installer_rules
    if v["upgrade"]["enabled"]:
        assert args["--upgrade-mode"] == "controller"
        assert args["--unload-wait"] == v["upgrade"]["unloadWait"]
        assert reads_node
    else:
        assert args.get("--upgrade-mode", "manual") == "manual"
        assert "--unload-wait" not in args
        assert not reads_node


@pytest.mark.parametrize("override", [{"debug": True}, {"allowCompilation": True, "gardenlinuxVersion": "1592.6"}])
def test_every_form_of_the_install_step_gets_the_upgrade_mode(override: dict[str, Any]) -> None:
    args = flags(install_step(with_values(override))["args"])
    assert (args["--upgrade-mode"], args["--unload-wait"]) == ("controller", "5m")


def test_disabled_renders_no_controller_and_the_manual_mode() -> None:
    objs = with_values({"upgrade": {"enabled": False}})
    assert controller_objects(objs) == []
    assert not any(a.startswith(("--upgrade-mode", "--unload-wait")) for a in install_step(objs)["args"])
    assert one(objs, "ClusterRole", "installer")["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    # The device plugin runs where the installer does, as before.
    plugin = one(objs, "DaemonSet", "device-plugin")["spec"]["template"]["spec"]
    assert plugin["affinity"] == one(objs, "DaemonSet", "installer")["spec"]["template"]["spec"]["affinity"]
    assert f"{P}/upgrade-state" not in yaml.safe_dump_all(objs)


COMPILER_CASES = [c for c in CASES if mode(values(c)) == "compiler"]


@pytest.mark.parametrize("case", COMPILER_CASES)
def test_the_compiler_instance_has_no_upgrades(case: str) -> None:
    objs = objects(case)
    assert controller_objects(objs) == []
    assert "upgrade" not in yaml.safe_dump_all(objs)


def test_the_defaults_deploy_the_controller() -> None:
    assert SEED_COMPILER in COMPILER_CASES
    kinds = sorted(o["kind"] for o in controller_objects(objects("defaults")))
    # Without force-after: the release namespace's Roles for the Lease and the installer pods, and
    # the Events Role.
    assert kinds == sorted(["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                            "Role", "RoleBinding", "Role", "RoleBinding", "Role", "RoleBinding"])


# --- the device plugin -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in upgrade_cases() if values(c)["devicePlugin"]["enabled"]])
def test_every_device_plugin_term_keeps_it_off_a_switching_node(case: str) -> None:
    plugin = one(objects(case), "DaemonSet", "device-plugin")
    found = terms(plugin)
    assert found
    for term in found:
        assert SWITCHING in term["matchExpressions"], term


def test_user_terms_each_get_the_requirement() -> None:
    v = values(UPGRADE)["devicePlugin"]["affinity"]
    plugin = one(objects(UPGRADE), "DaemonSet", "device-plugin")
    affinity = plugin["spec"]["template"]["spec"]["affinity"]
    assert without_switching(affinity) == v
    [pool, named] = terms(plugin)
    assert pool["matchExpressions"][-1] == named["matchExpressions"][-1] == SWITCHING
    assert named["matchFields"] == v["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][1]["matchFields"]
    # ORed terms: no way around the requirement through either of them.
    pool_node = {"example.com/gpu-pool": "h100"}
    for labels, name in ((pool_node, "gpu-node-1"), ({}, "gpu-node-7")):
        assert node_matches(terms(plugin), labels, name)
        for state in ("unloading", "installing", "validating"):
            assert not node_matches(terms(plugin), labels | {f"{P}/upgrade-state": state}, name), (name, state)
        for state in ("upgrade-required", "cordoned", "draining", "done", "failed"):
            assert node_matches(terms(plugin), labels | {f"{P}/upgrade-state": state}, name), (name, state)


@pytest.mark.parametrize("affinity,expected", [
    # nvidiaInstaller.nodeAffinity with preferred terms only: the requirement becomes the one term.
    ({"nvidiaInstaller": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": None,
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}]}}},
     [{"matchExpressions": [SWITCHING]}]),
    # devicePlugin.affinity without node affinity.
    ({"devicePlugin": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                          "labelSelector": {"matchLabels": {"app": "x"}}}}]}}}},
     [{"matchExpressions": [SWITCHING]}]),
    # An empty term matches no node, and still does not.
    ({"nvidiaInstaller": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{}, {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}},
     [{}, {"matchExpressions": [{"key": "gpu", "operator": "Exists"}, SWITCHING]}]),
], ids=["preferred-only", "no-node-affinity", "empty-term"])
def test_the_requirement_without_required_terms_of_the_users(affinity: dict[str, Any],
                                                             expected: list[dict[str, Any]]) -> None:
    objs = with_values(affinity)
    plugin = one(objs, "DaemonSet", "device-plugin")
    assert terms(plugin) == expected
    # The rest of the user's affinity is kept.
    given = affinity.get("devicePlugin", {}).get("affinity") or {"nodeAffinity": affinity["nvidiaInstaller"][
        "nodeAffinity"]}
    rendered = plugin["spec"]["template"]["spec"]["affinity"]
    for key, value in given.items():
        if key != "nodeAffinity":
            assert rendered[key] == value
    preferred = given.get("nodeAffinity", {}).get("preferredDuringSchedulingIgnoredDuringExecution")
    if preferred:
        assert rendered["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == preferred
    # The installer itself is not kept off: it performs the switch.
    assert f"{P}/upgrade-state" not in yaml.safe_dump(one(objs, "DaemonSet", "installer"))


def test_notes_show_how_to_follow_a_rollout() -> None:
    line = f"kubectl get nodes -L {P}/upgrade-state -L {P}/driver-version"
    required = yaml.safe_load(REQUIRED.read_text())
    assert line in render.notes(render.render_templates(required))
    disabled = render.merge(required, {"upgrade": {"enabled": False}})
    assert "upgrade-state" not in render.notes(render.render_templates(disabled))


# --- values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"upgrade": {"maxUnavailable": 0}},
    {"upgrade": {"maxUnavailable": "0%"}},
    {"upgrade": {"maxUnavailable": "150%"}},
    {"upgrade": {"maxUnavailable": "25"}},
    {"upgrade": {"maxUnavailable": 1.5}},
    {"upgrade": {"onDrainTimeout": "force"}},
    {"upgrade": {"drainTimeout": "10 minutes"}},
    {"upgrade": {"unloadWait": 300}},
    {"upgrade": {"switchTimeout": "15 minutes"}},
    {"upgrade": {"interval": ""}},
    {"upgrade": {"enable": False}},
    {"upgrade": {"resources": {"limit": {"memory": "1Gi"}}}},
], ids=lambda bad: yaml.safe_dump(bad, default_flow_style=True).strip())
def test_schema_rejects_bad_upgrade_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(yaml.safe_load(REQUIRED.read_text()), bad))


@pytest.mark.parametrize(("switch", "unload"), [("5m", "5m"), ("6m", "5m30s"), ("90s", "1m"), ("1m", "0s")])
def test_a_switch_timeout_not_past_the_unload_wait_does_not_render(switch: str, unload: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        with_values({"upgrade": {"switchTimeout": switch, "unloadWait": unload}})
    assert f"upgrade.switchTimeout ({switch}) must be longer than upgrade.unloadWait ({unload}) plus a minute" in str(
        failure.value)


def test_a_switch_timeout_past_the_unload_wait_renders() -> None:
    objs = with_values({"upgrade": {"switchTimeout": "1h", "unloadWait": "58m59s"}})
    assert flags(controller(objs)["args"])["--switch-timeout"] == "1h"


def test_a_zero_interval_does_not_render() -> None:
    with pytest.raises(helm.HelmError) as failure:
        with_values({"upgrade": {"interval": "0s"}})
    assert "upgrade.interval must be longer than 0s" in str(failure.value)
