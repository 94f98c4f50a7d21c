"""End-to-end fixtures: the fleet's services as real processes (``devstack.fleet``) on a
namespace of their own, on single Redis and on Redis Cluster."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.fleet import Fleet
from services.core.bus import Bus
from services.core.redisconn import AnyRedis, open_redis
from services.core.settings import BusSettings
from tests.integration.conftest import Target, delete_namespace

ROOT = Path(__file__).resolve().parents[2]

SHARDS = 4


@dataclass
class Stack:
    target: Target
    namespace: str
    env: dict[str, str]
    fleet: Fleet
    redis: AnyRedis
    bus: Bus


def stack_env(target: Target, namespace: str, postgres_dsn: str, **extra: str) -> dict[str, str]:
    return {
        **target.env(),
        "ZVT_BUS_NAMESPACE": namespace,
        "ZVT_BUS_SHARDS": str(SHARDS),
        "ZVT_BUS_BLOCK_MS": "100",
        "ZVT_BUS_RECLAIM_IDLE_MS": "2000",
        "ZVT_BUS_RECLAIM_INTERVAL_MS": "500",
        "ZVT_BUS_LEASE_TTL_MS": "1500",
        "ZVT_BUS_LAG_INTERVAL_S": "0.5",
        "ZVT_BUS_TRIM_INTERVAL_S": "0",
        "ZVT_DRAIN_TIMEOUT_S": "5",
        "ZVT_LOG_LEVEL": "INFO",
        "ZVT_ROUTING_FEED_VOLATILITY": "0",
        "ZVT_RECORDER_POSTGRES_DSN": postgres_dsn,
        "ZVT_GATEWAY_POSTGRES_DSN": postgres_dsn,
        "ZVT_GATEWAY_PORT": "0",
        **extra,
    }


@pytest.fixture(params=["single", "cluster"])
def e2e_target(request: pytest.FixtureRequest) -> Target:
    if request.param == "single":
        return Target("single", request.getfixturevalue("redis_single_url"))
    return Target("cluster", request.getfixturevalue("redis_cluster_url"))


@pytest.fixture
async def stack(e2e_target: Target, postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Stack]:
    namespace = f"e{uuid.uuid4().hex[:10]}"
    env = stack_env(e2e_target, namespace, postgres_dsn)
    fleet = Fleet(env, log_dir=tmp_path / "logs")
    redis = await open_redis(e2e_target.core())
    bus = Bus(redis, BusSettings(namespace=namespace, shards=SHARDS))
    try:
        yield Stack(e2e_target, namespace, env, fleet, redis, bus)
    finally:
        fleet.stop()
        await delete_namespace(redis, namespace)
        await redis.aclose()


def fleet_logs(fleet: Fleet) -> Iterator[tuple[str, str]]:
    for procs in fleet.procs.values():
        for p in procs:
            yield p.label, p.log.read_text(errors="replace")


