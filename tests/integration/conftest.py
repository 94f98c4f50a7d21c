"""Fixtures for tests against real Redis: every bus test runs on a single node and on the
three-master cluster, each in a namespace of its own."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from services.core.bus import Bus
from services.core.events import Event, EventType, OrderRequested
from services.core.redisconn import AnyRedis, open_redis, scan_keys
from services.core.settings import BusSettings, CoreSettings
from services.trading import OrderType, Side

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    kind: str  # "single" or "cluster"
    url: str

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"

    def core(self, **overrides: Any) -> CoreSettings:
        return CoreSettings(redis_url=self.url, redis_cluster=self.cluster, **overrides)

    def env(self) -> dict[str, str]:
        return {"ZVT_REDIS_URL": self.url, "ZVT_REDIS_CLUSTER": "true" if self.cluster else "false"}


@pytest.fixture(params=["single", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "single":
        return Target("single", request.getfixturevalue("redis_single_url"))
    return Target("cluster", request.getfixturevalue("redis_cluster_url"))


@pytest.fixture
def cluster_target(redis_cluster_url: str) -> Target:
    return Target("cluster", redis_cluster_url)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus_settings(namespace: str) -> Callable[..., BusSettings]:
    def make(**overrides: Any) -> BusSettings:
        values: dict[str, Any] = {
            "namespace": namespace, "shards": 8, "block_ms": 50, "reclaim_idle_ms": 300,
            "reclaim_interval_ms": 100, "max_deliveries": 3, "lag_interval_s": 0.2,
        }
        values.update(overrides)
        return BusSettings(**values)

    return make


@pytest.fixture
async def redis(target: Target, namespace: str) -> AsyncIterator[AnyRedis]:
    client = await open_redis(target.core())
    yield client
    await delete_namespace(client, namespace)
    await client.aclose()


@pytest.fixture
def bus(redis: AnyRedis, bus_settings: Callable[..., BusSettings]) -> Bus:
    return Bus(redis, bus_settings())


async def delete_namespace(client: AnyRedis, namespace: str) -> None:
    keys = [k async for k in scan_keys(client, f"{namespace}:*")]
    for i in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        for key in keys[i : i + 500]:
            pipe.execute_command("UNLINK", key)
        await pipe.execute()


def order(i: int, portfolio: str | None = None, **extra: Any) -> Event[Any]:
    return Event.new(
        OrderRequested(
            order_id=f"o{i}", client_order_id=f"c{i}", symbol="BTC/USDT", side=Side.BUY,
            order_type=OrderType.MARKET, quantity=Decimal("0.5"),
        ),
        portfolio_id=portfolio or f"pf-{i % 37}",
        **extra,
    )


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, interval: float = 0.05
) -> None:
    """Poll ``check`` (plain or async) until it holds, or fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def handled_counts(client: AnyRedis, bus: Bus) -> dict[str, int]:
    """order id -> committed handlings, as counted by the echo service."""
    counts: dict[str, int] = {}
    for shard in range(bus.keys.shards):
        for oid, n in (await client.hgetall(bus.keys.state(shard, "echo", "handled"))).items():
            counts[oid.decode()] = int(n)
    return counts


async def stream_total(client: AnyRedis, bus: Bus, event_type: EventType) -> int:
    return sum([await client.xlen(bus.keys.stream(s, event_type)) for s in range(bus.keys.shards)])


@pytest.fixture
def spawn_echo(target: Target) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start the echo service as a real process; every one is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(settings: BusSettings, **env: str) -> subprocess.Popen[bytes]:
        full = dict(os.environ)
        full.update(target.env())
        full.update({f"ZVT_BUS_{k.upper()}": str(v) for k, v in settings.model_dump().items() if k != "must_persist_groups"})
        full.update({"ZVT_HTTP_PORT": "0", "ZVT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
        full.update(env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.echo_service"], cwd=ROOT, env=full,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
