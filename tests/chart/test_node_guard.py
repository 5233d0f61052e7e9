"""The installer's node guard: a ValidatingAdmissionPolicy that confines the installer's
ServiceAccount, which RBAC lets patch every Node, to the Node its own pod runs on and there to its
own labels and annotations.

The rendered CEL (matchConditions, variables, validations, messageExpressions) is evaluated with a
CEL implementation (cel-python, as test_match_conditions.py does) the way the API server applies a
policy: requests that the match conditions leave out are not judged; the variables are computed in
order; each validation that is false (or cannot be evaluated: failurePolicy Fail) refuses the
request with its message. The requests are UPDATEs of a realistic GPU Node, made by applying the
JSON merge patches the installer and the upgrade controller send (installer/src/node/api.rs,
installer/src/upgrade/controller.rs), with the user info a pod's bound ServiceAccount token gives.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import celpy
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import render
from test_chart import NEWEST, P, REQUIRED, find, one

REPO = render.CHART_DIR.parent
CLAIM = "authentication.kubernetes.io/node-name"
STATE = f"{P}/upgrade-state"
# What the node side (the install step) writes, and what only the upgrade controller does.
NODE_STATES = {"upgrade-required", "installing", "validating", "done", "failed"}
CONTROLLER_STATES = {"cordoned", "draining", "unloading"}
INSTALLER = "system:serviceaccount:kube-system:nvidia-installer"
CONTROLLER = "system:serviceaccount:kube-system:nvidia-installer-upgrade-controller"


def with_values(*overrides: dict[str, Any], kube_version: str | None = None,
                namespace: str = render.NAMESPACE) -> list[dict[str, Any]]:
    merged = yaml.safe_load(REQUIRED.read_text())
    for override in overrides:
        merged = render.merge(merged, override)
    return render.objects(render.render_templates(merged, kube_version=kube_version, namespace=namespace))


def guard_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["apiVersion"] == "admissionregistration.k8s.io/v1"
            and o["kind"] in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")]


# --- a CEL rendition of the API server's policy evaluation ------------------------------------------

@dataclass
class Verdict:
    matched: bool
    denials: list[str]

    @property
    def allowed(self) -> bool:
        return not self.denials


class Policy:
    def __init__(self, policy: dict[str, Any]) -> None:
        self.spec = policy["spec"]
        env = celpy.Environment()

        def compile_(expression: str) -> celpy.Runner:
            return env.program(env.compile(expression))

        self.conditions = [compile_(c["expression"]) for c in self.spec["matchConditions"]]
        self.variables = [(v["name"], compile_(v["expression"])) for v in self.spec["variables"]]
        self.validations = [
            (compile_(v["expression"]), v.get("message"),
             compile_(v["messageExpression"]) if "messageExpression" in v else None)
            for v in self.spec["validations"]]

    def constrains(self, operation: str, resource: str) -> bool:
        return any(operation in rule["operations"] and resource in rule["resources"]
                   and rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"]
                   for rule in self.spec["matchConstraints"]["resourceRules"])

    def review(self, request: dict[str, Any], new: dict[str, Any], old: dict[str, Any]) -> Verdict:
        if not self.constrains(request["operation"], request["resource"]["resource"]):
            return Verdict(False, [])
        activation: dict[str, Any] = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(new),
                                      "oldObject": celpy.json_to_cel(old)}
        for condition in self.conditions:
            result = condition.evaluate(activation)
            assert isinstance(result, celpy.celtypes.BoolType), f"a match condition gave {result!r}"
            if not result:
                return Verdict(False, [])
        variables = celpy.celtypes.MapType({})
        for name, program in self.variables:
            activation["variables"] = variables
            value = program.evaluate(activation)
            assert not isinstance(value, celpy.CELEvalError), f"variable {name}: {value!r}"
            variables = celpy.celtypes.MapType({**variables, celpy.celtypes.StringType(name): value})
        activation["variables"] = variables
        denials = []
        for program, message, message_program in self.validations:
            try:
                result = program.evaluate(activation)
            except celpy.CELEvalError as error:
                result = error
            if isinstance(result, celpy.celtypes.BoolType) and result:
                continue
            if not isinstance(result, celpy.celtypes.BoolType):
                # failurePolicy Fail: an expression that cannot be judged refuses the request.
                denials.append(f"error: {result!r}")
                continue
            if message_program is not None:
                text = message_program.evaluate(activation)
                assert isinstance(text, str), f"a messageExpression gave {text!r}"
                denials.append(str(text))
            else:
                denials.append(message)
        return Verdict(True, denials)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(one(with_values(), "ValidatingAdmissionPolicy"))


# --- requests as the API server sees them ------------------------------------------------------------

def node(name: str = "gpu-node-1", **labels: str) -> dict[str, Any]:
    """A GPU Node as a kubelet and a cloud controller leave it, with the installer's labels."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": f"uid-{name}", "resourceVersion": "81237",
            "creationTimestamp": "2026-11-02T08:00:00Z",
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "p5.48xlarge", "topology.kubernetes.io/zone": "eu-west-1a",
                "gpu": "true", f"{P}/driver-version": "550.127.05", f"{P}/driver-ready": "true", **labels},
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
        },
        "spec": {
            "podCIDR": "100.96.3.0/24", "podCIDRs": ["100.96.3.0/24"],
            "providerID": f"aws:///eu-west-1a/i-{name}",
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        },
        "status": {"capacity": {"cpu": "192", "nvidia.com/gpu": "8"},
                   "nodeInfo": {"kernelVersion": "6.12.40-cloud-amd64", "kubeletVersion": "v1.33.4"}},
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as `kubectl patch --type merge` and the installer's Patch::Merge."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def updated(old: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The object after the patch, with what the API server changes on every write."""
    new = merge_patch(old, patch)
    new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
    new["metadata"]["managedFields"] = [{"manager": "nvidia-installer", "operation": "Update"}]
    return new


