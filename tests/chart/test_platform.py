"""What a platform team sets on the chart: extra environment, volumes and mounts, pod labels and
annotations, scheduling and resources per workload, a CA for the bucket's endpoint, images pinned by
digest, and the installer's metrics port. Rendered with Helm's own engine and checked field by field;
every rendered object is also validated against the Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import render
from test_chart import (CHART, CHART_DIR, NEWEST, REQUIRED, container, containers, find, flags, one,
                        without_switching)

PLATFORM = CHART_DIR / "ci/platform-values.yaml"
COMPILER_S3_CA = CHART_DIR / "ci/compiler-s3-ca-values.yaml"
SEED_COMPILER = CHART_DIR / "ci/seed-compiler-values.yaml"
S3_CA_DIR = "/etc/nvidia-installer/s3-ca"
S3_CA_FLAG = f"--s3-ca-file={S3_CA_DIR}/ca.crt"
PEM = yaml.safe_load(PLATFORM.read_text())["nvidiaInstaller"]["s3CaBundle"]


def base() -> dict[str, Any]:
    return yaml.safe_load(REQUIRED.read_text())


def with_values(*overrides: dict[str, Any], files: tuple[Path, ...] = (REQUIRED,)) -> list[dict[str, Any]]:
    """Render the values files merged with the overrides; every object is checked against the
    Kubernetes schema (strict) of the newest version on the way."""
    values = render.user_values(files)
    for override in overrides:
        values = render.merge(values, override)
    objs = render.objects(render.render_templates(values))
    for obj in objs:
        if obj["apiVersion"].startswith(("cert-manager.io/", "monitoring.coreos.com/")):
            continue
        kubernetes_validate.validate(obj, NEWEST, strict=True)
    return objs


def fails(*overrides: dict[str, Any], files: tuple[Path, ...] = (REQUIRED,)) -> str:
    with pytest.raises(helm.HelmError) as failure:
        with_values(*overrides, files=files)
    return str(failure.value)


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod(workload)["volumes"]}


EXTRA_ENV = [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
             {"name": "PROXY_TOKEN", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "token"}}}]
EXTRA_VOLUMES = [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}]
EXTRA_MOUNTS = [{"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True}]


def extras(key: str) -> dict[str, Any]:
    return {key: {"extraEnv": EXTRA_ENV, "extraVolumes": EXTRA_VOLUMES, "extraVolumeMounts": EXTRA_MOUNTS}}


# Which containers get a component's extras: (values key, workload component, section, container).
EXTRA_TARGETS = {
    "installer": ("nvidiaInstaller", "installer", {("initContainers", "install")}),
    "device-plugin": ("devicePlugin", "device-plugin", {("containers", "device-plugin")}),
    "webhook": ("webhook", "webhook", {("containers", "webhook")}),
}


# --- extraEnv, extraVolumes, extraVolumeMounts ------------------------------------------------------

@pytest.mark.parametrize("target", EXTRA_TARGETS)
def test_extras_reach_exactly_their_containers(target: str) -> None:
    key, comp, receivers = EXTRA_TARGETS[target]
    objs = with_values(extras(key))
    workload = next(w for w in find(objs, "DaemonSet") + find(objs, "Deployment") if w["metadata"]["labels"]
                    ["app.kubernetes.io/component"] == comp)
    assert volumes(workload)["corp-ca"] == EXTRA_VOLUMES[0]
    for section, c in containers(workload):
        receives = (section, c["name"]) in receivers
        got = env(c)
        assert ("HTTPS_PROXY" in got) == receives, c["name"]
        assert ("/etc/corp-ca" in mounts(c)) == receives, c["name"]
        if receives:
            # Appended after the chart's own, exactly as given.
            assert c["env"][-2:] == EXTRA_ENV
            assert c["volumeMounts"][-1] == EXTRA_MOUNTS[0]
    # Other workloads are untouched.
    for other in find(objs, "DaemonSet") + find(objs, "Deployment"):
        if other is workload:
            continue
        assert "corp-ca" not in volumes(other)


def test_extras_reach_the_compilers_modulus_and_dev_containers() -> None:
    objs = with_values(extras("nvidiaInstaller"), files=(SEED_COMPILER,))
    compiler = one(objs, "DaemonSet", "compiler")
    assert volumes(compiler)["corp-ca"] == EXTRA_VOLUMES[0]
    for section, c in containers(compiler):
        receives = c["name"] in ("modulus", "dev")
        assert ("HTTPS_PROXY" in env(c)) == receives, c["name"]
        assert ("/etc/corp-ca" in mounts(c)) == receives, c["name"]
    modulus = container(compiler, "containers", "modulus")
    assert env(modulus)["PROXY_TOKEN"]["valueFrom"] == EXTRA_ENV[1]["valueFrom"]


def test_extras_also_reach_the_install_step_in_debug_and_compile_modes() -> None:
    for override in ({"debug": True}, {"allowCompilation": True, "gardenlinuxVersion": "1592.6"}):
        objs = with_values(extras("nvidiaInstaller"), override)
        daemonset = one(objs, "DaemonSet", "installer")
        section = "containers" if override.get("debug") else "initContainers"
        install = container(daemonset, section, "install")
        assert "HTTPS_PROXY" in env(install) and "/etc/corp-ca" in mounts(install)
        assert "HTTPS_PROXY" not in env(container(daemonset, "containers", "status"))


def chart_volumes_and_paths(objs: list[dict[str, Any]], comp: str,
                            receivers: set[tuple[str, str]]) -> tuple[set[str], set[str]]:
    workload = next(w for w in find(objs, "DaemonSet") + find(objs, "Deployment")
                    if w["metadata"]["labels"]["app.kubernetes.io/component"] == comp)
    names = set(volumes(workload))
    paths = {m["mountPath"] for section, c in containers(workload) if (section, c["name"]) in receivers
             for m in c.get("volumeMounts", [])}
    return names, paths


# Renders that show every volume and mount path the chart may give each component.
FULL = {
    "installer": [{"allowCompilation": True, "gardenlinuxVersion": "1592.6",
                   "nvidiaInstaller": {"s3CaConfigMap": "ca"}}],
    "device-plugin": [{}],
    "webhook": [{}],
}


@pytest.mark.parametrize("target", EXTRA_TARGETS)
def test_extra_volumes_may_not_take_the_charts_volume_names(target: str) -> None:
    key, comp, receivers = EXTRA_TARGETS[target]
    names, _ = chart_volumes_and_paths(with_values(*FULL[target]), comp, receivers)
    assert names
    for name in sorted(names):
        message = fails(*FULL[target], {key: {"extraVolumes": [{"name": name, "emptyDir": {}}]}})
        assert f"{key}.extraVolumes: {name} is the name of one of the chart's own volumes" in message


def test_compiler_extra_volumes_may_not_take_the_charts_volume_names() -> None:
    signing = {"compiler": {"signingKeySecret": "s", "moduleSigningSecret": "m"},
               "nvidiaInstaller": {"s3CaConfigMap": "ca"}}
    compiler = one(with_values(signing, files=(SEED_COMPILER,)), "DaemonSet", "compiler")
    for name in sorted(volumes(compiler)):
        message = fails(signing, {"nvidiaInstaller": {"extraVolumes": [{"name": name, "emptyDir": {}}]}},
                        files=(SEED_COMPILER,))
        assert f"nvidiaInstaller.extraVolumes: {name} is the name of one of the chart's own volumes" in message
    for _, c in containers(compiler):
        if c["name"] not in ("modulus", "dev"):
            continue
        for path in mounts(c):
            message = fails(signing, {"nvidiaInstaller": {
                "extraVolumes": EXTRA_VOLUMES, "extraVolumeMounts": [{"name": "corp-ca", "mountPath": path}]}},
                files=(SEED_COMPILER,))
            assert f"nvidiaInstaller.extraVolumeMounts: {path} is where the chart mounts its own volumes" in message


@pytest.mark.parametrize("target", EXTRA_TARGETS)
def test_extra_mounts_may_not_take_the_charts_mount_paths(target: str) -> None:
    key, comp, receivers = EXTRA_TARGETS[target]
    _, paths = chart_volumes_and_paths(with_values(*FULL[target]), comp, receivers)
    assert paths
    for path in sorted(paths) + [p + "/" for p in sorted(paths)]:
        message = fails(*FULL[target], {key: {"extraVolumes": EXTRA_VOLUMES,
                                              "extraVolumeMounts": [{"name": "corp-ca", "mountPath": path}]}})
        assert f"{key}.extraVolumeMounts: {path} is where the chart mounts its own volumes" in message


def test_extra_mounts_stay_out_of_the_host_root() -> None:
    for path in ("/host", "/host/etc/ssl/certs", "/host/../host/opt"):
        message = fails({"nvidiaInstaller": {"extraVolumes": EXTRA_VOLUMES,
                                             "extraVolumeMounts": [{"name": "corp-ca", "mountPath": path}]}})
        assert "and /host with everything under it" in message
    # A name that merely starts with "host" is fine.
    with_values({"nvidiaInstaller": {"extraVolumes": EXTRA_VOLUMES,
                                     "extraVolumeMounts": [{"name": "corp-ca", "mountPath": "/hostname-ca"}]}})


def test_extra_mounts_must_mount_an_extra_volume() -> None:
    message = fails({"webhook": {"extraVolumeMounts": [{"name": "tls", "mountPath": "/etc/tls-copy"}]}})
    assert "webhook.extraVolumeMounts: /etc/tls-copy mounts volume tls, which webhook.extraVolumes does not define" \
        in message
    message = fails({"devicePlugin": {"extraVolumes": EXTRA_VOLUMES + EXTRA_VOLUMES}})
    assert "devicePlugin.extraVolumes: corp-ca is defined twice" in message


@pytest.mark.parametrize("bad", [
    {"nvidiaInstaller": {"extraEnv": [{"value": "no name"}]}},
    {"nvidiaInstaller": {"extraEnv": [{"name": "A", "valeu": "typo"}]}},
    {"webhook": {"extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]}},
    {"webhook": {"extraVolumeMounts": [{"name": "x", "mountpath": "/x"}]}},
    {"devicePlugin": {"extraVolumes": [{"configMap": {"name": "no-volume-name"}}]}},
    {"devicePlugin": {"affinity": {"nodeAfinity": {}}}},
    {"webhook": {"podLabels": {"team": 1}}},
    {"webhook": {"podLabels": {"bad key!": "x"}}},
], ids=lambda bad: yaml.safe_dump(bad, default_flow_style=True).strip())
def test_schema_rejects_malformed_extras(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(base(), bad))


# --- pod labels and annotations ---------------------------------------------------------------------

@pytest.mark.parametrize("key,comp", [("nvidiaInstaller", "installer"), ("devicePlugin", "device-plugin"),
                                      ("webhook", "webhook")])
def test_pod_labels_and_annotations_per_workload(key: str, comp: str) -> None:
    objs = with_values({key: {"podLabels": {"team": "gpu"}, "podAnnotations": {"example.com/note": "x"}}})
    for workload in find(objs, "DaemonSet") + find(objs, "Deployment"):
        template = workload["spec"]["template"]["metadata"]
        mine = workload["metadata"]["labels"]["app.kubernetes.io/component"] == comp
        assert (template["labels"].get("team") == "gpu") == mine, workload["metadata"]["name"]
        assert (template.get("annotations", {}).get("example.com/note") == "x") == mine
        # The selector still selects the pods, and the chart's labels are all there.
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["labels"].items()
        assert workload["metadata"]["labels"].items() <= template["labels"].items()


def test_compiler_pods_take_the_installers_labels_and_annotations() -> None:
    compiler = one(with_values({"nvidiaInstaller": {"podLabels": {"team": "gpu"},
                                                    "podAnnotations": {"example.com/note": "x"}}},
                               files=(SEED_COMPILER,)), "DaemonSet", "compiler")
    template = compiler["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "gpu"
    assert template["annotations"] == {"example.com/note": "x"}


@pytest.mark.parametrize("key", ["nvidiaInstaller", "devicePlugin", "webhook"])
@pytest.mark.parametrize("label", ["app.kubernetes.io/component", "app.kubernetes.io/instance", "helm.sh/chart"])
def test_pod_labels_cannot_replace_the_charts(key: str, label: str) -> None:
    message = fails({key: {"podLabels": {label: "other"}}})
    assert f"{key}.podLabels: {label} is one of the chart's own labels" in message


# --- scheduling and resources -------------------------------------------------------------------------

def test_device_plugin_scheduling_follows_the_installer_unless_set() -> None:
    objs = with_values({})
    installer = pod(one(objs, "DaemonSet", "installer"))
    plugin = pod(one(objs, "DaemonSet", "device-plugin"))
    # Plus the requirement that keeps it off a node whose driver is switched (test_upgrade.py).
    assert without_switching(plugin["affinity"]) == installer["affinity"]
    assert plugin["tolerations"] == installer["tolerations"]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "example.com/plugin", "operator": "In", "values": ["nvidia"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                              "labelSelector": {"matchLabels": {"app": "other-plugin"}}}}]}}
    tolerations = [{"key": "example.com/dedicated", "operator": "Exists"}]
    objs = with_values({"devicePlugin": {"affinity": affinity, "tolerations": tolerations}})
    plugin = pod(one(objs, "DaemonSet", "device-plugin"))
    assert without_switching(plugin["affinity"]) == affinity
    assert plugin["tolerations"] == tolerations
    # The installer keeps its own.
    assert pod(one(objs, "DaemonSet", "installer"))["affinity"] == installer["affinity"]
    assert pod(one(objs, "DaemonSet", "installer"))["tolerations"] == installer["tolerations"]


def test_webhook_affinity_and_tolerations() -> None:
    objs = with_values({})
    assert "affinity" not in pod(one(objs, "Deployment", "webhook"))
    v = yaml.safe_load(PLATFORM.read_text())["webhook"]
    deployment = pod(one(with_values(files=(PLATFORM,)), "Deployment", "webhook"))
    assert deployment["affinity"] == v["affinity"]
    assert deployment["tolerations"] == v["tolerations"]
    # The spread over nodes and zones stays.
    assert {c["topologyKey"] for c in deployment["topologySpreadConstraints"]} == \
        {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_resources_of_every_workload() -> None:
    def res(cpu: str) -> dict[str, Any]:
        return {"requests": {"cpu": cpu, "memory": "50Mi"}, "limits": {"memory": "100Mi"}}

    objs = with_values({"nvidiaInstaller": {"installResources": res("1m"), "statusResources": res("2m")},
                        "webhook": {"resources": res("3m"), "certsResources": res("4m")},
                        "devicePlugin": {"resources": res("5m")}})
    installer = one(objs, "DaemonSet", "installer")
    assert container(installer, "initContainers", "install")["resources"] == res("1m")
    assert container(installer, "containers", "status")["resources"] == res("2m")
    webhook = one(objs, "Deployment", "webhook")
    assert container(webhook, "containers", "webhook")["resources"] == res("3m")
    assert container(webhook, "containers", "certs")["resources"] == res("4m")
    plugin = one(objs, "DaemonSet", "device-plugin")
    assert container(plugin, "containers", "device-plugin")["resources"] == res("5m")
    # Every container of every workload has requests and a memory limit.
    for workload in find(objs, "DaemonSet") + find(objs, "Deployment"):
        for _, c in containers(workload):
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


# --- the S3 CA -------------------------------------------------------------------------------------

def s3_ca_users(objs: list[dict[str, Any]]) -> set[str]:
    """Containers that mount the S3 CA, checked for how they mount it and pass it."""
    users = set()
    for workload in find(objs, "DaemonSet") + find(objs, "Deployment"):
        for _, c in containers(workload):
            mount = mounts(c).get(S3_CA_DIR)
            has_flag = S3_CA_FLAG in c.get("args", [])
            assert bool(mount) == has_flag, c["name"]
            if mount:
                assert mount == {"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True}
                users.add(c["name"])
    return users


def test_s3_ca_bundle_is_stored_mounted_and_passed() -> None:
    objs = with_values({"nvidiaInstaller": {"s3CaBundle": PEM}})
    [config_map] = [c for c in find(objs, "ConfigMap") if c["metadata"]["name"].endswith("-s3-ca")]
    assert config_map["metadata"]["namespace"] == render.NAMESPACE
    assert config_map["data"] == {"ca.crt": PEM}
    installer = one(objs, "DaemonSet", "installer")
    assert volumes(installer)["s3-ca"] == {"name": "s3-ca", "configMap": {
        "name": config_map["metadata"]["name"], "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    # The install step talks to the bucket; status, the device plugin and the webhook do not.
    assert s3_ca_users(objs) == {"install"}
    # A changed bundle rolls the installer pods.
    annotations = installer["spec"]["template"]["metadata"]["annotations"]
    other = with_values({"nvidiaInstaller": {"s3CaBundle": PEM.replace("m+XWJFiDHT5KUfM=", "m+XWJFiDHT5KUfN=")}})
    assert annotations["checksum/s3-ca"] != \
        one(other, "DaemonSet", "installer")["spec"]["template"]["metadata"]["annotations"]["checksum/s3-ca"]


def test_s3_ca_from_an_existing_config_map() -> None:
    objs = with_values({"nvidiaInstaller": {"s3CaConfigMap": "corp-ca"}})
    assert find(objs, "ConfigMap") == []
    installer = one(objs, "DaemonSet", "installer")
    assert volumes(installer)["s3-ca"]["configMap"] == {"name": "corp-ca",
                                                        "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert s3_ca_users(objs) == {"install"}
    assert "annotations" not in installer["spec"]["template"]["metadata"]


def test_s3_ca_reaches_the_install_step_in_the_dev_image() -> None:
    objs = with_values({"allowCompilation": True, "gardenlinuxVersion": "1592.6",
                        "nvidiaInstaller": {"s3CaConfigMap": "corp-ca"}})
    assert s3_ca_users(objs) == {"install"}


def test_s3_ca_reaches_modulus_only_in_the_compiler() -> None:
    objs = with_values(files=(COMPILER_S3_CA,))
    assert s3_ca_users(objs) == {"modulus"}
    compiler = one(objs, "DaemonSet", "compiler")
    assert volumes(compiler)["s3-ca"]["configMap"]["name"] == "internal-ca"
    objs = with_values({"nvidiaInstaller": {"s3CaBundle": PEM}}, files=(SEED_COMPILER,))
    assert s3_ca_users(objs) == {"modulus"}
    assert find(objs, "ConfigMap")[0]["data"]["ca.crt"] == PEM


def test_no_s3_ca_by_default() -> None:
    objs = with_values({})
    assert s3_ca_users(objs) == set()
    assert find(objs, "ConfigMap") == []
    assert "s3-ca" not in volumes(one(objs, "DaemonSet", "installer"))


def test_s3_ca_bundle_and_config_map_exclude_each_other() -> None:
    message = fails({"nvidiaInstaller": {"s3CaBundle": PEM, "s3CaConfigMap": "corp-ca"}})
    assert "nvidiaInstaller.s3CaBundle and nvidiaInstaller.s3CaConfigMap are mutually exclusive" in message


@pytest.mark.parametrize("bad", [{"s3CaBundle": "not a certificate"}, {"s3CaConfigMap": "Not_A_Name"}],
                         ids=["bundle", "configmap"])
def test_s3_ca_values_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(base(), {"nvidiaInstaller": bad}))


# --- images ---------------------------------------------------------------------------------------

def test_default_image_tags_are_the_charts_app_version() -> None:
    objs = with_values({})
    app = CHART["appVersion"]
    installer_image = f"ghcr.io/gardenlinux/nvidia-installer:{app}"
    installer = one(objs, "DaemonSet", "installer")
    assert container(installer, "initContainers", "install")["image"] == installer_image
    assert container(installer, "containers", "status")["image"] == installer_image
    webhook = one(objs, "Deployment", "webhook")
    assert flags(container(webhook, "containers", "webhook")["args"])["--installer-image"] == installer_image
    assert container(webhook, "containers", "webhook")["image"] == f"ghcr.io/gardenlinux/nvidia-webhook:{app}"
    assert container(webhook, "containers", "certs")["image"] == f"ghcr.io/gardenlinux/nvidia-webhook:{app}"
    assert container(one(objs, "DaemonSet", "device-plugin"), "initContainers", "wait")["image"] == installer_image


def test_every_image_can_be_pinned_by_digest() -> None:
    digest = {name: "sha256:" + ch * 64 for name, ch in
              (("installer", "a"), ("webhook", "b"), ("plugin", "c"), ("dev", "d"))}
    pinned = {"nvidiaInstaller": {"image": {"digest": digest["installer"]}},
              "webhook": {"image": {"digest": digest["webhook"]}},
              "devicePlugin": {"image": {"digest": digest["plugin"]}},
              "compiler": {"devImage": {"digest": digest["dev"]}},
              "allowCompilation": True, "gardenlinuxVersion": "1592.6"}
    objs = with_values(pinned)
    app = CHART["appVersion"]
    images = {c["image"] for w in find(objs, "DaemonSet") + find(objs, "Deployment") for _, c in containers(w)}
    assert images == {
        f"ghcr.io/gardenlinux/nvidia-installer:{app}@{digest['installer']}",
        f"ghcr.io/gardenlinux/nvidia-webhook:{app}@{digest['webhook']}",
        f"nvcr.io/nvidia/k8s-device-plugin:v0.19.0@{digest['plugin']}",
        f"ghcr.io/gardenlinux/gardenlinux/kmodbuild:1592.6@{digest['dev']}",
    }
    webhook = container(one(objs, "Deployment", "webhook"), "containers", "webhook")
    assert flags(webhook["args"])["--installer-image"] == \
        f"ghcr.io/gardenlinux/nvidia-installer:{app}@{digest['installer']}"
    compiler = one(with_values(pinned, {"forceCompile": True}), "DaemonSet", "compiler")
    assert container(compiler, "containers", "dev")["image"] == \
        f"ghcr.io/gardenlinux/gardenlinux/kmodbuild:1592.6@{digest['dev']}"


@pytest.mark.parametrize("bad", [
    {"devicePlugin": {"image": {"digest": "sha256:abc"}}},
    {"compiler": {"devImage": {"digest": "md5:" + "0" * 32}}},
    {"webhook": {"image": {"digest": "sha256:" + "A" * 64}}},
], ids=["plugin", "dev", "webhook"])
def test_digests_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(base(), bad))


# --- the installer's metrics endpoint ---------------------------------------------------------------

@pytest.mark.parametrize("port", [None, 9500])
def test_status_container_serves_metrics(port: int | None) -> None:
    objs = with_values({"nvidiaInstaller": {"metrics": {"port": port}}} if port else {})
    want = port or 9402
    status = container(one(objs, "DaemonSet", "installer"), "containers", "status")
    assert f"--metrics-listen=0.0.0.0:{want}" in status["args"]
    assert status["ports"] == [{"name": "metrics", "containerPort": want, "protocol": "TCP"}]
    # Only the status container listens.
    for workload in find(objs, "DaemonSet"):
        for _, c in containers(workload):
            if c["name"] != "status":
                assert not any(a.startswith("--metrics-listen") for a in c.get("args", [])), c["name"]


@pytest.mark.parametrize("port", [80, 1023, 65536, "9402"])
def test_metrics_port_is_checked(port: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        render.render_templates(render.merge(base(), {"nvidiaInstaller": {"metrics": {"port": port}}}))
