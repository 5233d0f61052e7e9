"""The chart's CEL matchConditions and the webhook's own decision agree.

The API server evaluates the rendered `matchConditions` before it calls the webhook; the webhook
(and the offline `nvidia-webhook inject`, which makes the same mutation) then decides again. For
every pod below, the rendered expressions are evaluated with a CEL implementation (cel-python) and
the pod is run through `nvidia-webhook inject` with the injection flags the rendered Deployment
passes to `serve`: a pod reaches the webhook exactly when the webhook injects into it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import celpy
import pytest

import render
from test_chart import P, container, objects, one, webhook_cases

REPO = render.CHART_DIR.parent


def webhook_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "debug" / "nvidia-webhook"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--locked", "-p", "nvidia-webhook", "--bin", "nvidia-webhook"],
                       cwd=REPO, check=True)
    return binary


def pod(containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "namespace": "ml"}
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {"containers": containers}
    if init is not None:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def c(name: str, limits: dict[str, str] | None = None, requests: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": "img"}
    resources = {}
    if limits is not None:
        resources["limits"] = limits
    if requests is not None:
        resources["requests"] = requests
    if resources:
        out["resources"] = resources
    return out


GPU = {"nvidia.com/gpu": "1"}
PODS: dict[str, dict[str, Any]] = {
    "gpu limit": pod([c("a", limits=GPU)]),
    "gpu request only": pod([c("a", requests=GPU)]),
    "mig resource": pod([c("a", limits={"nvidia.com/mig-1g.10gb": "1"})]),
    "gpu in an init container": pod([c("a")], init=[c("i", limits=GPU)]),
    "no resources": pod([c("a")]),
    "cpu only": pod([c("a", limits={"cpu": "1"})]),
    "similar name": pod([c("a", limits={"nvidia.com/gpu.shared": "1"})]),
    "other vendor": pod([c("a", limits={"amd.com/gpu": "1"})]),
    "empty resources": pod([{"name": "a", "image": "img", "resources": {}}]),
    "empty annotations": pod([c("a", limits=GPU)], annotations={}),
}
for spelling in ["true", "false", "True", "FALSE", " false", "true ", "yes", ""]:
    PODS[f"gpu pod, inject={spelling!r}"] = pod([c("a", limits=GPU)], annotations={f"{P}/inject": spelling})
    PODS[f"plain pod, inject={spelling!r}"] = pod([c("a")], annotations={f"{P}/inject": spelling})


def conditions(case: str) -> list[celpy.Runner]:
    [hook] = one(objects(case), "MutatingWebhookConfiguration")["webhooks"]
    env = celpy.Environment()
    return [env.program(env.compile(condition["expression"])) for condition in hook["matchConditions"]]


def reaches_webhook(programs: list[celpy.Runner], manifest: dict[str, Any]) -> bool:
    activation = {"object": celpy.json_to_cel(manifest)}
    results = [program.evaluate(activation) for program in programs]
    for result in results:
        assert isinstance(result, celpy.celtypes.BoolType), f"a condition did not evaluate to a bool: {result!r}"
    return all(bool(result) for result in results)


def injection_flags(case: str) -> list[str]:
    serve = container(one(objects(case), "Deployment", "webhook"), "containers", "webhook")
    flags = [arg for arg in serve["args"] if arg.split("=")[0] in {
        "--gpu-resources", "--driver-root", "--mount-path", "--wait-timeout", "--installer-image"}]
    assert any(flag.startswith("--gpu-resources=") for flag in flags), serve["args"]
    return flags


@pytest.mark.parametrize("case", webhook_cases())
def test_match_conditions_and_the_webhook_decide_alike(case: str) -> None:
    programs = conditions(case)
    flags = injection_flags(case)
    documents = list(PODS.values())
    result = subprocess.run([str(webhook_binary()), "inject", "-f", "-", *flags],
                            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}),
                            capture_output=True, text=True, check=True)
    injected = json.loads(result.stdout)["items"]
    assert len(injected) == len(documents), result.stdout
    disagree = []
    for (name, manifest), out in zip(PODS.items(), injected):
        by_webhook = "initContainers" in out["spec"] and out["spec"]["initContainers"][0]["name"] == "nvidia-driver-wait"
        by_cel = reaches_webhook(programs, manifest)
        if by_webhook != by_cel:
            disagree.append(f"{name}: CEL {'calls' if by_cel else 'skips'} the webhook, the webhook "
                            f"{'injects' if by_webhook else 'does not inject'}")
    assert not disagree, "\n".join(disagree)

