"""The optional PodMonitor (installer `status` containers) and ServiceMonitor (webhook Service) for
the prometheus-operator: absent by default, validated against the operator's own CRD schemas (the
openAPIV3Schema of crds/, strict: unknown fields are refused as the API server's strict field
validation would), and pointing at what the chart really serves."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

import render
from test_chart import (CASES, CRD_VALIDATED, NEWEST, REQUIRED, container, find, objects, one,
                        selector_matches, values)

CRDS = Path(__file__).resolve().parent / "crds"
PLATFORM = render.CHART_DIR / "ci/platform-values.yaml"
CERT_MANAGER = render.CHART_DIR / "ci/webhook-cert-manager-values.yaml"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the CRD lists the fields (and does not ask
    to keep unknown ones)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def validate(obj: dict[str, Any]) -> None:
    """Against the CRD's schema; the metadata as the ObjectMeta of a Kubernetes object."""
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(schema).validate(obj)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                 NEWEST, strict=True)


def render_with(*files: Path, **overrides: Any) -> list[dict[str, Any]]:
    vals = render.user_values(files)
    for override in overrides.values():
        vals = render.merge(vals, override)
    return render.objects(render.render_templates(vals))


def enabled(**monitor: Any) -> dict[str, Any]:
    return {"metrics": {"podMonitor": {"enabled": True, **monitor},
                        "serviceMonitor": {"enabled": True, **monitor}}}


def monitors(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if (o["apiVersion"], o["kind"]) in CRD_VALIDATED]


# --- the CRDs ---------------------------------------------------------------------------------------

def test_vendored_crds_are_the_ones_rendered() -> None:
    assert set(crd_schemas()) == CRD_VALIDATED


def test_strict_crd_validation_refuses_unknown_and_wrong_fields() -> None:
    monitor = one(render_with(PLATFORM), "PodMonitor", "installer")
    validate(monitor)
    for break_it in (lambda m: m["spec"]["podMetricsEndpoints"][0].update(portName="metrics"),
                     lambda m: m["spec"].update(selectors={}),
                     lambda m: m["spec"]["podMetricsEndpoints"][0].update(scheme="ftp"),
                     lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="30 seconds"),
                     lambda m: m["metadata"].update(label={})):
        broken = copy.deepcopy(monitor)
        break_it(broken)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(broken)


@pytest.mark.parametrize("case", CASES)
def test_rendered_monitors_match_the_crds(case: str) -> None:
    for monitor in monitors(objects(case)):
        validate(monitor)


# --- off by default ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if not values(c)["metrics"]["podMonitor"]["enabled"]
                                  and not values(c)["metrics"]["serviceMonitor"]["enabled"]])
def test_no_monitors_unless_enabled(case: str) -> None:
    assert monitors(objects(case)) == []


def test_defaults_enable_no_monitor() -> None:
    v = values("defaults")["metrics"]
    assert v["podMonitor"]["enabled"] is False and v["serviceMonitor"]["enabled"] is False


def test_no_monitors_without_their_targets() -> None:
    # The compiler instance serves no metrics; a disabled webhook has no Service.
    assert monitors(render_with(render.CHART_DIR / "ci/seed-compiler-values.yaml", on=enabled())) == []
    objs = render_with(REQUIRED, on=enabled(), off={"webhook": {"enabled": False}})
    assert [m["kind"] for m in monitors(objs)] == ["PodMonitor", "PodMonitor"]
    # Without live upgrades there is no upgrade controller to scrape.
    objs = render_with(REQUIRED, on=enabled(), off={"webhook": {"enabled": False}, "upgrade": {"enabled": False}})
    assert [m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors(objs)] == ["installer"]


# --- what they scrape -------------------------------------------------------------------------------

