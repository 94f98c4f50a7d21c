"""devstack against the real processes: idempotent starts, the cluster's shape, failover."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import stack

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((stack.HOST, 0))
        return int(sock.getsockname()[1])


def _pids(component: str) -> tuple[int, ...]:
    return stack.status([component])[0].pids


def _masters(nodes: list[stack.ClusterNode]) -> list[stack.ClusterNode]:
    return [n for n in nodes if n["role"] == "master" and n["slots"] and not n["failed"]]


class TestSingleRedis:
    def test_ensure_single_when_already_running_returns_same_url_and_pid(self, redis_single_url: str) -> None:
        before = _pids("single")

        again = stack.ensure_single()

        assert again == redis_single_url == "redis://127.0.0.1:6390/0"
        assert before and _pids("single") == before

    def test_single_when_started_runs_with_aof_and_no_snapshots(self, redis_single_url: str) -> None:
        assert stack.redis_cli(stack.SINGLE_PORT, "CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
        assert stack.redis_cli(stack.SINGLE_PORT, "CONFIG", "GET", "save").split() == ["save"]


class TestRedisCluster:
    def test_ensure_cluster_when_already_running_keeps_same_pids(self, redis_cluster_url: str) -> None:
        before = _pids("cluster")

        nodes = stack.ensure_cluster()

        assert redis_cluster_url == "redis://127.0.0.1:7101/0"
        assert nodes == [("127.0.0.1", port) for port in range(7101, 7107)]
        assert len(before) == 6 and _pids("cluster") == before

    def test_cluster_when_started_has_three_masters_each_with_one_replica(self, redis_cluster_url: str) -> None:
        nodes = stack.cluster_nodes()

        masters = _masters(nodes)
        replicas = [n for n in nodes if n["role"] == "replica"]
        assert len(nodes) == 6 and all(n["pid"] for n in nodes)
        assert len(masters) == 3
        assert sorted(r["master_port"] or 0 for r in replicas) == sorted(m["port"] for m in masters)

    def test_cluster_when_started_covers_all_slots_on_every_node(self, redis_cluster_url: str) -> None:
        for port in stack.CLUSTER_PORTS:
            info = stack.redis_cli(port, "CLUSTER", "INFO")
            assert "cluster_state:ok" in info
            assert "cluster_slots_ok:16384" in info
        owned = sorted(r for m in _masters(stack.cluster_nodes()) for r in m["slots"])
        assert sum(end - start + 1 for start, end in owned) == 16384
        assert owned[0][0] == 0 and owned[-1][1] == 16383

    @pytest.mark.cluster_chaos
    def test_cluster_when_master_killed_replica_takes_over_and_old_master_rejoins_as_replica(
        self, redis_cluster_url: str
    ) -> None:
        # Exclusive: another test session's ensure_cluster() would otherwise restart the victim
        # before its replica took over.
        with stack.exclusive():
            stack.wait_cluster_ok(30, full_topology=True)
            before = stack.cluster_nodes()
            victim = _masters(before)[0]
            heir = next(n for n in before if n["master_id"] == victim["id"])
            try:
                stack.kill_node(victim["port"])
                stack.wait_cluster_ok(30)

                after_failover = {n["port"]: n for n in stack.cluster_nodes()}
                assert after_failover[heir["port"]]["role"] == "master", (before, after_failover)
                assert after_failover[heir["port"]]["slots"] == victim["slots"]

                stack.start_node(victim["port"])
                stack.wait_cluster_ok(30, full_topology=True)

                rejoined = {n["port"]: n for n in stack.cluster_nodes()}[victim["port"]]
                assert rejoined["role"] == "replica"
                assert rejoined["master_port"] == heir["port"]
            finally:
                stack.ensure_cluster()  # whole again for whatever test runs next


class TestPostgres:
    def test_postgres_when_started_answers_select_1_via_psql(self, postgres_dsn: str) -> None:
        out = subprocess.run(
            [str(stack.PG_BIN / "psql"), "-X", "-tA", postgres_dsn, "-c", "select 1", "-c", "show timezone"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()

        assert postgres_dsn == "postgresql://zvt:zvt@127.0.0.1:15432/zvt"
        assert out == ["1", "UTC"]

    def test_ensure_postgres_when_already_running_returns_same_dsn_and_pid(self, postgres_dsn: str) -> None:
        before = _pids("postgres")

        assert stack.ensure_postgres() == postgres_dsn
        assert before and _pids("postgres") == before


class TestStatus:
    def test_status_when_everything_started_lists_every_component_running(
        self, redis_single_url: str, redis_cluster_url: str, postgres_dsn: str, hatchet_env: dict[str, str]
    ) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "devstack", "status"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        ).stdout

        lines = out.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["redis-single", "running"], ["redis-cluster", "running"], ["postgres", "running"], ["hatchet", "running"]
        ]
        assert redis_single_url in lines[0]
        assert f"{redis_cluster_url} (cluster)" in lines[1]
        assert postgres_dsn in lines[2]
        assert f"grpc://{hatchet_env['ZVT_HATCHET_HOST_PORT']}" in lines[3]


class TestThrowawayRedis:
    def test_start_redis_server_when_given_extra_args_applies_them_last(self, tmp_path: Path) -> None:
        port = _free_port()
        pid = stack.start_redis_server(port, tmp_path / "bench", ["--appendonly", "no", "--maxmemory", "64mb"])
        try:
            assert stack.start_redis_server(port, tmp_path / "bench") == pid
            assert stack.redis_cli(port, "CONFIG", "GET", "appendonly").split() == ["appendonly", "no"]
            assert stack.redis_cli(port, "CONFIG", "GET", "maxmemory").split() == ["maxmemory", str(64 * 1024 * 1024)]
            assert (tmp_path / "bench" / "redis.log").exists()
        finally:
            assert stack.stop_redis_server(port, tmp_path / "bench")
        assert not stack.ping(port)
        assert not stack.stop_redis_server(port, tmp_path / "bench")