def user(username: str = INSTALLER, node_name: str | None = "gpu-node-1") -> dict[str, Any]:
    """User info of a pod's bound ServiceAccount token (Kubernetes 1.30 and later add the node)."""
    namespace = username.split(":")[2] if username.startswith("system:serviceaccount:") else None
    info: dict[str, Any] = {"username": username, "uid": "3a6d-sa"}
    if namespace is None:
        info["groups"] = ["system:nodes", "system:authenticated"]
        return info
    info["groups"] = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
    extra = {"authentication.kubernetes.io/credential-id": ["JTI=0f4c1d2e"],
             "authentication.kubernetes.io/pod-name": ["nvidia-installer-x7k2p"],
             "authentication.kubernetes.io/pod-uid": ["8b1c-pod"]}
    if node_name is not None:
        extra[CLAIM] = [node_name]
        extra["authentication.kubernetes.io/node-uid"] = [f"uid-{node_name}"]
    info["extra"] = extra
    return info


def request(name: str, userinfo: dict[str, Any], operation: str = "UPDATE") -> dict[str, Any]:
    return {"kind": {"group": "", "version": "v1", "kind": "Node"},
            "resource": {"group": "", "version": "v1", "resource": "nodes"},
            "requestKind": {"group": "", "version": "v1", "kind": "Node"},
            "requestResource": {"group": "", "version": "v1", "resource": "nodes"},
            "name": name, "operation": operation, "userInfo": userinfo, "dryRun": False}


def review(policy: Policy, old: dict[str, Any], patch: dict[str, Any],
           userinfo: dict[str, Any] | None = None) -> Verdict:
    new = updated(old, patch)
    return policy.review(request(old["metadata"]["name"], userinfo or user()), new, old)


# The installer's patches (JSON merge patches of the Node).
def driver_labels(version: str = "570.172.08", ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"labels": {f"{P}/driver-version": version, f"{P}/driver-ready": str(ready).lower()}}}


def upgrade_state(state: str, target: str = "570.172.08", reason: str | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": {STATE: state},
                         "annotations": {f"{P}/upgrade-since": "2026-11-30T11:00:00Z",
                                         f"{P}/upgrade-reason": reason, f"{P}/upgrade-target": target}}}