def test_pod_monitor_scrapes_the_status_containers() -> None:
    v = values("platform-values")
    objs = objects("platform-values")
    monitor = one(objs, "PodMonitor", "installer")
    validate(monitor)
    daemonset = one(objs, "DaemonSet", "installer")
    assert monitor["metadata"]["namespace"] == render.NAMESPACE
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [render.NAMESPACE]}
    # It selects the installer pods and no others.
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
                  for w in find(objs, "DaemonSet") + find(objs, "Deployment")}
    selected = {name for name, labels in pod_labels.items() if selector_matches(monitor["spec"]["selector"], labels)}
    assert selected == {daemonset["metadata"]["name"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    status = container(daemonset, "containers", "status")
    [port] = [p for p in status["ports"] if p["name"] == endpoint["port"]]
    assert port["containerPort"] == v["nvidiaInstaller"]["metrics"]["port"] == 9500
    assert f"--metrics-listen=0.0.0.0:{port['containerPort']}" in status["args"]
    assert (endpoint["path"], endpoint["scheme"]) == ("/metrics", "http")
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "10s")
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in endpoint["relabelings"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/component"] == "installer"


def test_pod_monitor_scrapes_the_upgrade_controller() -> None:
    objs = render_with(REQUIRED, on=enabled(interval="15s"), port={"upgrade": {"metrics": {"port": 9600}}})
    monitor = one(objs, "PodMonitor", "upgrade-controller")
    validate(monitor)
    deployment = one(objs, "Deployment", "upgrade-controller")
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
                  for w in find(objs, "DaemonSet") + find(objs, "Deployment")}
    selected = {name for name, labels in pod_labels.items() if selector_matches(monitor["spec"]["selector"], labels)}
    assert selected == {deployment["metadata"]["name"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    controller = container(deployment, "containers", "upgrade-controller")
    [port] = [p for p in controller["ports"] if p["name"] == endpoint["port"]]
    assert port["containerPort"] == 9600
    assert "--metrics-listen=0.0.0.0:9600" in controller["args"]
    assert (endpoint["path"], endpoint["scheme"], endpoint["interval"]) == ("/metrics", "http", "15s")
    assert "relabelings" not in endpoint, "the controller's node says nothing about the rollout"


@pytest.mark.parametrize("files", [(PLATFORM,), (CERT_MANAGER,)], ids=["certs-container", "cert-manager"])
def test_service_monitor_scrapes_the_webhook_over_tls_with_its_ca(files: tuple[Path, ...]) -> None:
    objs = render_with(*files, on=enabled(interval="1m"))
    monitor = one(objs, "ServiceMonitor")
    validate(monitor)
    service = one(objs, "Service", "webhook")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert monitor["metadata"]["namespace"] == namespace
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    assert selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    for other in find(objs, "Service"):
        if other is not service:
            assert not selector_matches(monitor["spec"]["selector"], other["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["scheme"], endpoint["interval"]) == ("/metrics", "https", "1m")
    timeout = render.user_values(files).get("metrics", {}).get("serviceMonitor", {}).get("scrapeTimeout")
    assert endpoint.get("scrapeTimeout") == timeout, "an empty timeout is left to Prometheus"
    tls = endpoint["tlsConfig"]
    assert "insecureSkipVerify" not in tls
    # The CA of the webhook's serving certificate, from the Secret the serving container mounts.
    deployment = one(objs, "Deployment", "webhook")
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["ca"] == {"secret": {"name": volume["secret"]["secretName"], "key": "ca.crt"}}
    # A name the serving certificate carries.
    assert tls["serverName"] == f"{name}.{namespace}.svc"
    if find(objs, "Certificate"):
        serving = next(c for c in find(objs, "Certificate")
                       if c["spec"]["secretName"] == volume["secret"]["secretName"])
        assert tls["serverName"] in serving["spec"]["dnsNames"]
    else:
        certs = container(deployment, "containers", "certs")
        assert f"--service={name}" in certs["args"] and f"--namespace={namespace}" in certs["args"]


@pytest.mark.parametrize("monitor", ["podMonitor", "serviceMonitor"])
def test_monitor_labels_cannot_replace_the_charts(monitor: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render_with(REQUIRED, on={"metrics": {monitor: {"enabled": True,
                                                        "labels": {"app.kubernetes.io/instance": "other"}}}})
    assert f"metrics.{monitor}.labels: app.kubernetes.io/instance is one of the chart's own labels" \
        in str(failure.value)


@pytest.mark.parametrize("bad", [{"interval": "30 s"}, {"scrapeTimeout": "10"}, {"enable": True},
                                 {"labels": {"release": 1}}], ids=str)
def test_monitor_values_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render_with(REQUIRED, bad={"metrics": {"serviceMonitor": bad}})
