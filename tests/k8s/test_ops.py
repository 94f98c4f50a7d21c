"""``python -m services.ops`` against the real API server (``python -m devstack k8s``), the
chart installed with its ops Role, pods Running on kwok's nodes, and consumer-group lag read from
the devstack Redis. Each command is run as an operator runs it: a process with KUBECONFIG."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from services.core.events import EventType
from services.core.keys import Keys
from tests.k8s.conftest import CHART, RELEASE, ROOT, Cluster

pytestmark = pytest.mark.timeout(600)

FULLNAME = f"{RELEASE}-zvt-fleet"
SHARDS = 4


@dataclass(frozen=True)
class Fleet:
    cluster: Cluster
    namespace: str
    env: dict[str, str]

    def ops(self, *args: str, kubeconfig: Path | None = None, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "KUBECONFIG": str(kubeconfig or self.cluster.kubeconfig), **(env or {})}
        return subprocess.run([sys.executable, "-m", "services.ops", "-n", self.namespace, *args], cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=timeout)

    def status(self, **kw: Any) -> dict[str, dict[str, Any]]:
        proc = self.ops("status", "--json", **kw)
        assert proc.returncode == 0, proc.stderr
        return {row["service"]: row for row in map(json.loads, proc.stdout.splitlines())}

    def deployment(self, service: str) -> dict[str, Any]:
        return self.cluster.get("deployment", f"{FULLNAME}-{service}", "-n", self.namespace)  # type: ignore[no-any-return]

    def pods(self, service: str) -> list[dict[str, Any]]:
        items = self.cluster.get("pods", "-n", self.namespace, "-l", f"app.kubernetes.io/component={service}")["items"]
        return [p for p in items if "deletionTimestamp" not in p["metadata"]]


def _wait(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Redis of this module's own (the devstack servers may be busy benchmarking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        _wait("redis-server", lambda: _pings(client), timeout=20)
        yield url
    finally:
        client.close()
        server.kill()
        server.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def fleet(crds: Cluster, redis_url: str) -> Iterator[Fleet]:
    """The chart (default values, ops Role with chaos) in its own namespace, and three entries
    the risk group has not read in a bus namespace of its own."""
    cluster = crds
    namespace = "ops-" + uuid.uuid4().hex[:6]
    cluster.run("kubectl", "create", "namespace", namespace)
    cluster.run("helm", "install", RELEASE, str(CHART), "-n", namespace, "--wait", "--timeout", "180s",
                "--set", "opsRbac.create=true", "--set", "opsRbac.chaos=true")
    bus_namespace = "ops" + uuid.uuid4().hex[:8]
    r = redis.Redis.from_url(redis_url)
    stream = Keys(bus_namespace, SHARDS).stream(1, EventType.ORDER_REQUESTED)
    for i in range(3):
        r.xadd(stream, {"n": str(i)})
    r.xgroup_create(stream, "risk", id="0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZVT_")}
    env.update({"ZVT_REDIS_URL": redis_url, "ZVT_BUS_NAMESPACE": bus_namespace, "ZVT_BUS_SHARDS": str(SHARDS)})
    try:
        yield Fleet(cluster, namespace, env)
    finally:
        r.delete(stream)
        r.close()
        cluster.run("helm", "uninstall", RELEASE, "-n", namespace, "--wait", check=False)
        cluster.run("kubectl", "delete", "namespace", namespace, "--wait=false", check=False)


def _kubeconfig_as(fleet: Fleet, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``service_account`` (a bound token, one hour)."""
    token = fleet.cluster.run("kubectl", "create", "token", service_account, "-n", fleet.namespace,
                              "--duration=1h").stdout.strip()
    config = json.loads(fleet.cluster.kubeconfig.read_text())
    config["users"] = [{"name": service_account, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = service_account
    path.write_text(json.dumps(config))
    return path


class TestStatus:
    def test_status_when_the_fleet_runs_shows_replicas_autoscalers_budgets_and_lag(self, fleet: Fleet) -> None:
        rows = fleet.status()
        assert set(rows) == {"gateway", "risk", "order", "routing", "portfolio", "recorder", "workflows"}
        for name, row in rows.items():
            d = fleet.deployment(name)
            assert row["desired"] == d["spec"]["replicas"] == row["ready"] == row["available"], row
            assert row["autoscaler"]["kind"] == "ScaledObject" and row["autoscaler"]["paused"] is False, row
            assert row["pdb"]["max_unavailable"] == "1", row
        assert rows["risk"]["autoscaler"]["max"] == 16
        assert (rows["risk"]["consumer_group"], rows["risk"]["lag"], rows["risk"]["pending"]) == ("risk", 3, 0)
        assert rows["order"]["lag"] == 0
        assert rows["gateway"]["consumer_group"] is None

    def test_status_when_printed_for_people_is_one_line_per_service(self, fleet: Fleet) -> None:
        proc = fleet.ops("status")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "DESIRED", "READY", "AVAILABLE", "AUTOSCALER", "PDB", "LAG"]
        risk = next(line for line in lines if line.startswith("risk "))
        assert "keda" in risk and "maxUnavailable=1" in risk and "risk: 3 (pending 0)" in risk

    def test_status_when_redis_is_unreachable_still_shows_the_cluster_and_says_why(self, fleet: Fleet) -> None:
        proc = fleet.ops("status", "--json", env={"ZVT_REDIS_URL": "redis://127.0.0.1:1/0", "ZVT_REDIS_TIMEOUT_S": "1"})
        assert proc.returncode == 0, proc.stderr
        assert "lag not read" in proc.stderr
        assert all(json.loads(line)["lag"] is None for line in proc.stdout.splitlines())


class TestSteering:
    def test_scale_when_asked_sets_the_replicas_and_they_run(self, fleet: Fleet) -> None:
        was = fleet.deployment("portfolio")["spec"]["replicas"]
        proc = fleet.ops("scale", "portfolio", "3")
        assert proc.returncode == 0, proc.stderr
        assert f"portfolio: replicas {was} -> 3" in proc.stdout
        assert "ScaledObject" in proc.stderr  # the autoscaler would take it back: said so
        _wait("3 portfolio pods ready", lambda: fleet.deployment("portfolio")["status"].get("readyReplicas") == 3)
        assert fleet.status()["portfolio"]["ready"] == 3
        fleet.ops("scale", "portfolio", str(was))

    def test_autoscaling_when_paused_then_resumed_sets_and_clears_kedas_annotation(self, fleet: Fleet) -> None:
        so = f"{FULLNAME}-routing"
        proc = fleet.ops("autoscaling", "pause", "routing")
        assert proc.returncode == 0, proc.stderr
        annotations = fleet.cluster.get("scaledobject", so, "-n", fleet.namespace)["metadata"].get("annotations", {})
        assert annotations.get("autoscaling.keda.sh/paused") == "true"
        assert fleet.status()["routing"]["autoscaler"]["paused"] is True
        assert fleet.ops("autoscaling", "resume", "routing").returncode == 0
        annotations = fleet.cluster.get("scaledobject", so, "-n", fleet.namespace)["metadata"].get("annotations", {})
        assert "autoscaling.keda.sh/paused" not in annotations
        assert fleet.status()["routing"]["autoscaler"]["paused"] is False

    def test_restart_when_asked_replaces_every_pod(self, fleet: Fleet) -> None:
        before = {p["metadata"]["name"] for p in fleet.pods("order")}
        replicas = fleet.deployment("order")["spec"]["replicas"]
        assert len(before) == replicas
        proc = fleet.ops("restart", "order")
        assert proc.returncode == 0, proc.stderr
        template = fleet.deployment("order")["spec"]["template"]["metadata"]["annotations"]
        assert "kubectl.kubernetes.io/restartedAt" in template
        _wait("order's pods replaced", lambda: (now := {p["metadata"]["name"] for p in fleet.pods("order")})
              and not (now & before) and len(now) == replicas
              and fleet.deployment("order")["status"].get("readyReplicas") == replicas)


class TestChaos:
    def test_chaos_when_the_namespace_is_not_labelled_is_refused(self, fleet: Fleet) -> None:
        fleet.cluster.run("kubectl", "label", "namespace", fleet.namespace, "zvt.io/chaos-", "--overwrite")
        before = {p["metadata"]["name"] for p in fleet.pods("risk")}
        proc = fleet.ops("chaos", "risk", "--kill", "1", "--yes")
        assert proc.returncode == 2
        assert "not labelled zvt.io/chaos=allowed" in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert {p["metadata"]["name"] for p in fleet.pods("risk")} == before

    def test_chaos_when_not_confirmed_is_a_dry_run(self, fleet: Fleet) -> None:
        fleet.cluster.run("kubectl", "label", "namespace", fleet.namespace, "zvt.io/chaos=allowed", "--overwrite")
        before = {p["metadata"]["name"] for p in fleet.pods("risk")}
        proc = fleet.ops("chaos", "risk", "--kill", "1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("dry run: the first round would evict ")
        time.sleep(2)
        assert {p["metadata"]["name"] for p in fleet.pods("risk")} == before

    def test_chaos_when_confirmed_evicts_within_the_budget_and_reports_recovery(self, fleet: Fleet) -> None:
        fleet.cluster.run("kubectl", "label", "namespace", fleet.namespace, "zvt.io/chaos=allowed", "--overwrite")
        assert fleet.ops("scale", "risk", "2").returncode == 0  # KEDA does not run here: it stays at 2
        _wait("two risk pods ready", lambda: fleet.deployment("risk")["status"].get("readyReplicas") == 2)
        _wait("risk's budget allows one disruption", lambda: fleet.status()["risk"]["pdb"]["disruptions_allowed"] == 1)
        before = {p["metadata"]["name"] for p in fleet.pods("risk")}
        # kwok makes an evicted pod's replacement Ready within milliseconds, and the budget then
        # allows a disruption again, even between the round's two evictions (a CI run saw both
        # pass). With the nodes cordoned the replacement stays Pending until the round is over:
        # they are uncordoned once it exists, a little later, so the service can recover.
        nodes = [n["metadata"]["name"] for n in fleet.cluster.get("nodes")["items"]]
        for node in nodes:
            fleet.cluster.run("kubectl", "cordon", node)

        def uncordon_after_the_round() -> None:
            try:
                _wait("the evicted pod's replacement, pending", lambda: len(fleet.pods("risk")) == 2 and any(
                    p["status"].get("phase") == "Pending" for p in fleet.pods("risk")))
                time.sleep(3)
            finally:
                for node in nodes:
                    fleet.cluster.run("kubectl", "uncordon", node)

        uncordon = threading.Thread(target=uncordon_after_the_round)
        uncordon.start()
        try:
            # two asked of two pods, a budget of one: one evicted, one refused by the PodDisruptionBudget
            proc = fleet.ops("chaos", "risk", "--kill", "2", "--every", "1s", "--for", "0", "--seed", "7", "--yes")
        finally:
            uncordon.join()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sum(line.startswith("round 1: evicted ") for line in proc.stdout.splitlines()) == 1, proc.stdout
        assert "refused: it would break the PodDisruptionBudget" in proc.stdout
        assert "1 evicted, 1 refused" in proc.stdout and "recovered in" in proc.stdout
        after = {p["metadata"]["name"] for p in fleet.pods("risk")}
        assert len(after) == 2 and len(after & before) == 1

    def test_chaos_when_it_runs_for_a_while_takes_a_pod_each_round(self, fleet: Fleet) -> None:
        fleet.cluster.run("kubectl", "label", "namespace", fleet.namespace, "zvt.io/chaos=allowed", "--overwrite")
        proc = fleet.ops("chaos", "recorder", "--kill", "1", "--every", "3s", "--for", "7s", "--yes")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "3 round(s)" in proc.stdout and "recovered in" in proc.stdout, proc.stdout


class TestEvents:
    def test_events_when_watched_show_the_fleets_objects_only(self, fleet: Fleet) -> None:
        fleet.cluster.run("kubectl", "create", "deployment", "bystander", "--image=registry.invalid/none:1",
                          "-n", fleet.namespace)
        was = fleet.deployment("portfolio")["spec"]["replicas"]
        fleet.ops("scale", "portfolio", str(was + 1))
        proc = fleet.ops("events", "--for", "4s")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert any("ScalingReplicaSet" in line and f"Deployment/{FULLNAME}-portfolio" in line for line in lines), lines
        assert not any("bystander" in line for line in lines), lines
        only = fleet.ops("events", "--service", "risk", "--for", "1s").stdout.splitlines()
        assert only and all(f"{FULLNAME}-risk" in line for line in only), only
        fleet.ops("scale", "portfolio", str(was))


class TestBadInput:
    def test_ops_when_the_service_is_unknown_says_so_in_one_line(self, fleet: Fleet) -> None:
        proc = fleet.ops("scale", "nosuch", "2")
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("ops: unknown service 'nosuch'") and len(proc.stderr.splitlines()) == 1
        assert "risk" in proc.stderr

    def test_ops_when_no_cluster_answers_says_so_in_one_line(self, fleet: Fleet, tmp_path: Path) -> None:
        config = json.loads(fleet.cluster.kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
        (tmp_path / "kubeconfig").write_text(json.dumps(config))
        proc = fleet.ops("status", kubeconfig=tmp_path / "kubeconfig", timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.startswith("ops: no cluster: cannot reach the API server") and len(proc.stderr.splitlines()) == 1

    def test_ops_when_the_count_is_not_a_number_says_so_in_one_line(self, fleet: Fleet) -> None:
        proc = fleet.ops("scale", "risk", "many")
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "not a whole number" in proc.stderr


class TestRbac:
    def test_ops_role_when_bound_can_show_status_and_scale_but_not_delete_deployments(
        self, fleet: Fleet, tmp_path: Path,
    ) -> None:
        as_ops = _kubeconfig_as(fleet, f"{FULLNAME}-ops", tmp_path / "ops.kubeconfig")
        proc = fleet.ops("status", kubeconfig=as_ops)
        assert proc.returncode == 0, proc.stderr
        assert "risk: 3 (pending 0)" in proc.stdout
        assert fleet.ops("chaos", "risk", kubeconfig=as_ops).returncode == 0  # dry run: reads its namespace
        env = {**fleet.cluster.env, "KUBECONFIG": str(as_ops)}
        can = subprocess.run([str(fleet.cluster.kubectl), "auth", "can-i", "delete", "deployments", "-n", fleet.namespace],
                             capture_output=True, text=True, env=env, timeout=60)
        assert can.stdout.strip() == "no"
        delete = subprocess.run([str(fleet.cluster.kubectl), "delete", "deployment", f"{FULLNAME}-risk",
                                 "-n", fleet.namespace], capture_output=True, text=True, env=env, timeout=60)
        assert delete.returncode != 0 and "forbidden" in delete.stderr.lower(), delete.stderr
        assert fleet.deployment("risk")["metadata"].get("deletionTimestamp") is None

    def test_ops_when_the_account_has_no_role_says_no_permission_in_one_line(self, fleet: Fleet, tmp_path: Path) -> None:
        fleet.cluster.run("kubectl", "create", "serviceaccount", "nobody", "-n", fleet.namespace)
        proc = fleet.ops("status", kubeconfig=_kubeconfig_as(fleet, "nobody", tmp_path / "nobody.kubeconfig"))
        assert proc.returncode == 2
        assert proc.stderr.startswith("ops: no permission to list deployments") and len(proc.stderr.splitlines()) == 1
