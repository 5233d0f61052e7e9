#!/usr/bin/env python3
"""Render the nvidia-installer chart with Helm's own template engine.

helm-python-sdk binds Helm v4's Go SDK, so this renders exactly what `helm template` would, without a
helm binary. Used by the chart tests and, through the command line, by tests in other languages:

    python tests/chart/render.py [--values FILE]... [--set k=v]... [--set-string k=v]...
                                 [--release NAME] [--namespace NS]

prints every rendered object as a YAML stream on stdout (NOTES.txt is left out) and exits 1 with
Helm's message on stderr when the values are rejected or a template fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import helm_python as helm
import yaml
from helm_python import _native

CHART_DIR = Path(__file__).resolve().parents[2] / "chart"
RELEASE = "nvidia-installer"
NAMESPACE = "kube-system"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge user values the way Helm does across -f files and --set: maps merge, anything else
    (lists included) is replaced, and a null is kept so that it removes the chart's default."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def user_values(
    values_files: Iterable[str | Path] = (),
    set_values: Iterable[str] = (),
    set_string_values: Iterable[str] = (),
) -> dict[str, Any]:
    """The user-supplied values: the files in order, then --set, then --set-string."""
    values: dict[str, Any] = {}
    for path in values_files:
        values = merge(values, helm.values_from_yaml(Path(path).read_text()))
    for expression in set_values:
        values = merge(values, helm.parse_set_string(expression))
    for expression in set_string_values:
        values = merge(values, helm.parse_set_string_values(expression))
    return values


def render_templates(
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    chart_dir: str | Path = CHART_DIR,
    kube_version: str | None = None,
    api_versions: Iterable[str] = (),
) -> dict[str, str]:
    """Rendered text per template path, NOTES.txt included. The values are checked against
    values.schema.json first, as `helm install` does. kube_version ("v1.29.0") and api_versions
    ("group/version/Kind") are what .Capabilities then says, as helm template's --kube-version and
    --api-versions set it; by default Helm's own (its newest Kubernetes, API groups without kinds).

    Raises helm_python.HelmValuesError or helm_python.HelmRenderError."""
    with helm.Chart.load(chart_dir) as chart:
        if kube_version is None and not api_versions:
            return chart.render(values or {}, name=release, namespace=namespace, is_install=True)
        # Chart.render does not pass these two of the C SDK's render options on.
        options: dict[str, Any] = {"name": release, "namespace": namespace, "is_install": True,
                                   "api_versions": list(api_versions)}
        if kube_version is not None:
            options["kube_version"] = kube_version
        rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options))
        templates: dict[str, str] = json.loads(rendered)
        return templates


def objects(templates: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects in rendered templates, in template order, without empty documents."""
    found = []
    for path in sorted(templates):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(templates[path]):
            if document:
                found.append(document)
    return found


def notes(templates: dict[str, str]) -> str:
    return next((text for path, text in templates.items() if path.endswith("/NOTES.txt")), "")


def render(
    values_files: Iterable[str | Path] = (),
    set_values: Iterable[str] = (),
    set_string_values: Iterable[str] = (),
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Render the chart with values files and --set expressions; returns the objects."""
    values = user_values(values_files, set_values, set_string_values)
    return objects(render_templates(values, release=release, namespace=namespace))


def to_yaml(rendered: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(rendered, sort_keys=False, explicit_start=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="values file; may be repeated, later files win")
    parser.add_argument("--set", action="append", default=[], metavar="K=V",
                        help="value as with helm --set; may be repeated")
    parser.add_argument("--set-string", action="append", default=[], metavar="K=V",
                        help="value as with helm --set-string; may be repeated")
    parser.add_argument("--release", default=RELEASE, help=f"release name (default {RELEASE})")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"release namespace (default {NAMESPACE})")
    args = parser.parse_args(argv)
    try:
        rendered = render(args.values, args.set, args.set_string,
                          release=args.release, namespace=args.namespace)
    except (helm.HelmError, OSError) as error:
        print(f"render.py: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
