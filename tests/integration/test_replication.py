"""Writes confirmed by replicas (``services.core.replication``, ``ZVT_BUS_WAIT_REPLICAS``): the
``WAIT`` goes on the write's own connection to the master that owns the key's slot; too few
replicas is ``NotReplicated`` (the gateway's 503 ``not_replicated``, routing's ``Unavailable``).

The single Redis has no replica, so every wait there reports 0; each master of the local
cluster has exactly one, so a wait for 1 succeeds and a wait for 2 reports 1 (not 3: the
count is the owning master's, not a sum over the masters)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.core.bus import Bus, Unavailable
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.redisconn import AnyRedis, open_redis
from services.core.replication import (
    NotReplicated,
    ReplicaWait,
    ReplicatedScriptBatcher,
    replication_barrier,
    run_replicated,
)
from services.core.settings import BusSettings, CoreSettings
from services.gateway import Gateway, GatewaySettings, create_app
from services.intake import IntakeSettings
from services.routing.stage import RoutingStage
from services.venues.paper import PaperVenue
from tests.integration.conftest import Target, delete_namespace

ADMIN = "admin-secret-for-the-wait-tests-1"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BODY = {"client_order_id": "c-1", "portfolio_id": "pf-1", "symbol": "BTC/USDT", "side": "buy", "type": "market",
        "quantity": "0.5"}


@contextlib.asynccontextmanager
async def redis_on(target: Target) -> AsyncIterator[tuple[AnyRedis, str]]:
    namespace = f"w{uuid.uuid4().hex[:10]}"
    redis = await open_redis(target.core())
    try:
        yield redis, namespace
    finally:
        await delete_namespace(redis, namespace)
        await redis.aclose()


def test_wait_when_not_configured_is_off() -> None:
    assert ReplicaWait.of(BusSettings()) is None
    assert ReplicaWait.of(BusSettings(wait_replicas=1, wait_timeout_ms=80)) == ReplicaWait(1, 80)


async def test_run_replicated_when_single_redis_has_no_replica_reports_not_replicated(redis_single_url: str) -> None:
    async with redis_on(Target("single", redis_single_url)) as (redis, ns):
        key = f"{ns}:{{0}}:k"
        (reply,) = await run_replicated(redis, ReplicaWait(1, 20), [(key, ("SET", key, "v"))])
        assert isinstance(reply, NotReplicated) and reply.acked == 0 and reply.wanted == 1
        assert await redis.get(key) == b"v"  # made on the master: its fate is unknown, not "failed"
        (error,) = await run_replicated(redis, ReplicaWait(1, 20), [(key, ("HSET", key, "f", "v"))])
        assert "WRONGTYPE" in str(error) and not isinstance(error, NotReplicated)


async def test_run_replicated_when_on_cluster_waits_on_each_owning_master(redis_cluster_url: str) -> None:
    async with redis_on(Target("cluster", redis_cluster_url)) as (redis, ns):
        keys = [f"{ns}:{{{shard}}}:k" for shard in range(16)]  # on all three masters
        replies = await run_replicated(redis, ReplicaWait(1, 2000), [(k, ("SET", k, "v")) for k in keys])
        assert replies == [True] * 16
        more = await run_replicated(redis, ReplicaWait(2, 30), [(k, ("INCR", f"{k}:n")) for k in keys])
        assert all(isinstance(r, NotReplicated) and r.acked == 1 for r in more), more
        assert [int(v) for v in await asyncio.gather(*(redis.get(f"{k}:n") for k in keys))] == [1] * 16


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_script_batcher_when_replicated_answers_each_concurrent_call(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_single_url" if kind == "single" else "redis_cluster_url")
    async with redis_on(Target(kind, url)) as (redis, ns):
        script = "return redis.call('INCR', KEYS[1])"
        replicas = 1 if kind == "cluster" else 0  # WAIT 0 returns at once: the path, without replicas
        batcher = ReplicatedScriptBatcher(redis, script, ReplicaWait(replicas, 2000))
        keys = [f"{ns}:{{{i % 16}}}:c" for i in range(200)]
        replies = await asyncio.gather(*(batcher([k], []) for k in keys))
        assert sorted(replies) == sorted(n for shard in range(16) for n in range(1, 1 + keys.count(f"{ns}:{{{shard}}}:c")))
        await redis.script_flush()  # a restarted or failed-over Redis forgot the script
        assert await batcher([keys[0]], []) == keys.count(keys[0]) + 1
        strict = ReplicatedScriptBatcher(redis, script, ReplicaWait(replicas + 1, 20))
        failed = await asyncio.gather(*(strict([k], []) for k in keys[:20]), return_exceptions=True)
        assert all(isinstance(f, NotReplicated) and f.acked == replicas for f in failed), failed


@contextlib.asynccontextmanager
async def gateway_on(target: Target, wait_replicas: int) -> AsyncIterator[tuple[httpx.AsyncClient, AnyRedis, Bus]]:
    async with redis_on(target) as (redis, ns):
        bus = Bus(redis, BusSettings(namespace=ns, shards=4, wait_replicas=wait_replicas, wait_timeout_ms=50))
        gw = Gateway(bus, GatewaySettings(admin_api_key=ADMIN, backlog_interval_s=0.05))  # type: ignore[arg-type]
        await gw.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(gw)), base_url="http://gateway")
        try:
            r = await http.put("/v1/portfolios/pf-1", json={"balances": {"USDT": "100000"}}, headers=AUTH)
            assert r.status_code in (200, 201), r.text
            yield http, redis, bus
        finally:
            await http.aclose()
            await gw.stop()


async def test_gateway_when_no_replica_confirms_the_order_answers_503_not_replicated(redis_single_url: str) -> None:
    async with gateway_on(Target("single", redis_single_url), 1) as (http, redis, bus):
        for _ in range(2):  # the retry finds the order, which is still not on a replica: 503 again
            r = await http.post("/v1/orders", json=BODY, headers=AUTH)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers["retry-after"] == "1"
            body: dict[str, Any] = r.json()
            assert body["code"] == "not_replicated" and "same client_order_id" in body["detail"]
        # the order exists on the master: the retry finds it (and its coid's TTL is rewritten
        # unchanged, so that the retry's WAIT covers it); it is never made twice
        coid = bus.keys.state(bus.keys.shard_of("pf-1"), "coid", "pf-1", "c-1")
        order_id = (await redis.get(coid)).decode()
        assert await redis.get(StateKeys(bus.keys).order("pf-1", order_id))
        assert 0 < int(await redis.ttl(coid)) <= IntakeSettings().idempotency_ttl_s


async def test_gateway_when_a_replica_confirms_the_order_answers_202_then_200(redis_cluster_url: str) -> None:
    async with gateway_on(Target("cluster", redis_cluster_url), 1) as (http, _, _):
        first = await http.post("/v1/orders", json=BODY, headers=AUTH)
        assert first.status_code == 202, first.text
        again = await http.post("/v1/orders", json=BODY, headers=AUTH)
        assert again.status_code == 200 and again.json()["order_id"] == first.json()["order_id"]


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_routing_intent_when_not_confirmed_holds_the_batch_before_any_venue_call(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_single_url" if kind == "single" else "redis_cluster_url")
    async with redis_on(Target(kind, url)) as (redis, ns):
        bus = Bus(redis, BusSettings(namespace=ns, shards=4))
        sk = StateKeys(bus.keys)
        stage = RoutingStage(redis, sk, Marks(redis, bus.keys), [PaperVenue()], replica_wait=ReplicaWait(1, 50))
        key = bus.keys.state(1, "route-intent", "o-1")
        if kind == "single":
            with pytest.raises(Unavailable, match="not confirmed by the Redis replicas"):
                await stage._write_intent(key, "sima")
        else:
            await stage._write_intent(key, "sima")
        assert await redis.get(key) == b"sima"
        assert 0 < int(await redis.ttl(key)) <= 86_400


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_replication_barrier_when_replicas_have_everything_returns(kind: str, request: pytest.FixtureRequest) -> None:
    """The recorder's barrier before it copies a batch to PostgreSQL: a write of its own in each
    shard's slot and a WAIT after it on that master, which covers every earlier write there."""
    url = request.getfixturevalue("redis_single_url" if kind == "single" else "redis_cluster_url")
    async with redis_on(Target(kind, url)) as (redis, ns):
        keys = BusSettings(namespace=ns, shards=16)
        bus = Bus(redis, keys)
        if kind == "single":
            with pytest.raises(NotReplicated):
                await replication_barrier(redis, ReplicaWait(1, 20), bus.keys, [0, 3])
        else:
            await replication_barrier(redis, ReplicaWait(1, 2000), bus.keys, range(16))
            with pytest.raises(NotReplicated) as too_many:
                await replication_barrier(redis, ReplicaWait(2, 20), bus.keys, [0, 0, 5])
            assert too_many.value.acked == 1
        assert int(await redis.pttl(bus.keys.state(0, "replication-barrier"))) > 0