# The upgrade controller's.
CORDON = {"spec": {"unschedulable": True}, "metadata": {"annotations": {f"{P}/upgrade-cordoned": "true"}}}


# --- what the policy lets through and what it refuses -----------------------------------------------

def test_the_installer_labels_its_own_node(policy: Policy) -> None:
    verdict = review(policy, node(), driver_labels())
    assert verdict.matched and verdict.allowed, verdict.denials
    # A failed install labels driver-ready=false; re-sending the same labels changes nothing.
    assert review(policy, node(), driver_labels("550.127.05", ready=False)).allowed
    assert review(policy, node(), driver_labels("550.127.05")).allowed
    # A node the installer has never labelled (no labels, no annotations at all).
    bare = node()
    del bare["metadata"]["labels"], bare["metadata"]["annotations"]
    assert review(policy, bare, driver_labels()).allowed


@pytest.mark.parametrize("state", sorted(NODE_STATES))
def test_the_installer_moves_its_own_upgrade_state(policy: Policy, state: str) -> None:
    for before in [{}, {STATE: "unloading"}, {STATE: "upgrade-required"}]:
        old = node(**before)
        old["metadata"]["annotations"][f"{P}/upgrade-reason"] = "an earlier reason"
        verdict = review(policy, old, upgrade_state(state, reason="why" if state == "failed" else None))
        assert verdict.allowed, (before, verdict.denials)


def test_the_installer_keeps_or_removes_the_controllers_state(policy: Policy) -> None:
    # A node held by the controller: the installer re-writes the same state (a new target, a reason),
    # labels its driver, or the state is removed.
    for state in sorted(CONTROLLER_STATES):
        held = node(**{STATE: state})
        held["metadata"]["annotations"][f"{P}/upgrade-cordoned"] = "true"
        held["spec"]["unschedulable"] = True
        assert review(policy, held, upgrade_state(state, target="580.65.06", reason="new target")).allowed
        assert review(policy, held, driver_labels()).allowed
        assert review(policy, held, {"metadata": {"labels": {STATE: None}}}).allowed


@pytest.mark.parametrize("state", sorted(CONTROLLER_STATES))
def test_the_installer_cannot_give_the_controllers_orders(policy: Policy, state: str) -> None:
    for before in [{}, {STATE: "done"}, {STATE: "installing"}]:
        verdict = review(policy, node(**before), upgrade_state(state))
        assert verdict.denials == [
            f"the installer may set the label {STATE} only to upgrade-required, installing, validating, done "
            f"or failed, not to {state} (cordoned, draining and unloading are orders of the upgrade controller)"]
    # Nor any other value.
    assert not review(policy, node(), upgrade_state("rebooting")).allowed


def test_another_node_is_refused(policy: Policy) -> None:
    # The installer pod on gpu-node-1 patches gpu-node-2: its own labels, or the controller's orders.
    for patch in (driver_labels(), upgrade_state("done"), upgrade_state("draining"), CORDON):
        verdict = review(policy, node("gpu-node-2"), patch)
        assert verdict.matched
        assert "the installer on node gpu-node-1 may change only its own Node, not gpu-node-2" in verdict.denials
    # The same patch from the installer pod on gpu-node-2 is fine.
    assert review(policy, node("gpu-node-2"), driver_labels(), user(node_name="gpu-node-2")).allowed


@pytest.mark.parametrize("extra", ["no node name", "no extra"])
def test_a_token_without_the_node_name_is_refused(policy: Policy, extra: str) -> None:
    userinfo = user(node_name=None)
    if extra == "no extra":
        del userinfo["extra"]
    verdict = review(policy, node(), driver_labels(), userinfo)
    assert verdict.matched
    [denial] = verdict.denials
    assert denial.startswith(f"the installer's request carries no node name ({CLAIM})")
    assert "Kubernetes 1.30 or later" in denial and "nvidiaInstaller.nodeGuard.enabled=false" in denial


