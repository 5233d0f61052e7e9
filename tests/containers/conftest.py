"""Fixtures of the container tests: the two images built once per session from binaries built
outside them, the loopback S3 server with a published bundle, and a temporary host root."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from containers_support import (BASE_IMAGE, BUCKET, DRIVER_VERSION, GARDENLINUX_VERSION, INSTALLER_BINARY,
                                INSTALLER_IMAGE, KERNEL_RELEASE, LOOPBACK_S3, REPO_ROOT, USERSPACE, WEBHOOK_BINARY,
                                WEBHOOK_IMAGE, Bucket, Published, build_image, podman, stand_in_modules)


@pytest.fixture(scope="session")
def base_image() -> str:
    assert shutil.which("podman") and shutil.which("buildah"), "podman and buildah: run scripts/test-deps"
    assert podman("image", "exists", BASE_IMAGE, check=False).returncode == 0, \
        f"{BASE_IMAGE} is missing: scripts/test-deps builds it with debootstrap"
    return BASE_IMAGE


@pytest.fixture(scope="session")
def installer_image(base_image: str) -> Iterator[str]:
    yield build_image("installer/Containerfile", INSTALLER_BINARY, INSTALLER_IMAGE)
    podman("rmi", "--force", INSTALLER_IMAGE, check=False)


@pytest.fixture(scope="session")
def webhook_image(base_image: str) -> Iterator[str]:
    yield build_image("webhook/Containerfile", WEBHOOK_BINARY, WEBHOOK_IMAGE)
    podman("rmi", "--force", WEBHOOK_IMAGE, check=False)


@pytest.fixture(scope="session")
def bucket() -> Iterator[Bucket]:
    assert LOOPBACK_S3.is_file(), f"{LOOPBACK_S3} is not built: cargo test builds it"
    server = subprocess.Popen([str(LOOPBACK_S3), "--bucket", BUCKET], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        reach = json.loads(server.stdout.readline())
        yield Bucket(endpoint=reach["endpoint"], ca_file=Path(reach["caFile"]), access_key_id=reach["accessKeyId"],
                     secret_access_key=reach["secretAccessKey"], region=reach["region"], name=reach["bucket"])
    finally:
        # Closing its standard input stops it.
        server.communicate(timeout=30)


@pytest.fixture(scope="session")
def published(bucket: Bucket, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """A bundle of Debian's NVIDIA user-space files, packed and published with the host's
    nvidia-installer as an operator would."""
    assert (USERSPACE / "bin/nvidia-smi").is_file(), f"{USERSPACE} is missing: run scripts/test-deps"
    work = tmp_path_factory.mktemp("bundle")
    driver = work / "driver"
    shutil.copytree(USERSPACE / "bin", driver / "bin", symlinks=True)
    shutil.copytree(USERSPACE / "lib", driver / "lib", symlinks=True)
    stand_in_modules(driver / "modules")
    archive = work / "bundle.tar.zst"
    installer = str(REPO_ROOT / INSTALLER_BINARY)
    subprocess.run([installer, "pack", "--dir", str(driver), "--driver-version", DRIVER_VERSION,
                    "--kernel-release", KERNEL_RELEASE, "--gardenlinux-version", GARDENLINUX_VERSION,
                    "--output", str(archive), "--level", "3"], check=True, capture_output=True, timeout=120)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=bucket.access_key_id, AWS_SECRET_ACCESS_KEY=bucket.secret_access_key)
    subprocess.run([installer, "publish", "--bundle", str(archive), "--gardenlinux-version", GARDENLINUX_VERSION,
                    "--bucket", bucket.name, "--s3-endpoint", bucket.endpoint, "--region", bucket.region,
                    "--s3-ca-file", str(bucket.ca_file)], check=True, capture_output=True, env=env, timeout=120)
    return Published(bucket=bucket, sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), driver_dir=driver)


@pytest.fixture(scope="session")
def host_root() -> Iterator[Path]:
    """A node's root as tests/src/fixtures.rs host_root makes it, readable as a node's is (0755):
    the kernel release, this machine's boot id (the containers share its kernel, and `wait` reads
    the boot id from its own /proc), nothing loaded in /proc/modules, /proc/devices, /dev, /sys/module,
    and a Garden Linux /etc/os-release."""
    root = Path(tempfile.mkdtemp(prefix="containers-host-"))
    try:
        root.chmod(0o755)
        (root / "proc/sys/kernel/random").mkdir(parents=True)
        (root / "proc/sys/kernel/osrelease").write_text(f"{KERNEL_RELEASE}\n")
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text()
        (root / "proc/sys/kernel/random/boot_id").write_text(boot_id)
        (root / "proc/modules").write_text("")
        (root / "proc/devices").write_text("Character devices:\n  1 mem\n  4 tty\n\nBlock devices:\n  8 sd\n")
        (root / "dev").mkdir()
        (root / "sys/module").mkdir(parents=True)
        (root / "etc").mkdir()
        (root / "etc/os-release").write_text(
            f'ID=gardenlinux\nNAME="Garden Linux"\nVERSION_ID={GARDENLINUX_VERSION}\n'
            f"GARDENLINUX_VERSION={GARDENLINUX_VERSION}\n")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
