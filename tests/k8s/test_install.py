"""The chart on a real API server (``python -m devstack k8s``) with the KEDA and Prometheus
Operator CRDs: it installs with the default values and with each ci/*.yaml, every object
admitted (ScaledObjects, ServiceMonitor and PrometheusRule included), the Deployments' pods
Running on kwok's nodes; an upgrade that changes the config rolls the pods; a value the server
refuses fails the install; an uninstall leaves nothing behind.

No container runs: kwok marks scheduled pods Running and Ready, and the KEDA and Prometheus
Operator controllers are absent, so their objects are admitted and stored, not acted on."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.conftest import CHART, RELEASE, VALUES_FILES, Cluster

pytestmark = pytest.mark.timeout(600)

CI_VALUES = ["default", *(name for name in VALUES_FILES if not name.startswith("k8s/"))]
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
KINDS = ("deployments,replicasets,pods,services,configmaps,serviceaccounts,poddisruptionbudgets,networkpolicies,"
         "horizontalpodautoscalers,roles,rolebindings,scaledobjects,triggerauthentications,servicemonitors,"
         "prometheusrules")


def _values(values: str) -> list[str]:
    return [] if values == "default" else ["-f", str(VALUES_FILES[values])]


def _namespace(cluster: Cluster, prefix: str, values: str = "") -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{values}".lower()).strip("-")[:50]
    cluster.run("kubectl", "create", "namespace", slug)
    return slug


def _wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def _pods_running(cluster: Cluster, ns: str, deployment: dict[str, Any]) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    pods = cluster.get("pods", "-n", ns, "-l", selector)["items"]
    return [p for p in pods if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]]


def _manifest(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    text = cluster.run("helm", "get", "manifest", RELEASE, "-n", ns).stdout
    return [o for o in yaml.safe_load_all(text) if o]


def _platform_priority_classes(cluster: Cluster, rendered: str) -> None:
    """The PriorityClasses the values name: the platform's, like the Secrets (pods naming a
    missing one are refused)."""
    names = {o["spec"]["template"]["spec"]["priorityClassName"] for o in yaml.safe_load_all(rendered)
             if o and o["kind"] == "Deployment" and o["spec"]["template"]["spec"].get("priorityClassName")}
    for name in sorted(names):
        cluster.run("kubectl", "apply", "-f", "-", input=yaml.safe_dump(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": 1000}))


def _left(cluster: Cluster, ns: str) -> list[str]:
    items = cluster.get(KINDS, "-n", ns, "-l", INSTANCE)["items"]
    return [f"{o['kind']}/{o['metadata']['name']}" for o in items]


@pytest.mark.parametrize("values", CI_VALUES)
def test_install_when_values_are_applied_every_object_is_admitted_runs_and_uninstalls_cleanly(
    crds: Cluster, values: str, tmp_path: Path,
) -> None:
    cluster = crds
    ns = _namespace(cluster, "install", values)
    # the server validates every object, custom resources against their CRD schemas (helm's own
    # --dry-run=server lets some CRD schema violations through); the `helm test` pod once its
    # ServiceAccount exists (below)
    rendered = cluster.run("helm", "template", RELEASE, str(CHART), "-n", ns, "--validate", "--skip-tests",
                           *_values(values)).stdout
    cluster.run("kubectl", "apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered)
    _platform_priority_classes(cluster, rendered)

    # helm's --wait also waits for a LoadBalancer's address, which only a cloud gives: there the
    # Deployments are waited for below, as everywhere
    wait = [] if "type: LoadBalancer" in rendered else ["--wait", "--timeout", "180s"]
    cluster.run("helm", "install", RELEASE, str(CHART), "-n", ns, *wait, *_values(values))
    objects = _manifest(cluster, ns)
    kinds = {o["kind"] for o in objects}
    hook = cluster.run("helm", "template", RELEASE, str(CHART), "-n", ns, "--show-only",
                       "templates/tests/test-place-order.yaml", *_values(values), check=False)
    if hook.returncode == 0 and hook.stdout.strip():
        assert "kind: Pod" in hook.stdout
        cluster.run("kubectl", "apply", "--dry-run=server", "-n", ns, "-f", "-", input=hook.stdout)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    live = {(o["kind"], o["metadata"]["name"]) for o in cluster.get("-n", ns, "-f", str(manifest))["items"]}
    assert live == {(o["kind"], o["metadata"]["name"]) for o in objects}

    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert deployments, f"{values}: no Deployment"
    for d in deployments:
        name = d["metadata"]["name"]
        live_d = cluster.get("deployment", name, "-n", ns)
        want = live_d["spec"]["replicas"]
        assert want >= 1
        live_d = _wait(f"{name} ready", lambda n=name, w=want: (
            (x := cluster.get("deployment", n, "-n", ns))["status"].get("readyReplicas") == w and x))
        replicasets = [rs for rs in cluster.get("replicasets", "-n", ns)["items"]
                       if any(ref["name"] == name for ref in rs["metadata"].get("ownerReferences", []))]
        assert len(replicasets) == 1, f"{name}: {len(replicasets)} ReplicaSets"
        running = _wait(f"{name}'s pods Running", lambda d=live_d, w=want: len(_pods_running(cluster, ns, d)) == w
                        and _pods_running(cluster, ns, d))
        assert all(p["spec"]["nodeName"].startswith("kwok-node-") for p in running)
        assert all(p["metadata"]["ownerReferences"][0]["name"] == replicasets[0]["metadata"]["name"] for p in running)

    enabled = values != "minimal-values.yaml"  # minimal turns PDBs, NetworkPolicies and monitoring off
    if enabled:
        assert {"PodDisruptionBudget", "NetworkPolicy"} <= kinds
        assert cluster.get("poddisruptionbudgets", "-n", ns)["items"]
        assert cluster.get("networkpolicies", "-n", ns)["items"]
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    if values in ("default", "full-values.yaml", "loadtest-values.yaml"):
        assert "ScaledObject" in kinds
        assert cluster.get("scaledobjects.keda.sh", "-n", ns)["items"]
    if values == "keda-off-values.yaml":
        assert "ScaledObject" not in kinds and "HorizontalPodAutoscaler" in kinds

    cluster.run("helm", "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    _wait("nothing left", lambda: not _left(cluster, ns), timeout=90)
    assert cluster.run("helm", "list", "-n", ns, "-q").stdout.strip() == ""
    cluster.run("kubectl", "delete", "namespace", ns, "--wait=false")


def test_upgrade_when_the_config_changes_rolls_every_deployments_pods(crds: Cluster) -> None:
    cluster = crds
    ns = _namespace(cluster, "upgrade")
    cluster.run("helm", "install", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "180s")
    before = {d["metadata"]["name"]: d for d in cluster.get("deployments", "-n", ns)["items"]}
    old_pods = {p["metadata"]["name"] for p in cluster.get("pods", "-n", ns)["items"]}
    assert before and old_pods

    cluster.run("helm", "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values", "--set", "logLevel=DEBUG",
                "--wait", "--timeout", "180s")
    config = cluster.get("configmaps", "-n", ns, "-l", INSTANCE)["items"]
    assert any(c.get("data", {}).get("ZVT_LOG_LEVEL") == "DEBUG" for c in config)
    for name, old in before.items():
        new = cluster.get("deployment", name, "-n", ns)
        key = "checksum/config"
        assert new["spec"]["template"]["metadata"]["annotations"][key] != \
            old["spec"]["template"]["metadata"]["annotations"][key], name
        _wait(f"{name} rolled out", lambda n=name: (
            (d := cluster.get("deployment", n, "-n", ns))["status"].get("updatedReplicas") == d["spec"]["replicas"]
            == d["status"].get("readyReplicas") and d["status"].get("observedGeneration") == d["metadata"]["generation"]))
    # every old pod is gone and its replacement runs with the new checksum
    _wait("the old pods gone", lambda: not (old_pods & {p["metadata"]["name"] for p in
                                                        cluster.get("pods", "-n", ns)["items"]}), timeout=120)
    for name in before:
        d = cluster.get("deployment", name, "-n", ns)
        running = _pods_running(cluster, ns, d)
        assert len(running) == d["spec"]["replicas"]
        want = d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert all(p["metadata"]["annotations"]["checksum/config"] == want for p in running)
    cluster.run("helm", "uninstall", RELEASE, "-n", ns, "--wait")
    cluster.run("kubectl", "delete", "namespace", ns, "--wait=false")


def test_install_when_a_value_is_invalid_for_the_server_is_refused_and_leaves_nothing(crds: Cluster) -> None:
    """A pod label value Kubernetes refuses passes the chart's schema and helm's rendering: the
    API server is what says no, naming the field."""
    cluster = crds
    ns = _namespace(cluster, "refused")
    bad = ["--set-json", 'serviceDefaults.podLabels={"zvt.io/team":"trading desk!"}']
    rendered = cluster.run("helm", "template", RELEASE, str(CHART), "-n", ns, *bad).stdout
    dry = cluster.run("kubectl", "apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered, check=False)
    assert dry.returncode != 0
    assert "Invalid value" in dry.stderr and "trading desk!" in dry.stderr, dry.stderr
    proc = cluster.run("helm", "install", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "60s", *bad,
                       check=False)
    assert proc.returncode != 0
    assert "Invalid value" in proc.stderr and "labels" in proc.stderr, proc.stderr
    assert not cluster.get("deployments", "-n", ns)["items"]
    cluster.run("helm", "uninstall", RELEASE, "-n", ns, "--wait", check=False)
    assert not _left(cluster, ns)
    cluster.run("kubectl", "delete", "namespace", ns, "--wait=false")
