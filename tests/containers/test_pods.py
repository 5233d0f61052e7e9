"""The rendered pods played for real with `podman kube play` (runc), on a temporary host root:

1. the installer DaemonSet's pod, rendered from the README's installer values (the seed's
   chart/ci/seed-installer-values.yaml) pointed at the loopback bucket: its privileged install step
   (with --dry-run: no GPU kernel here) stages the published bundle into the host root's cache and
   prints its plan, and its `status` container reports the node's state;
2. the GPU pod of examples/gpu-deployment.yaml as `nvidia-webhook inject` mutates it: its injected
   `nvidia-driver-wait` init container (non-root, read-only root, no capabilities) holds the pod
   until a ready marker appears on the host, then the app container sees the staged bundle at
   /usr/local/nvidia and its nvidia-smi loads the bundle's libnvidia-ml.so.1 through the injected
   LD_LIBRARY_PATH, failing only for want of a driver.

Where podman 4.3 does not do what a kubelet does, the played pod is adapted and says so
(`kubelet_differences`); everything else is played as rendered.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import render
from containers_support import (BASE_IMAGE, CHART_UID, DRIVER_VERSION, GARDENLINUX_VERSION, INSTALLER_IMAGE,
                                KERNEL_RELEASE, REPO_ROOT, WEBHOOK_BINARY, WEBHOOK_IMAGE, Published, logs, on_host,
                                played, podman, podman_secret, state, wait_for)

INSTALLER_VALUES = REPO_ROOT / "chart/ci/seed-installer-values.yaml"
GPU_WORKLOAD = REPO_ROOT / "examples/gpu-deployment.yaml"
NODE_NAME = "gpu-node-1"
DRIVER_ROOT = "opt/nvidia-installer"
BUNDLE = f"cache/{KERNEL_RELEASE}/{DRIVER_VERSION}"
# Keep init containers after they ran, so that their logs can be read (podman's default removes them).
KEEP_INIT_CONTAINERS = {"io.podman.annotations.init.container.type": "always"}


def kubelet_differences(pod: dict[str, Any]) -> None:
    """What podman 4.3 needs to play a pod as a kubelet would, applied to a Pod:
    - annotations whose values are longer than 63 characters are left out: podman holds annotation
      values to the limit of label values (the chart's checksum/* annotations are 64 hex digits);
    - restartPolicy Never: podman applies the pod's Always to init containers too and restarts them
      after they succeed (a kubelet runs them once);
    - the downward API's spec.nodeName, which podman does not resolve, is resolved here;
    - projected volumes, which podman does not support, become empty directories (the API token:
      install --dry-run makes no API call)."""
    annotations = pod["metadata"].get("annotations", {})
    for key in [key for key, value in annotations.items() if len(value) > 63]:
        del annotations[key]
    spec = pod["spec"]
    spec["restartPolicy"] = "Never"
    for each in spec.get("initContainers", []) + spec["containers"]:
        for env in each.get("env", []):
            if env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                del env["valueFrom"]
                env["value"] = NODE_NAME
    for volume in spec.get("volumes", []):
        if "projected" in volume:
            del volume["projected"]
            volume["emptyDir"] = {}


def as_pod(template: dict[str, Any], name: str, namespace: str) -> dict[str, Any]:
    metadata = copy.deepcopy(template["metadata"])
    metadata.update(name=name, namespace=namespace)
    metadata["annotations"] = {**metadata.get("annotations", {}), **KEEP_INIT_CONTAINERS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": copy.deepcopy(template["spec"])}


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == name]
    return found


def json_objects(text: str) -> list[Any]:
    """The JSON objects in a container's output, single-line or pretty-printed."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        found.append(value)
        at = end
    return found


# --- the installer pod -----------------------------------------------------------------------------------

def installer_manifest(published: Published, host: Path, metrics_port: int) -> list[dict[str, Any]]:
    """The installer release rendered with the README's values, pointed at the loopback bucket and
    the images built here; its DaemonSet's pod template as a Pod on the host root, with the
    chart's other objects the pod uses (the S3 CA's ConfigMap)."""
    bucket = published.bucket
    installer_repository, installer_tag = INSTALLER_IMAGE.rsplit(":", 1)
    webhook_repository, webhook_tag = WEBHOOK_IMAGE.rsplit(":", 1)
    values = render.merge(render.user_values([INSTALLER_VALUES]), {
        "gardenlinuxVersion": GARDENLINUX_VERSION,
        "nvidiaInstaller": {
            "driverVersion": DRIVER_VERSION,
            # This machine's kernel is not the nodes': the release the bundle was built for.
            "kernelRelease": KERNEL_RELEASE,
            "image": {"repository": installer_repository, "tag": installer_tag, "pullPolicy": "Never"},
            "bucket": bucket.name,
            "region": bucket.region,
            "s3Endpoint": bucket.endpoint,
            "s3CaBundle": bucket.ca_file.read_text(),
            # The status container's metrics, on a port free on this machine (host network).
            "metrics": {"port": metrics_port},
        },
        "webhook": {"image": {"repository": webhook_repository, "tag": webhook_tag, "pullPolicy": "Never"}},
    })
    objects = render.objects(render.render_templates(values))
    [daemonset] = [o for o in objects if o["kind"] == "DaemonSet"
                   and o["metadata"]["labels"]["app.kubernetes.io/component"] == "installer"]
    pod = as_pod(daemonset["spec"]["template"], daemonset["metadata"]["name"], daemonset["metadata"]["namespace"])
    spec = pod["spec"]
    kubelet_differences(pod)
    on_host(host, spec)
    # The loopback bucket listens on this machine's 127.0.0.1. With the host's network a kubelet
    # takes container ports as they are; podman refuses to map them, so they are left out (the
    # status container listens on the host all the same).
    spec["hostNetwork"] = True
    for each in spec["containers"]:
        each.pop("ports", None)
    # No NVIDIA kernel module can load here: stage for real, then print the plan.
    container(pod, "install")["args"].append("--dry-run")
    config_maps = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
    return [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] in config_maps] + [pod]


