"""What the container tests share: podman and buildah with runc, playing pods with `podman kube
play`, the images' and the bundle's names, and the loopback bucket.

Needs what scripts/test-deps installs (podman, buildah, runc, the base image
localhost/debian:bookworm-min) and the binaries scripts/test builds before these tests run:
target/x86_64-unknown-linux-gnu/debug/nvidia-installer (static), target/debug/nvidia-webhook and
target/debug/loopback-s3. Runs as root, as CI does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# render.py of the chart tests: the chart rendered with Helm's own engine.
sys.path.insert(0, str(REPO_ROOT / "tests/chart"))

# The binaries the images copy (paths relative to the repository root, the build context; the
# environment variables name others, e.g. release builds; .dockerignore must let them through).
INSTALLER_BINARY = os.environ.get("CONTAINERS_INSTALLER_BINARY",
                                  "target/x86_64-unknown-linux-gnu/debug/nvidia-installer")
WEBHOOK_BINARY = os.environ.get("CONTAINERS_WEBHOOK_BINARY", "target/debug/nvidia-webhook")
LOOPBACK_S3 = REPO_ROOT / "target/debug/loopback-s3"

# From scripts/test-deps: Debian 12 minbase with CA certificates (the webhook binary built here is
# linked against its glibc, and the app container runs the bundle's glibc nvidia-smi).
BASE_IMAGE = "localhost/debian:bookworm-min"
INSTALLER_IMAGE = "localhost/nvidia-installer:containers-test"
WEBHOOK_IMAGE = "localhost/nvidia-webhook:containers-test"

# The UID and GID the chart runs every unprivileged container as.
CHART_UID = 65532

# The bundle published for the tests: Debian's real NVIDIA user-space files (scripts/test-deps) and
# stand-in modules; the kernel release and Garden Linux version are those the nodes claim.
DRIVER_VERSION = "535.261.03"
KERNEL_RELEASE = "6.1.0-47-amd64"
GARDENLINUX_VERSION = "184.0.0"
BUCKET = "nvidia-drivers"
USERSPACE = REPO_ROOT / ".cache/nvidia-userspace"


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """podman with runc: crun refuses cgroups in hybrid mode, as on the test machines."""
    result = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def logs(container: str) -> str:
    """A container's output, standard output and error together."""
    result = podman("logs", container, check=False)
    return result.stdout + result.stderr


def state(container: str) -> dict[str, Any] | None:
    """The container's State (Status, ExitCode, StartedAt, ...), None while it does not exist."""
    result = podman("container", "inspect", "--format", "{{json .State}}", container, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60, interval: float = 0.2,
             containers: tuple[str, ...] = ()) -> Any:
    """Poll until condition() returns something true; fail naming `what` after timeout seconds, or
    as soon as one of `containers` has exited, with their states and output."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        exited = [name for name in containers if (state(name) or {}).get("Status") == "exited"]
        if exited or time.monotonic() > deadline:
            reason = f"{', '.join(exited)} exited" if exited else f"gave up after {timeout:.0f} s"
            seen = "".join(f"\n--- {name}: {json.dumps(state(name))}\n{logs(name)}" for name in containers)
            raise AssertionError(f"{reason} waiting for {what}{seen}")
        time.sleep(interval)


def remove_pod(name: str) -> None:
    podman("pod", "rm", "--force", "--time", "0", name, check=False)


@contextlib.contextmanager
def played(manifest: list[dict[str, Any]], directory: Path, *, background: bool = False,
           args: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str] | subprocess.CompletedProcess[str]]:
    """`podman kube play` of the manifest's documents; the pods it names are removed afterwards,
    whatever happened. podman plays the init containers before it returns: with background=True
    the play runs in a process of its own (yielded) while the test looks at its containers."""
    pods = [d["metadata"]["name"] for d in manifest if d["kind"] == "Pod"]
    for pod in pods:
        remove_pod(pod)  # left over by an interrupted run
    path = directory / f"{pods[0]}.yaml"
    path.write_text(yaml.safe_dump_all(manifest, sort_keys=False))
    command = ["podman", "--runtime", "runc", "kube", "play", *args, str(path)]
    try:
        if background:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                yield process
            finally:
                if process.poll() is None:
                    process.kill()
                process.communicate()
        else:
            yield subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        for pod in pods:
            remove_pod(pod)


@contextlib.contextmanager
def podman_secret(name: str, data: dict[str, str]) -> Iterator[None]:
    """A Secret as podman 4.3's kube play reads it for secretKeyRef: a podman secret holding a JSON
    map of base64 values (a Secret document in the played YAML is stored in a form its env lookup
    then rejects)."""
    podman("secret", "rm", name, check=False)
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(encoded, file)
        file.flush()
        podman("secret", "create", name, file.name)
    try:
        yield
    finally:
        podman("secret", "rm", name, check=False)


# --- images -----------------------------------------------------------------------------------------

def build_image(containerfile: str, binary: str, tag: str) -> str:
    assert (REPO_ROOT / binary).is_file(), f"{binary} is not built: scripts/test builds it before these tests"
    result = subprocess.run(
        ["buildah", "bud", "--quiet", "--target", "prebuilt", "--build-arg", f"BASE={BASE_IMAGE}",
         "--build-arg", f"BINARY={binary}", "--file", containerfile, "--tag", tag, "."],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"buildah bud -f {containerfile} failed:\n{result.stdout}{result.stderr}"
    return tag


# --- the bucket ---------------------------------------------------------------------------------------

@dataclass
class Bucket:
    """How to reach the loopback S3 server (the JSON line loopback-s3 prints)."""
    endpoint: str
    ca_file: Path
    access_key_id: str
    secret_access_key: str
    region: str
    name: str


@dataclass
class Published:
    """The bundle in the bucket."""
    bucket: Bucket
    sha256: str
    driver_dir: Path


def stand_in_modules(modules: Path) -> None:
    """The three modules as tests/src/fixtures.rs makes them: ELF objects whose .modinfo sections
    hold the strings install checks and plans from (vermagic, depends), no driver code."""
    modules.mkdir(parents=True)
    for name, depends in [("nvidia", ""), ("nvidia-uvm", "nvidia"), ("nvidia-modeset", "nvidia")]:
        modinfo = (f"license=Dual MIT/GPL\0version={DRIVER_VERSION}\0depends={depends}\0"
                   f"name={name.replace('-', '_')}\0vermagic={KERNEL_RELEASE} SMP preempt mod_unload modversions \0")
        info = modules / f"{name}.modinfo"
        info.write_bytes(modinfo.encode())
        subprocess.run(["objcopy", "-I", "binary", "-O", "elf64-x86-64", "--rename-section", ".data=.modinfo",
                        str(info), str(modules / f"{name}.ko")], check=True)
        info.unlink()


# --- the node -----------------------------------------------------------------------------------------

def on_host(host: Path, pod_spec: dict[str, Any]) -> None:
    """Re-point every hostPath volume of a pod spec into the temporary host root."""
    for volume in pod_spec.get("volumes", []):
        if "hostPath" in volume:
            volume["hostPath"]["path"] = str(host / volume["hostPath"]["path"].lstrip("/"))
