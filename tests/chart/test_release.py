"""The GitHub workflows: linted with actionlint (and shellcheck on their scripts), and the release
checked against the chart it publishes: the image names and tags it pushes are the chart's default
image references, the chart goes where the README says, the tag check rejects a tag that is not the
chart's version, and the permissions are the minimal ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

import render
from test_chart import CHART, CONTAINERFILES, REPO_ROOT, container, one

WORKFLOWS = REPO_ROOT / ".github/workflows"
RELEASE = WORKFLOWS / "release.yaml"
CI = WORKFLOWS / "ci.yaml"
BIN = Path(sys.executable).parent
OWNER = "gardenlinux"
# Where the README tells users to take the chart from.
CHART_REFERENCE = f"oci://ghcr.io/{OWNER}/charts/{CHART['name']}"
ALLOWED_PERMISSIONS = {"contents": "read", "packages": "write", "id-token": "write", "attestations": "write"}


def workflow(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as true.
    if True in loaded:
        loaded["on"] = loaded.pop(True)
    return loaded


def step(job: dict[str, Any], **match: str) -> dict[str, Any]:
    [found] = [s for s in job["steps"] if all(s.get(k) == v for k, v in match.items())]
    return found


def uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def expand(template: str, **values: str) -> str:
    """Replace ${{ <expression> }} by values keyed by the expression's last name."""
    def one_expression(m: re.Match[str]) -> str:
        return values[m.group(1).rsplit(".", 1)[-1]]
    return re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", one_expression, template)


# --- actionlint ---------------------------------------------------------------------------------------

def actionlint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = BIN / "actionlint"
    assert binary.exists(), "actionlint is installed from tests/chart/requirements.txt"
    return subprocess.run([str(binary), "-no-color", "-oneline", f"-shellcheck={BIN / 'shellcheck'}",
                           "-pyflakes=", *args], capture_output=True, text=True, input=stdin, cwd=REPO_ROOT)


def test_actionlint_and_shellcheck_report_findings() -> None:
    bad = ("on: push\njobs:\n  j:\n    runs-on: ubuntu-24.04\n    steps:\n"
           "      - run: echo $UNQUOTED\n      - uses: actions/checkout@v5\n        with:\n          fetch-dept: 1\n")
    result = actionlint("-", stdin=bad)
    assert result.returncode == 1
    assert "SC2086" in result.stdout, result.stdout
    assert 'input "fetch-dept" is not defined' in result.stdout, result.stdout


def test_workflows_pass_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {f.name for f in files} == {"ci.yaml", "release.yaml"}
    result = actionlint(*map(str, files))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_actions_are_pinned() -> None:
    for path in (RELEASE, CI):
        for job in workflow(path)["jobs"].values():
            for s in job["steps"]:
                if "uses" in s:
                    assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+|[0-9a-f]{40})", s["uses"]), s["uses"]


# --- the release --------------------------------------------------------------------------------------

def test_release_runs_on_version_tags_with_minimal_permissions() -> None:
    release = workflow(RELEASE)
    assert release["on"] == {"push": {"tags": ["v*"]}}
    assert release["permissions"] == {"contents": "read"}
    for name, job in release["jobs"].items():
        granted = job.get("permissions", {})
        assert granted.items() <= ALLOWED_PERMISSIONS.items(), name
    assert "permissions" not in release["jobs"]["version"]
    # Writing packages and attesting only where something is pushed and attested.
    for name in ("images", "chart"):
        assert release["jobs"][name]["permissions"] == ALLOWED_PERMISSIONS
        assert "version" in release["jobs"][name]["needs"]


def run_tag_check(tmp_path: Path, tag: str, chart_yaml: str) -> tuple[subprocess.CompletedProcess[str], str]:
    script = step(workflow(RELEASE)["jobs"]["version"], id="version")["run"]
    (tmp_path / "chart").mkdir(exist_ok=True)
    (tmp_path / "chart/Chart.yaml").write_text(chart_yaml)
    output = tmp_path / "output"
    output.write_text("")
    env = {"PATH": "/usr/bin:/bin", "GITHUB_REF_NAME": tag, "GITHUB_OUTPUT": str(output),
           "GITHUB_REPOSITORY_OWNER": "GardenLinux"}
    # As GitHub runs a step with `shell: bash`.
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    return result, output.read_text()


def test_release_tag_must_be_the_charts_version(tmp_path: Path) -> None:
    chart_yaml = (render.CHART_DIR / "Chart.yaml").read_text()
    version = CHART["version"]
    assert CHART["appVersion"] == version, "a release needs version == appVersion"
    result, output = run_tag_check(tmp_path, f"v{version}", chart_yaml)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dict(line.split("=", 1) for line in output.splitlines()) == {"version": version, "owner": OWNER}
    # Another tag, or a chart whose version and appVersion differ, stops the release.
    result, output = run_tag_check(tmp_path, "v9.9.9", chart_yaml)
    assert result.returncode == 1 and output == ""
    assert f"needs version and appVersion 9.9.9 in chart/Chart.yaml, which has version {version}" in result.stdout
    bumped = re.sub(r"(?m)^appVersion: .*$", 'appVersion: "9.9.9"', chart_yaml)
    result, _ = run_tag_check(tmp_path, "v9.9.9", bumped)
    assert result.returncode == 1 and "appVersion 9.9.9" in result.stdout
    unquoted = re.sub(r"(?m)^appVersion: .*$", "appVersion: 9.9.9", bumped).replace(f"version: {version}",
                                                                                     "version: 9.9.9")
    result, _ = run_tag_check(tmp_path, "v9.9.9", unquoted)
    assert result.returncode == 0, result.stdout