@pytest.fixture(scope="module")
def installer_pod(installer_image: str, published: Published, host_root: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The installer pod played until its status container has reported once; yields what it
    printed and the manifest."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    manifest = installer_manifest(published, host_root, metrics_port)
    pod = manifest[-1]
    name = pod["metadata"]["name"]
    secret = render.user_values([INSTALLER_VALUES])["driverBucketSecret"]
    bucket = published.bucket
    with podman_secret(secret, {"accessKeyId": bucket.access_key_id, "secretAccessKey": bucket.secret_access_key,
                                "bucket": bucket.name}), \
            played(manifest, tmp_path_factory.mktemp("installer-pod")) as play:
        assert play.returncode == 0, f"podman kube play:\n{play.stdout}{play.stderr}"
        status = wait_for("the status container's first report",
                          lambda: [o for o in json_objects(logs(f"{name}-status")) if "driverRoot" in o],
                          containers=(f"{name}-install", f"{name}-status"))
        yield {"pod": pod, "install": logs(f"{name}-install"), "install_state": state(f"{name}-install"),
               "status": status[0], "status_state": state(f"{name}-status"), "metrics_port": metrics_port}


def test_install_step_staged_the_bundle_into_the_host_cache(installer_pod: dict[str, Any], host_root: Path,
                                                             published: Published) -> None:
    assert installer_pod["install_state"]["ExitCode"] == 0, installer_pod["install"]
    driver_root = host_root / DRIVER_ROOT
    cached = driver_root / BUNDLE
    assert os.readlink(driver_root / "current") == BUNDLE
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["driverVersion"] == DRIVER_VERSION and manifest["kernelRelease"] == KERNEL_RELEASE
    # Debian's files, byte for byte, and readable and executable by the workloads' users.
    for path in ["bin/nvidia-smi", "lib/libnvidia-ml.so.1", "lib/libcuda.so.1"]:
        assert (cached / path).read_bytes() == (published.driver_dir / path).read_bytes(), path
    assert (cached / "bin/nvidia-smi").stat().st_mode & 0o005 == 0o005
    assert (cached / f"lib/libnvidia-ml.so.{DRIVER_VERSION}").stat().st_mode & 0o004
    # A dry run marks nothing ready.
    assert not (driver_root / "ready").exists()


def test_install_step_printed_its_dry_run_plan(installer_pod: dict[str, Any]) -> None:
    output = installer_pod["install"]
    assert f"staged /host/{DRIVER_ROOT}/{BUNDLE}" in output, output
    assert "dry run: install would now perform, in this order (nothing below was done):" in output, output
    # "  1. finit_module /host/opt/.../modules/nvidia.ko (nvidia, from the bundle)", ...
    plan = re.findall(r"^\s*\d+\. (.*)$", output, re.MULTILINE)
    loads = [step.split()[1] for step in plan if step.startswith("finit_module ")]
    assert loads == [f"/host/{DRIVER_ROOT}/{BUNDLE}/modules/{module}.ko"
                     for module in ["nvidia", "nvidia-uvm", "nvidia-modeset"]], plan
    assert f"write the ready marker /host/{DRIVER_ROOT}/ready" in plan, plan


def test_install_step_ran_as_rendered(installer_pod: dict[str, Any]) -> None:
    """privileged, as root, with the chart's read-only root: what podman made of the rendered step."""
    name = installer_pod["pod"]["metadata"]["name"]
    inspected = json.loads(podman("container", "inspect", f"{name}-install").stdout)[0]
    assert inspected["HostConfig"]["Privileged"] is True
    assert inspected["Config"]["User"] in ("0", "0:0", "")
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    # The bucket's private CA came through the chart's ConfigMap (s3CaBundle): the download succeeded.
    assert "--s3-ca-file=/etc/nvidia-installer/s3-ca/ca.crt" in inspected["Config"]["Cmd"]
    [ca] = [m for m in inspected["Mounts"] if m["Destination"] == "/etc/nvidia-installer/s3-ca"]
    assert ca["RW"] is False


def test_status_container_reports_the_staged_driver(installer_pod: dict[str, Any]) -> None:
    status = installer_pod["status"]
    assert installer_pod["status_state"]["Status"] == "running"
    assert status["ready"] is False
    assert status["current"] == BUNDLE
    assert [(s["kernelRelease"], s["driverVersion"]) for s in status["staged"]] == [(KERNEL_RELEASE, DRIVER_VERSION)]
    assert "not loaded yet" in status["reason"], status


def test_status_container_serves_the_node_metrics(installer_pod: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{installer_pod['metrics_port']}/metrics"
    text = wait_for(f"GET {url}", lambda: fetch(url))
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples.get("nvidia_installer_driver_ready") == "0", text
    assert samples.get("nvidia_installer_cached_bundles") == "1", text


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


# --- the GPU pod ------------------------------------------------------------------------------------------

def gpu_manifest(host: Path) -> dict[str, Any]:
    """examples/gpu-deployment.yaml as the webhook mutates it, its pod template as a Pod on the host
    root; the workload's images replaced by the Debian base (glibc, a shell)."""
    injected = subprocess.run([str(REPO_ROOT / WEBHOOK_BINARY), "inject", "-f", str(GPU_WORKLOAD),
                               "--installer-image", INSTALLER_IMAGE, "--image-pull-policy", "Never"],
                              capture_output=True, text=True, check=True, timeout=60)
    [deployment] = [d for d in yaml.safe_load_all(injected.stdout) if d]
    pod = as_pod(deployment["spec"]["template"], deployment["metadata"]["name"], deployment["metadata"]["namespace"])
    spec = pod["spec"]
    kubelet_differences(pod)
    on_host(host, spec)
    for app in spec["containers"]:
        app["image"] = BASE_IMAGE
        app["imagePullPolicy"] = "Never"
    container(pod, "cuda")["command"] = ["sh", "-c", "echo started; exec sleep infinity"]
    return pod


def write_ready_marker(host: Path, published: Published) -> None:
    """The marker as install writes it once the driver works (installer/src/node/ready.rs):
    pretty JSON, written to a temporary file beside it, synced, then renamed over it."""
    driver_root = host / DRIVER_ROOT
    marker = {
        "driverVersion": DRIVER_VERSION,
        "kernelRelease": KERNEL_RELEASE,
        "sha256": published.sha256,
        "readyAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bootId": (host / "proc/sys/kernel/random/boot_id").read_text().strip(),
        "bundle": BUNDLE,
    }
    temporary = driver_root / f".ready.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(marker, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, 0o644)
    os.rename(temporary, driver_root / "ready")


@pytest.fixture(scope="module")
def gpu_pod(installer_pod: dict[str, Any], published: Published, host_root: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The injected GPU pod played after the installer staged the bundle: observed while its init
    container waits, then after the ready marker is written; yields the observations with the pod
    still running."""
    pod = gpu_manifest(host_root)
    name = pod["metadata"]["name"]
    wait, app = f"{name}-nvidia-driver-wait", f"{name}-cuda"
    seen: dict[str, Any] = {"pod": pod, "wait": wait, "app": app, "sidecar": f"{name}-metrics-sidecar"}
    with played([pod], tmp_path_factory.mktemp("gpu-pod"), background=True, args=("--network", "none")) as play:
        wait_for("the injected init container to run", lambda: (state(wait) or {}).get("Status") == "running",
                 containers=(wait,))
        # The driver is staged, not ready: the wait must hold the pod.
        time.sleep(3)
        seen["waiting"] = {"wait": state(wait), "app": state(app), "logs": logs(wait), "play": play.poll()}
        write_ready_marker(host_root, published)
        output, _ = play.communicate(timeout=120)
        seen["played"] = {"returncode": play.returncode, "output": output}
        wait_for("the app container to run", lambda: (state(app) or {}).get("Status") == "running", timeout=30,
                 containers=(wait, app))
        seen["ready"] = {"wait": state(wait), "logs": logs(wait), "app": state(app)}
        yield seen


def test_injected_wait_runs_unprivileged(gpu_pod: dict[str, Any]) -> None:
    """The init container as injected: 65532, read-only root, no capabilities, the driver root
    read-only."""
    inspected = json.loads(podman("container", "inspect", gpu_pod["wait"]).stdout)[0]
    assert inspected["Config"]["User"] == f"{CHART_UID}:{CHART_UID}"
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert inspected["EffectiveCaps"] in (None, [])
    [mount] = [m for m in inspected["Mounts"] if m["Destination"] == f"/host/{DRIVER_ROOT}"]
    assert mount["RW"] is False


def test_gpu_pod_waits_while_the_driver_is_not_ready(gpu_pod: dict[str, Any]) -> None:
    waiting = gpu_pod["waiting"]
    assert waiting["wait"]["Status"] == "running", waiting
    assert waiting["play"] is None, "podman kube play returned before the init container finished"
    # The app container exists but has never started.
    assert waiting["app"] is None or (waiting["app"]["Status"] == "created"
                                      and waiting["app"]["StartedAt"].startswith("0001-01-01")), waiting["app"]
    assert "waiting for the NVIDIA driver" in waiting["logs"], waiting["logs"]
    assert f"driver {DRIVER_VERSION} is staged for kernel {KERNEL_RELEASE} but not loaded yet" in waiting["logs"]


def test_gpu_pod_starts_once_the_driver_is_ready(gpu_pod: dict[str, Any]) -> None:
    played_, ready = gpu_pod["played"], gpu_pod["ready"]
    assert played_["returncode"] == 0, played_["output"]
    assert ready["wait"]["Status"] == "exited" and ready["wait"]["ExitCode"] == 0, ready["logs"]
    assert f"NVIDIA driver {DRIVER_VERSION} is ready (kernel {KERNEL_RELEASE}" in ready["logs"], ready["logs"]
    assert ready["app"]["Status"] == "running"


def exec_in(container_name: str, *command: str) -> subprocess.CompletedProcess[str]:
    return podman("exec", container_name, *command, check=False, timeout=60)


def test_app_sees_the_bundle_read_only(gpu_pod: dict[str, Any]) -> None:
    app = gpu_pod["app"]
    listed = exec_in(app, "ls", "-l", "/usr/local/nvidia/bin/nvidia-smi", "/usr/local/nvidia/lib/libnvidia-ml.so.1",
                     "/usr/local/nvidia/lib64/libnvidia-ml.so.1")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    written = exec_in(app, "touch", "/usr/local/nvidia/bin/x")
    assert written.returncode != 0 and "Read-only file system" in written.stderr, written
    library_path = exec_in(app, "sh", "-c", 'echo "$LD_LIBRARY_PATH"')
    assert library_path.stdout.strip() == "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"


def test_nvidia_smi_loads_the_bundles_nvml_and_finds_no_driver(gpu_pod: dict[str, Any]) -> None:
    """nvidia-smi loads libnvidia-ml.so.1 from the bundle through the injected LD_LIBRARY_PATH and
    fails only because no driver is loaded; without the path it does not find the library, so it
    is the injection that makes it load."""
    app = gpu_pod["app"]
    smi = exec_in(app, "/usr/local/nvidia/bin/nvidia-smi")
    output = smi.stdout + smi.stderr
    assert smi.returncode != 0, output
    assert "error while loading shared libraries" not in output, output
    assert "couldn't find libnvidia-ml.so" not in output, output
    assert "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver" in output, output
    without = exec_in(app, "env", "-u", "LD_LIBRARY_PATH", "/usr/local/nvidia/bin/nvidia-smi")
    assert "couldn't find libnvidia-ml.so" in without.stdout + without.stderr, without


def test_sidecar_without_a_gpu_gets_no_driver(gpu_pod: dict[str, Any]) -> None:
    sidecar = gpu_pod["sidecar"]
    assert state(sidecar)["Status"] == "running"
    assert exec_in(sidecar, "test", "-e", "/usr/local/nvidia").returncode == 1
