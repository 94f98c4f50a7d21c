"""Abuse limits of the gateway against real Redis (single node and cluster): a per-key order
rate held in Redis (so across replicas), a cap on a key's open ``?wait=`` requests, a bounded
key cache, and bad tokens answered without a Redis round trip each.

Redis commands are counted on the gateway's own client (every command it sends still goes to
the real server); the backlog measure is slowed down so that only requests send any."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.core.bus import Bus
from services.core.events import EventType
from services.core.redisconn import AnyRedis, open_redis, scan_keys
from services.core.settings import BusSettings, CoreSettings
from services.gateway import Gateway, GatewaySettings, create_app
from services.trading.orders import OrderStatus
from tests.integration.conftest import Target, delete_namespace, eventually, stream_total
from tests.integration.test_gateway_api import ADMIN, AUTH, World, assert_problem, order_body, write_terminal

QUIET = {"backlog_interval_s": 60.0}


class Commands:
    """Every command the client sends (``execute_command``, pipelines too), as (name, first key)."""

    def __init__(self, redis: AnyRedis) -> None:
        self.sent: list[tuple[str, str]] = []
        execute = redis.execute_command
        pipeline = redis.pipeline

        async def counted(*args: Any, **options: Any) -> Any:
            self.sent.append(self._name(args))
            return await execute(*args, **options)

        def counted_pipeline(*args: Any, **options: Any) -> Any:
            pipe = pipeline(*args, **options)
            run = pipe.execute

            async def execute_pipe(*a: Any, **k: Any) -> Any:
                stack = getattr(pipe, "command_stack", None) or getattr(pipe, "_command_stack", [])
                for cmd in stack:
                    self.sent.append(self._name(getattr(cmd, "args", cmd[0] if isinstance(cmd, tuple) else ())))
                return await run(*a, **k)

            pipe.execute = execute_pipe
            return pipe

        redis.execute_command = counted  # type: ignore[method-assign]
        redis.pipeline = counted_pipeline  # type: ignore[method-assign]

    @staticmethod
    def _name(args: Any) -> tuple[str, str]:
        parts = [a.decode() if isinstance(a, bytes) else str(a) for a in args[:4]]
        name = parts[0].upper() if parts else "?"
        if name in ("EVALSHA", "EVAL") and len(parts) > 3:
            return name, parts[3]
        return name, parts[1] if len(parts) > 1 else ""

    def count(self, since: int = 0, key_part: str = "") -> int:
        return sum(1 for _, key in self.sent[since:] if key_part in key)

    def mark(self) -> int:
        return len(self.sent)


class Fleet:
    """Gateway replicas over one namespace, each with its own Redis client and app."""

    def __init__(self, target: Target, namespace: str) -> None:
        self.target = target
        self.namespace = namespace
        self.parts: list[tuple[Gateway, httpx.AsyncClient, AnyRedis]] = []

    async def replica(self, **settings: Any) -> tuple[Gateway, httpx.AsyncClient]:
        redis = await open_redis(CoreSettings(redis_url=self.target.url, redis_cluster=self.target.cluster))
        bus = Bus(redis, BusSettings(namespace=self.namespace, shards=4))
        values: dict[str, Any] = {"admin_api_key": ADMIN, "wait_poll_s": 0.2, "wait_block_ms": 200, **QUIET}
        values.update(settings)
        gw = Gateway(bus, GatewaySettings(**values))
        await gw.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(gw)), base_url="http://gateway")
        self.parts.append((gw, http, redis))
        return gw, http

    async def close(self) -> None:
        for gw, http, redis in self.parts:
            await http.aclose()
            await gw.stop()
        if self.parts:
            await delete_namespace(self.parts[0][2], self.namespace)
        for _, _, redis in self.parts:
            await redis.aclose()


@pytest.fixture
async def fleet(target: Target) -> AsyncIterator[Fleet]:
    f = Fleet(target, f"t{uuid.uuid4().hex[:10]}")
    try:
        yield f
    finally:
        await f.close()


async def key(http: httpx.AsyncClient, portfolios: Any, scopes: list[str]) -> dict[str, str]:
    r = await http.post("/v1/api-keys", json={"name": "t", "portfolios": portfolios, "scopes": scopes}, headers=AUTH)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['secret']}"}


async def portfolio(http: httpx.AsyncClient, pid: str) -> None:
    r = await http.put(f"/v1/portfolios/{pid}", json={"balances": {"USDT": "100000"}}, headers=AUTH)
    assert r.status_code in (200, 201), r.text


async def requested(gw: Gateway) -> int:
    return await stream_total(gw.redis, gw.bus, EventType.ORDER_REQUESTED)


def clear_of_window_edge(window_s: int, margin: float = 5.0) -> None:
    """Fixed windows start at multiples of ``window_s`` of the epoch: keep a test off an edge."""
    left = window_s - time.time() % window_s
    if left < margin:
        time.sleep(left + 0.05)


# -- the per-key order rate --------------------------------------------------------------------------------


async def test_order_rate_when_a_key_is_over_its_limit_answers_429_while_other_keys_get_202(fleet: Fleet) -> None:
    gw, http = await fleet.replica(key_order_rate=3, key_order_window_s=3600, retry_after_s=1)
    for pid in ("pf-a", "pf-b"):
        await portfolio(http, pid)
    noisy = await key(http, ["pf-a"], ["trade"])
    quiet = await key(http, ["pf-b"], ["trade"])
    clear_of_window_edge(3600)
    for i in range(3):
        assert (await http.post("/v1/orders", json=order_body("pf-a", f"a{i}"), headers=noisy)).status_code == 202
    for i in range(2):
        r = await http.post("/v1/orders", json=order_body("pf-a", f"a-over-{i}"), headers=noisy)
        problem = assert_problem(r, 429, "rate_limited")
        assert "3" in problem["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 3600
    # the other tenant's key is not pushed into 429
    for i in range(3):
        assert (await http.post("/v1/orders", json=order_body("pf-b", f"b{i}"), headers=quiet)).status_code == 202
    assert await requested(gw) == 6
    # the counter lives under the global namespace and expires with its window
    counters = [k async for k in scan_keys(gw.redis, f"{fleet.namespace}:global:orate:*")]
    assert len(counters) == 2
    assert all(0 < ttl <= 3601 for ttl in [await gw.redis.ttl(k) for k in counters])


async def test_order_rate_when_reached_through_one_replica_holds_in_the_others(fleet: Fleet) -> None:
    _, first = await fleet.replica(key_order_rate=4, key_order_window_s=3600)
    second_gw, second = await fleet.replica(key_order_rate=4, key_order_window_s=3600)
    await portfolio(first, "pf-a")
    trader = await key(first, ["pf-a"], ["trade"])
    clear_of_window_edge(3600)
    for i, http in enumerate((first, second, first, second)):
        assert (await http.post("/v1/orders", json=order_body("pf-a", f"c{i}"), headers=trader)).status_code == 202
    for http in (first, second):
        assert_problem(await http.post("/v1/orders", json=order_body("pf-a", "over"), headers=trader), 429, "rate_limited")
    assert await requested(second_gw) == 4


async def test_order_rate_when_enabled_costs_one_redis_round_trip_per_order(fleet: Fleet) -> None:
    per_order = {}
    for rate in (0, 1_000_000):
        gw, http = await fleet.replica(key_order_rate=rate, key_order_window_s=60)
        await portfolio(http, f"pf-{rate}")
        trader = await key(http, [f"pf-{rate}"], ["trade"])
        await http.post("/v1/orders", json=order_body(f"pf-{rate}", "warm"), headers=trader)  # scripts loaded, key cached
        commands = Commands(gw.redis)
        for i in range(20):
            r = await http.post("/v1/orders", json=order_body(f"pf-{rate}", f"c{i}"), headers=trader)
            assert r.status_code == 202, r.text
        per_order[rate] = commands.count() / 20
    assert per_order[1_000_000] == per_order[0] + 1, per_order


# -- concurrent waits per key ------------------------------------------------------------------------------


async def test_order_wait_when_a_key_has_too_many_open_answers_429_and_submits_nothing(fleet: Fleet) -> None:
    gw, http = await fleet.replica(key_max_waits=2)
    for pid in ("pf-a", "pf-b"):
        await portfolio(http, pid)
    waiter = await key(http, ["pf-a"], ["trade", "read"])
    other = await key(http, ["pf-b"], ["trade", "read"])
    held = [asyncio.create_task(http.post("/v1/orders?wait=10", json=order_body("pf-a", f"w{i}"), headers=waiter))
            for i in range(2)]
    await eventually(lambda: gw.waiters.waiting == 2, timeout=5, interval=0.01)

    r = await http.post("/v1/orders?wait=0.2", json=order_body("pf-a", "third"), headers=waiter)
    assert_problem(r, 429, "too_many_waits")
    assert int(r.headers["retry-after"]) >= 1
    assert await requested(gw) == 2  # the refused one was not submitted
    # without ?wait the same key still trades, and other keys still wait
    assert (await http.post("/v1/orders", json=order_body("pf-a", "no-wait"), headers=waiter)).status_code == 202
    assert (await http.post("/v1/orders?wait=0.2", json=order_body("pf-b", "b"), headers=other)).status_code == 202

    # once the held waits end, the key may wait again
    w = World(http, gw, gw.redis, gw.bus)
    for i in range(2):
        order_id = (await http.post("/v1/orders", json=order_body("pf-a", f"w{i}"), headers=waiter)).json()["order_id"]
        await write_terminal(w, order_id, "pf-a", status=OrderStatus.CANCELED)
    assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]
    assert (await http.post("/v1/orders?wait=0.2", json=order_body("pf-a", "again"), headers=waiter)).status_code == 202


# -- the key cache and bad tokens -------------------------------------------------------------------------


async def test_key_cache_when_full_evicts_the_least_recently_used_not_everything(fleet: Fleet) -> None:
    gw, http = await fleet.replica(key_cache_size=3, key_cache_ttl_s=60)
    await portfolio(http, "pf-a")
    keys = [await key(http, ["pf-a"], ["read"]) for _ in range(4)]
    commands = Commands(gw.redis)

    async def lookups(*which: int) -> int:
        mark = commands.mark()
        for i in which:
            assert (await http.get("/v1/portfolios/pf-a", headers=keys[i])).status_code == 200
        return commands.count(mark, ":global:apikey:")

    assert await lookups(0, 1, 2) == 3
    assert await lookups(0, 1, 2, 0) == 0   # all cached; 0 is now the most recently used
    assert await lookups(3) == 1            # a fourth: the least recently used (1) goes
    assert await lookups(0, 2, 3) == 0      # the others stay
    assert await lookups(1) == 1
    assert len(gw.api_keys._known) == 3


async def test_auth_when_token_cannot_be_a_key_answers_401_without_asking_redis(fleet: Fleet) -> None:
    gw, http = await fleet.replica(key_cache_ttl_s=0, bad_key_cache_ttl_s=0)
    await portfolio(http, "pf-a")
    commands = Commands(gw.redis)
    shapes = ["nope", "zvt_", "zvt_" + "a" * 42, "zvt_" + "a" * 44, "zvt_" + "a" * 42 + "!", "ZVT_" + "a" * 43,
              "x" * 47, "x" * 300, ADMIN + "x", secrets.token_urlsafe(32)]
    for token in shapes:
        for _ in range(3):
            r = await http.get("/v1/portfolios/pf-a", headers={"Authorization": f"Bearer {token}"})
            assert_problem(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
    assert commands.count(0, ":global:apikey") == 0
    # the configured bootstrap secret has no `zvt_` shape and still works
    assert (await http.get("/v1/portfolios/pf-a", headers=AUTH)).status_code == 200


async def test_auth_when_bad_tokens_repeat_answers_401_without_a_redis_round_trip_each(fleet: Fleet) -> None:
    # positive caching off (revocation at once), negative caching on
    gw, http = await fleet.replica(key_cache_ttl_s=0, bad_key_cache_ttl_s=60, key_cache_size=100)
    await portfolio(http, "pf-a")
    good = await key(http, ["pf-a"], ["read"])
    commands = Commands(gw.redis)
    bad = ["zvt_" + secrets.token_urlsafe(32) for _ in range(5)]
    for _ in range(20):
        for token in bad:
            r = await http.get("/v1/portfolios/pf-a", headers={"Authorization": f"Bearer {token}"})
            assert_problem(r, 401, "unauthorized")
    assert commands.count(0, ":global:apikey:") == len(bad)  # one lookup per distinct token
    # a flood of distinct bad tokens stays bounded and does not slow down the good key
    for _ in range(150):
        await http.get("/v1/portfolios/pf-a", headers={"Authorization": f"Bearer zvt_{secrets.token_urlsafe(32)}"})
    assert len(gw.api_keys._unknown) <= 100
    assert (await http.get("/v1/portfolios/pf-a", headers=good)).status_code == 200
