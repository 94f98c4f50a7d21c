"""Fixtures of the Kubernetes checks: the real ``helm`` CLI (built once from its Go module by
scripts/build-helm.sh into ~/.cache/zvt-fleet), the chart rendered with each values file, and a
real control plane (``python -m devstack k8s``: API server, controller manager, scheduler and
kwok's fake nodes, built once by scripts/build-k8s.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
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


# --- the real control plane (python -m devstack k8s) ------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """A running control plane (devstack.k8s, in its own network namespace) as this process
    reaches it: ``kubeconfig`` points at a loopback port forwarded into that namespace."""

    kubeconfig: Path
    helm: Path
    kubectl: Path
    logs: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(self, tool: str, *args: str, input: str | None = None, timeout: float = 180,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = {"helm": self.helm, "kubectl": self.kubectl}[tool]
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=self.env, input=input,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        return proc

    def get(self, *args: str) -> Any:
        return json.loads(self.run("kubectl", "get", "-o", "json", *args).stdout)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Build the control plane and helm before any test that needs them runs (once, cached under
    ~/.cache/zvt-fleet): a cold build takes about 15 minutes, past any one test's timeout."""
    if any("cluster" in getattr(item, "fixturenames", ()) for item in items):
        from devstack import k8s

        k8s.binaries()
        k8s.helm_binary()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One control plane for the session: ``python -m devstack k8s -- sh -c ...`` holds it up
    until its stdin closes (then devstack kills it and removes its state)."""
    from devstack import k8s

    home = k8s.binaries()
    work = tmp_path_factory.mktemp("k8s")
    log = (work / "devstack.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack", "k8s", "--", "sh", "-c", 'echo "$$ $KUBECONFIG $ZVT_K8S_LOGS"; exec cat'],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline().split()
    if len(line) != 3:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(f"devstack k8s did not start:\n{(work / 'devstack.log').read_text()[-5000:]}")
    pid, inner_kubeconfig, logs = int(line[0]), Path(line[1]), Path(line[2])
    forward = k8s.NetnsForward(pid, k8s.API_PORT)
    config = json.loads(inner_kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{forward.port}"
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    kubeconfig.chmod(0o600)
    try:
        yield Cluster(kubeconfig, k8s.helm_binary(), home / "bin" / "kubectl", logs)
    finally:
        forward.close()
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        finally:
            log.close()


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with the KEDA and Prometheus Operator CRDs of ../shared/k8s-crds established."""
    files = sorted(CRDS.glob("*.yaml"))
    args = [a for f in files for a in ("-f", str(f))]
    cluster.run("kubectl", "apply", "--server-side", *args)
    cluster.run("kubectl", "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    return cluster
