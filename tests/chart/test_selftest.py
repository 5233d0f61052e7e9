"""`helm test`: the test hook objects (templates/tests/). Helm's template engine renders them as
`helm template` shows them (it includes tests unless --skip-tests); they are validated against the
Kubernetes schemas with every other object (test_chart.py). Here: that they are hooks of `helm
test` in the right order, that the pod's namespace is one the webhook injects into, that the test
pod is locked down and runs a command of the webhook image, and that its rights are exactly one
namespaced `create pods`."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

import render
from test_chart import (CASES, CONTAINERFILES, REQUIRED, component, find, flags, image_contents, mode,
                        namespace_labels, objects, one, selector_matches, values)

HOOK = "helm.sh/hook"
WEIGHT = "helm.sh/hook-weight"
DELETE = "helm.sh/hook-delete-policy"
PLATFORM = render.CHART_DIR / "ci/platform-values.yaml"


def hooks(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if HOOK in o["metadata"].get("annotations", {})]


def render_with(override: dict[str, Any], files: tuple[Any, ...] = (REQUIRED,)) -> list[dict[str, Any]]:
    return render.objects(render.render_templates(render.merge(render.user_values(files), override)))


def selftest_cases() -> list[str]:
    return [c for c in CASES if mode(values(c)) == "installer" and values(c)["webhook"]["enabled"]
            and values(c)["webhook"]["selfTest"]["enabled"]]


def test_enabled_by_default() -> None:
    v = values("defaults")
    assert v["webhook"]["selfTest"]["enabled"] is True
    assert [(o["kind"]) for o in hooks(objects("defaults"))] == \
        ["Namespace", "ServiceAccount", "Role", "RoleBinding", "Pod"]


@pytest.mark.parametrize("override", [
    {"webhook": {"selfTest": {"enabled": False}}},
    {"webhook": {"enabled": False}},
    {"allowCompilation": True, "forceCompile": True, "gardenlinuxVersion": "1592.6"},
], ids=["selftest-disabled", "webhook-disabled", "compiler"])
def test_absent_without_a_webhook_to_test(override: dict[str, Any]) -> None:
    objs = render_with(override)
    assert hooks(objs) == []
    assert [o for o in objs if component(o) == "selftest"] == []


@pytest.mark.parametrize("case", selftest_cases())
def test_hooks_of_helm_test_in_order(case: str) -> None:
    objs = objects(case)
    found = hooks(objs)
    # Only the test's objects are hooks, and all of them are `helm test` hooks.
    assert found == [o for o in objs if component(o) == "selftest"]
    for obj in found:
        annotations = obj["metadata"]["annotations"]
        assert annotations[HOOK] == "test", obj["kind"]
        assert annotations[DELETE] == "before-hook-creation,hook-succeeded", obj["kind"]
    weight = {o["kind"]: int(o["metadata"]["annotations"][WEIGHT]) for o in found}
    # The namespace first, then the identity and its right, then the binding, then the pod.
    assert weight["Namespace"] < weight["ServiceAccount"] <= weight["Role"] < weight["RoleBinding"] < weight["Pod"]


@pytest.mark.parametrize("case", selftest_cases())
def test_the_test_namespace_is_one_the_webhook_injects_into(case: str) -> None:
    objs = objects(case)
    namespace = one(objs, "Namespace", "selftest")
    name = namespace["metadata"]["name"]
    assert len(name) <= 63 and name != render.NAMESPACE
    pod = one(objs, "Pod", "selftest")
    [test] = pod["spec"]["containers"]
    assert test["args"][0] == "selftest"
    assert flags(test["args"])["--namespace"] == name
    [hook] = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    labels = namespace["metadata"]["labels"] | {"kubernetes.io/metadata.name": name}
    assert selector_matches(hook["namespaceSelector"], labels)
    assert labels["nvidia-installer.gardenlinux.io/inject"] == "enabled"
    # Pod Security must let the injected pod (hostPath volumes) in.
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    # The probe requests a GPU resource the webhook looks for.
    resource = flags(test["args"]).get("--resource")
    assert resource in values(case)["injection"]["gpuResources"]


def test_probe_resource_follows_the_gpu_resources() -> None:
    objs = render_with({"injection": {"gpuResources": ["nvidia.com/mig-*", "example.com/gpu", "nvidia.com/gpu"]}})
    [test] = one(objs, "Pod", "selftest")["spec"]["containers"]
    assert flags(test["args"])["--resource"] == "example.com/gpu"
    # Only patterns: the command's own default resource.
    objs = render_with({"injection": {"gpuResources": ["nvidia.com/mig-*"]}})
    [test] = one(objs, "Pod", "selftest")["spec"]["containers"]
    assert "--resource" not in flags(test["args"])


@pytest.mark.parametrize("case", selftest_cases())
def test_the_test_pod_is_locked_down(case: str) -> None:
    objs = objects(case)
    pod = one(objs, "Pod", "selftest")
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == render.NAMESPACE
    assert spec["restartPolicy"] == "Never"
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    [test] = spec["containers"]
    assert "initContainers" not in spec
    sc = test["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    assert test["resources"] == values(case)["webhook"]["selfTest"]["resources"]
    # No host access: the API token is its only volume.
    assert [v["name"] for v in spec["volumes"]] == ["api-token"]
    assert "projected" in spec["volumes"][0]
    assert spec["automountServiceAccountToken"] is False
    assert [m["mountPath"] for m in test["volumeMounts"]] == ["/var/run/secrets/kubernetes.io/serviceaccount"]
    assert all(m.get("readOnly") for m in test["volumeMounts"])
    # The webhook's image, whose binary it runs.
    webhook = one(objs, "Deployment", "webhook")
    serve = next(c for c in webhook["spec"]["template"]["spec"]["containers"] if c["name"] == "webhook")
    assert (test["image"], test["imagePullPolicy"]) == (serve["image"], serve["imagePullPolicy"])
    _, copied, user = image_contents(CONTAINERFILES["webhook"])
    assert test["command"][0] in copied
    assert user == "65532:65532"
    # No Service, PodDisruptionBudget or workload selects it.
    labels = pod["metadata"]["labels"]
    for obj in objs:
        selector = {"Service": lambda o: {"matchLabels": o["spec"]["selector"]},
                    "PodDisruptionBudget": lambda o: o["spec"]["selector"],
                    "Deployment": lambda o: o["spec"]["selector"],
                    "DaemonSet": lambda o: o["spec"]["selector"]}.get(obj["kind"])
        if selector:
            assert not selector_matches(selector(obj), labels), obj["metadata"]["name"]


def test_the_test_pod_is_scheduled_like_the_webhook() -> None:
    objs = render_with({"webhook": {"nodeSelector": {"kubernetes.io/os": "linux"}}}, files=(PLATFORM,))
    spec = one(objs, "Pod", "selftest")["spec"]
    webhook = one(objs, "Deployment", "webhook")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == webhook["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == webhook["tolerations"]
    assert spec["containers"][0]["image"].endswith(yaml.safe_load(PLATFORM.read_text())["webhook"]["image"]["digest"])


@pytest.mark.parametrize("case", selftest_cases())
def test_the_test_may_only_create_pods_in_its_namespace(case: str) -> None:
    objs = objects(case)
    pod = one(objs, "Pod", "selftest")
    account = one(objs, "ServiceAccount", "selftest")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == render.NAMESPACE
    namespace = one(objs, "Namespace", "selftest")["metadata"]["name"]
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": render.NAMESPACE}
    bindings = [b for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding") if subject in b["subjects"]]
    # Exactly one binding, namespaced, in the test's namespace, to a Role there; nothing cluster-wide.
    [binding] = bindings
    assert binding["kind"] == "RoleBinding"
    assert binding["metadata"]["namespace"] == namespace
    assert binding["subjects"] == [subject]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": binding["roleRef"]["name"]}
    [role] = [r for r in find(objs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"]
              and r["metadata"]["namespace"] == namespace]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]
    assert [r for r in find(objs, "ClusterRole") if component(r) == "selftest"] == []


def test_the_test_namespace_is_not_one_the_webhook_skips() -> None:
    objs = render_with({"webhook": {"excludedNamespaces": ["team-a"]}})
    name = one(objs, "Namespace", "selftest")["metadata"]["name"]
    [hook] = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert selector_matches(hook["namespaceSelector"], namespace_labels(name, "enabled"))


def test_notes_tell_how_to_run_the_test() -> None:
    notes = render.notes(render.render_templates(render.user_values([REQUIRED])))
    assert f"helm test {render.RELEASE} -n {render.NAMESPACE}" in notes
    off = render.notes(render.render_templates(
        render.merge(render.user_values([REQUIRED]), {"webhook": {"selfTest": {"enabled": False}}})))
    assert "helm test" not in off
