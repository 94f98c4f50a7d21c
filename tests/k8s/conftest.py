"""Fixtures of the Kubernetes checks: the real ``helm`` CLI (built once from its Go module by
scripts/build-helm.sh into .cache/tools) and the chart rendered with each values file."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zvt-fleet"
CRDS = ROOT.parent / "shared" / "k8s-crds"
K8S = ROOT / "k8s"
VALUES_FILES = {
    **{p.name: p for p in sorted((CHART / "ci").glob("*.yaml"))},
    **{f"k8s/{p.name}": p for p in sorted(K8S.glob("values-*.yaml"))},
}
VALUES = ["default", *VALUES_FILES]
"""The default values, every charts/zvt-fleet/ci/*.yaml and the k8s/values-*.yaml of the kind
and load-test installs: each is linted, rendered, validated and held to the policies."""
KUBE_VERSIONS = ("1.34.0", "1.36.0")
"""Two supported Kubernetes minor versions the rendered objects must be valid on."""
RELEASE, NAMESPACE = "zvt", "trading"


@dataclass(frozen=True)
class Rendered:
    values: str
    objects: list[dict[str, Any]]
    text: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.values}: {len(found)} {kind} named {name}"
        return found[0]


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary; built on the first run (a few minutes), reused after."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-helm.sh")], capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), proc.stdout
    return path


def values_args(values: str) -> list[str]:
    return [] if values == "default" else ["-f", str(VALUES_FILES[values])]


def render(helm: Path, values: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
         "--kube-version", KUBE_VERSIONS[-1], *values_args(values), *extra],
        capture_output=True, text=True, timeout=120,
    )


_cache: dict[str, Rendered] = {}


@pytest.fixture(params=VALUES)
def rendered(request: pytest.FixtureRequest, helm: Path) -> Rendered:
    values = str(request.param)
    if values not in _cache:
        proc = render(helm, values)
        assert proc.returncode == 0, f"helm template with {values}:\n{proc.stderr}"
        objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
        _cache[values] = Rendered(values, objects, proc.stdout)
    return _cache[values]