def test_release_pushes_the_images_the_chart_runs() -> None:
    job = workflow(RELEASE)["jobs"]["images"]
    [build] = uses(job, "docker/build-push-action")
    matrix = job["strategy"]["matrix"]["include"]
    version = CHART["appVersion"]
    pushed = {expand(build["with"]["tags"], owner=OWNER, version=version, image=m["image"]): m["containerfile"]
              for m in matrix}
    # What the chart runs by default, from its own rendering.
    objs = render.render([render.CHART_DIR.parent / "tests/chart/required-values.yaml"])
    installer = container(one(objs, "DaemonSet", "installer"), "containers", "status")["image"]
    webhook = container(one(objs, "Deployment", "webhook"), "containers", "webhook")["image"]
    assert pushed == {installer: str(CONTAINERFILES["nvidiaInstaller"].relative_to(REPO_ROOT)),
                      webhook: str(CONTAINERFILES["webhook"].relative_to(REPO_ROOT))}
    assert build["with"]["context"] == "."
    assert build["with"]["push"] is True


def test_release_images_are_amd64_with_provenance_and_sbom() -> None:
    job = workflow(RELEASE)["jobs"]["images"]
    [build] = uses(job, "docker/build-push-action")
    assert build["with"]["platforms"] == "linux/amd64"
    # Only amd64 because the Containerfiles build an x86_64 binary on amd64 stages; when they no
    # longer do, the platforms above are to be revisited.
    for containerfile in CONTAINERFILES.values():
        text = containerfile.read_text()
        stages = re.findall(r"(?m)^FROM (.*)$", text)
        assert all("--platform=linux/amd64" in s for s in stages if " AS runtime" in s or " AS build" in s)
        assert "x86_64-unknown-linux-gnu" in text
    assert build["with"]["provenance"] == "mode=max"
    assert build["with"]["sbom"] is True
    [attest] = uses(job, "actions/attest-build-provenance")
    assert attest["with"]["subject-digest"] == f"${{{{ steps.{build['id']}.outputs.digest }}}}"
    assert attest["with"]["push-to-registry"] is True
    image = expand(build["with"]["tags"], owner=OWNER, version="X", image="nvidia-installer").rsplit(":", 1)[0]
    assert expand(attest["with"]["subject-name"], owner=OWNER, image="nvidia-installer") == image


def test_release_pushes_the_chart_where_the_readme_says() -> None:
    job = workflow(RELEASE)["jobs"]["chart"]
    assert job["needs"] == ["version", "images"]
    script = step(job, id="push")["run"]
    assert "helm package chart --destination dist" in script
    push = re.search(r'^helm push "dist/([\w.$-]+)\.tgz" "(oci://[^"]+)"', script, re.M)
    assert push, script
    package, target = push.groups()
    env = step(job, id="push")["env"]
    assert env == {"VERSION": "${{ needs.version.outputs.version }}", "OWNER": "${{ needs.version.outputs.owner }}"}
    version = CHART["appVersion"]
    # helm package names the archive <name>-<version>.tgz and helm push appends the chart's name.
    assert package.replace("$VERSION", version) == f"{CHART['name']}-{version}"
    assert f"{target.replace('$OWNER', OWNER)}/{CHART['name']}" == CHART_REFERENCE
    [attest] = uses(job, "actions/attest-build-provenance")
    assert expand(attest["with"]["subject-name"], owner=OWNER) == CHART_REFERENCE.removeprefix("oci://")
    assert CHART_REFERENCE in (REPO_ROOT / "README.md").read_text()


def test_release_scripts_take_untrusted_input_only_through_the_environment() -> None:
    for job in workflow(RELEASE)["jobs"].values():
        for s in job["steps"]:
            assert "${{" not in s.get("run", ""), s.get("name")


# --- CI -----------------------------------------------------------------------------------------------

def test_ci_runs_the_projects_ci_script() -> None:
    ci = workflow(CI)
    assert set(ci["on"]) == {"push", "pull_request"}
    assert ci["permissions"] == {"contents": "read"}
    [job] = ci["jobs"].values()
    assert [s["run"] for s in job["steps"] if s.get("run", "").strip() == ".ci/run"] == [".ci/run"]
    # The Debian 12 that scripts/test-deps installs for, with the workspace's Rust.
    assert job["container"]["image"].endswith(":1.95-bookworm")
    rust = re.search(r'(?m)^rust-version = "([\d.]+)"', (REPO_ROOT / "Cargo.toml").read_text())
    assert rust and job["container"]["image"] == f"docker.io/library/rust:{rust.group(1)}-bookworm"
    assert (REPO_ROOT / ".ci/run").stat().st_mode & 0o111