@pytest.mark.parametrize("patch", [
    {"spec": {"unschedulable": True}},
    {"spec": {"taints": None}},
    {"spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                         {"key": "evil", "effect": "NoExecute"}]}},
    {"spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoExecute"}]}},
    {"spec": {"providerID": "aws:///eu-west-1a/i-other"}},
], ids=["cordon", "remove-taints", "add-taint", "change-taint", "provider-id"])
def test_the_spec_of_its_own_node_is_refused(policy: Policy, patch: dict[str, Any]) -> None:
    verdict = review(policy, node(), patch)
    assert verdict.denials == [
        "the installer may not change a Node's spec (unschedulable, taints, podCIDR, providerID)"]


def test_an_uncordon_is_refused(policy: Policy) -> None:
    cordoned = node()
    cordoned["spec"]["unschedulable"] = True
    assert not review(policy, cordoned, {"spec": {"unschedulable": None}}).allowed
    assert not review(policy, cordoned, {"spec": {"unschedulable": False}}).allowed


@pytest.mark.parametrize("patch,what", [
    ({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}, "labels"),
    ({"metadata": {"labels": {"gpu": None}}}, "labels"),
    ({"metadata": {"labels": {"topology.kubernetes.io/zone": "eu-west-1b"}}}, "labels"),
    ({"metadata": {"labels": {f"{P}/inject": "enabled"}}}, "labels"),
    ({"metadata": {"annotations": {f"{P}/upgrade-cordoned": "true"}}}, "annotations"),
    ({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": None}}}, "annotations"),
    ({"metadata": {"annotations": {"example.com/anything": "x"}}}, "annotations"),
    ({"metadata": {"finalizers": ["example.com/hold"]}}, "finalizers"),
    ({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "gpu-node-2",
                                        "uid": "uid-gpu-node-2"}]}}, "finalizers"),
])
def test_other_metadata_of_its_own_node_is_refused(policy: Policy, patch: dict[str, Any], what: str) -> None:
    verdict = review(policy, node(), patch)
    assert len(verdict.denials) == 1 and what in verdict.denials[0], verdict.denials


def test_the_controllers_annotation_cannot_be_removed(policy: Policy) -> None:
    held = node(**{STATE: "draining"})
    held["metadata"]["annotations"][f"{P}/upgrade-cordoned"] = "true"
    verdict = review(policy, held, {"metadata": {"annotations": {f"{P}/upgrade-cordoned": None}}})
    assert len(verdict.denials) == 1 and "annotations" in verdict.denials[0]


def test_every_refusal_is_named(policy: Policy) -> None:
    # The attack in full: another node, the controller's order, its annotation and a cordon.
    patch = merge_patch(upgrade_state("unloading"), CORDON)
    verdict = review(policy, node("gpu-node-2"), patch)
    assert len(verdict.denials) == 4, verdict.denials
    assert not any(d.startswith("error") for d in verdict.denials)


@pytest.mark.parametrize("username", [
    CONTROLLER,
    "system:node:gpu-node-1",
    "kubernetes-admin",
    "system:serviceaccount:gpu-system:nvidia-installer",
    "system:serviceaccount:kube-system:nvidia-installer-device-plugin",
])
def test_other_users_are_not_matched(policy: Policy, username: str) -> None:
    userinfo = user(username) if username.startswith("system:serviceaccount:") else user(username, None)
    # The controller's cordon and orders on any node; a person's change of anything.
    for patch in (CORDON, upgrade_state("draining"), {"spec": {"taints": None}}):
        verdict = review(policy, node("gpu-node-2"), patch, userinfo)
        assert not verdict.matched and verdict.allowed


def test_only_updates_of_nodes_are_judged(policy: Policy) -> None:
    assert policy.constrains("UPDATE", "nodes")
    for operation, resource in [("CREATE", "nodes"), ("DELETE", "nodes"), ("UPDATE", "pods"),
                                ("UPDATE", "nodes/status"), ("CONNECT", "nodes/proxy")]:
        assert not policy.constrains(operation, resource)
    old = node("gpu-node-2")
    assert not policy.review(request("gpu-node-2", user(), "CREATE"), old, old).matched


def test_without_live_upgrades_only_the_two_labels() -> None:
    # install runs with --upgrade-mode=manual and writes driver-version and driver-ready only.
    manual = Policy(one(with_values({"upgrade": {"enabled": False}}), "ValidatingAdmissionPolicy"))
    assert review(manual, node(), driver_labels()).allowed
    assert "the installer on node gpu-node-1 may change only its own Node, not gpu-node-2" in \
        review(manual, node("gpu-node-2"), driver_labels()).denials
    for state in sorted(NODE_STATES | CONTROLLER_STATES):
        verdict = review(manual, node(), {"metadata": {"labels": {STATE: state}}})
        assert verdict.denials == [f"the installer may add, change or remove only the Node labels {P}/driver-version "
                                   f"and {P}/driver-ready"], state
    verdict = review(manual, node(), {"metadata": {"annotations": {f"{P}/upgrade-target": "570.172.08"}}})
    assert verdict.denials == ["the installer may not change a Node's annotations"]
    # A label the installer wrote while upgrades were on stays as it is.
    assert review(manual, node(**{STATE: "done"}), driver_labels()).allowed
    assert not review(manual, node(**{STATE: "done"}), {"metadata": {"labels": {STATE: None}}}).allowed


def test_the_states_match_the_installer() -> None:
    """NODE_STATES and CONTROLLER_STATES are the installer's states (installer/src/upgrade/mod.rs),
    and the install step writes no state outside NODE_STATES other than the one it read (the
    controller's order, kept)."""
    source = (REPO / "installer/src/upgrade/mod.rs").read_text()
    names = dict(re.findall(r'State::(\w+) => "([a-z-]+)"', source))
    assert set(names.values()) == NODE_STATES | CONTROLLER_STATES
    written = set()
    for path in sorted((REPO / "installer/src/node").glob("*.rs")):
        text = path.read_text()
        written |= set(re.findall(r"upgrade_state\(\s*State::(\w+)", text))
        written |= set(re.findall(r"Some\(State::(\w+)\)", text))
    assert written and {names[name] for name in written} <= NODE_STATES, written


def test_the_keys_match_the_contract(policy: Policy) -> None:
    """The labels and annotations the policy allows are the contract's (contract/src/lib.rs), and
    upgrade-cordoned is not among them."""
    source = (REPO / "contract/src/lib.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', source))
    labels = {consts[k] for k in ("DRIVER_VERSION_LABEL", "DRIVER_READY_LABEL", "UPGRADE_STATE_LABEL")}
    annotations = {consts[k] for k in ("UPGRADE_TARGET_ANNOTATION", "UPGRADE_REASON_ANNOTATION",
                                       "UPGRADE_SINCE_ANNOTATION")}
    variables = {v["name"]: v["expression"] for v in policy.spec["variables"]}
    assert set(re.findall(r"'([^']+)'", variables["ownLabels"])) == labels
    assert set(re.findall(r"'([^']+)'", variables["ownAnnotations"])) == annotations
    assert consts["UPGRADE_CORDONED_ANNOTATION"] not in yaml.safe_dump(policy.spec)


# --- the rendered objects ------------------------------------------------------------------------------

def test_policy_and_binding() -> None:
    objs = with_values()
    policy = one(objs, "ValidatingAdmissionPolicy")
    binding = one(objs, "ValidatingAdmissionPolicyBinding")
    assert policy["metadata"]["name"] == binding["metadata"]["name"] == "nvidia-installer-node-guard"
    assert "namespace" not in policy["metadata"] and "namespace" not in binding["metadata"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert "paramKind" not in spec
    assert spec["matchConstraints"] == {"resourceRules": [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}]}
    for validation in spec["validations"]:
        assert validation["reason"] == "Forbidden"
        assert ("message" in validation) != ("messageExpression" in validation)
        assert "\n" not in validation.get("message", ""), "a message must be one line"
    for obj in (policy, binding):
        kubernetes_validate.validate(obj, NEWEST, strict=True)
        kubernetes_validate.validate(obj, "1.30", strict=True)


@pytest.mark.parametrize("namespace,override", [
    ("kube-system", {}),
    ("gpu-system", {}),
    ("gpu-system", {"fullnameOverride": "drivers"}),
])
def test_it_matches_the_installers_service_account(namespace: str, override: dict[str, Any]) -> None:
    objs = with_values(override, namespace=namespace)
    daemonset = one(objs, "DaemonSet", "installer")
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(objs, "ServiceAccount", "installer")["metadata"]["name"] == account
    [condition] = one(objs, "ValidatingAdmissionPolicy")["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == 'system:serviceaccount:{namespace}:{account}'"
    # Rendered on its own, the policy judges exactly that ServiceAccount's requests.
    guarded = Policy(one(objs, "ValidatingAdmissionPolicy"))
    mine = user(f"system:serviceaccount:{namespace}:{account}")
    assert guarded.review(request("gpu-node-2", mine), updated(node("gpu-node-2"), driver_labels()),
                          node("gpu-node-2")).denials
    other = user(f"system:serviceaccount:{namespace}:{account}-x")
    assert not guarded.review(request("gpu-node-2", other), updated(node("gpu-node-2"), driver_labels()),
                              node("gpu-node-2")).matched


@pytest.mark.parametrize("kube_version,rendered", [
    ("v1.28.0", False), ("v1.29.15", False), ("v1.30.0", True), ("v1.30.4-gke.1348000", True),
    ("v1.33.4", True), (None, True)])
def test_rendered_from_kubernetes_1_30(kube_version: str | None, rendered: bool) -> None:
    required = yaml.safe_load(REQUIRED.read_text())
    templates = render.render_templates(required, kube_version=kube_version)
    assert bool(guard_objects(render.objects(templates))) == rendered
    assert ("so the node guard is not deployed" in render.notes(templates)) == (not rendered)
    if rendered:
        assert len(guard_objects(render.objects(templates))) == 2


def test_offline_rendering_keeps_the_guard() -> None:
    # Helm's offline API list names groups, not kinds: the Kubernetes version decides, so
    # `helm template` without --api-versions still renders the guard.
    objs = render.objects(render.render_templates(yaml.safe_load(REQUIRED.read_text()),
                                                  api_versions=["example.com/v1/Other"]))
    assert len(guard_objects(objs)) == 2


def test_absent_when_disabled() -> None:
    objs = with_values({"nvidiaInstaller": {"nodeGuard": {"enabled": False}}})
    assert guard_objects(objs) == []
    # The rest of the installer is unchanged.
    assert find(objs, "DaemonSet", "installer") and find(objs, "ClusterRole", "installer")
    templates = render.render_templates(render.merge(yaml.safe_load(REQUIRED.read_text()),
                                                     {"nvidiaInstaller": {"nodeGuard": {"enabled": False}}}),
                                        kube_version="v1.29.0")
    assert "node guard" not in render.notes(templates)


def test_absent_in_the_compiler_instance() -> None:
    compiler = render.render([render.CHART_DIR / "ci/seed-compiler-values.yaml"])
    assert guard_objects(compiler) == []
    assert find(compiler, "ClusterRole") == []


def test_the_default_is_on() -> None:
    text = (render.CHART_DIR / "values.yaml").read_text()
    assert yaml.safe_load(text)["nvidiaInstaller"]["nodeGuard"] == {"enabled": True}
    for path in sorted((render.CHART_DIR / "ci").glob("*.yaml")):
        v = yaml.safe_load(path.read_text()) or {}
        if v.get("forceCompile"):
            continue
        objs = render.render([path])
        assert len(guard_objects(objs)) == 2, path.name


@pytest.mark.parametrize("bad", [
    {"nvidiaInstaller": {"nodeGuard": {"enabled": "yes"}}},
    {"nvidiaInstaller": {"nodeGuard": {"enable": True}}},
    {"nvidiaInstaller": {"nodeGuard": True}},
], ids=lambda bad: yaml.safe_dump(bad, default_flow_style=True).strip())
def test_schema_rejects_bad_node_guard_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(yaml.safe_load(REQUIRED.read_text()), bad))
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(yaml.safe_load(REQUIRED.read_text()), bad), kube_version="v1.30.0")


def test_the_template_says_why() -> None:
    template = (render.CHART_DIR / "templates/installer-node-guard.yaml").read_text()
    assert "RBAC cannot limit a DaemonSet pod to the node it runs on" in template
    assert "compromised" in template
