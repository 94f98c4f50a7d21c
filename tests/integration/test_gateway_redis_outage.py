"""Redis trouble under a real gateway process: a frozen (SIGSTOP) or killed private
redis-server gets every request a fast ``503`` problem+json with ``Retry-After`` (or the
``401`` it would get anyway), within the request deadline; ``/readyz`` turns false; after
SIGCONT requests succeed again. Never the shared devstack Redis: others' tests use it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.core.redisconn import open_redis
from services.core.settings import CoreSettings
from tests.integration.conftest import eventually
from tests.integration.gateway_proc import ADMIN, PrivateRedis, gateway_process, private_redis

DEADLINE_S = 1.0
SLACK_S = 1.5  # the process's and the client's scheduling under 24 concurrent requests on a busy CI machine
AUTH = {"Authorization": f"Bearer {ADMIN}"}
UNKNOWN_KEY = {"Authorization": "Bearer zvt_" + "A" * 43}  # a minted key's shape: only Redis can tell
BAD_SHAPE = {"Authorization": "Bearer nope"}  # no key at all: 401 without asking Redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path) as server:
        yield server


@pytest.fixture
def gateway(redis_server: PrivateRedis) -> Iterator[str]:
    # every request looks its key up in Redis (no cache), so auth lookups meet the outage too
    with gateway_process(
        redis_server.url, ZVT_GATEWAY_REQUEST_DEADLINE_S=str(DEADLINE_S), ZVT_GATEWAY_KEY_CACHE_TTL_S="0",
        ZVT_GATEWAY_BAD_KEY_CACHE_TTL_S="0",
    ) as base:
        yield base


def order(pid: str, coid: str | None = None) -> dict[str, Any]:
    return {"client_order_id": coid or uuid.uuid4().hex, "portfolio_id": pid, "symbol": "BTC/USDT", "side": "buy",
            "type": "market", "quantity": "0.01"}


async def setup(http: httpx.AsyncClient) -> tuple[dict[str, str], str]:
    """A portfolio, a trade+read key for it, and one order; the key's headers and the order id."""
    r = await http.put("/v1/portfolios/pf-1", json={"balances": {"USDT": "1000"}}, headers=AUTH)
    assert r.status_code == 201, r.text
    r = await http.post("/v1/api-keys", json={"name": "t", "portfolios": ["pf-1"], "scopes": ["trade", "read"]},
                        headers=AUTH)
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['secret']}"}
    r = await http.post("/v1/orders", json=order("pf-1"), headers=key)
    assert r.status_code == 202, r.text
    return key, r.json()["order_id"]


async def burst(http: httpx.AsyncClient, key: dict[str, str], order_id: str) -> list[tuple[str, float, httpx.Response]]:
    """24 concurrent requests of every kind: (what, seconds, answer) each."""
    calls: list[tuple[str, str, str, dict[str, str], Any]] = []
    for _ in range(6):
        calls.append(("POST order", "POST", "/v1/orders", key, order("pf-1")))
    for _ in range(2):
        calls.append(("POST order ?wait", "POST", "/v1/orders?wait=0.5", key, order("pf-1")))
    for _ in range(4):
        calls.append(("GET order", "GET", f"/v1/orders/{order_id}", key, None))
    for _ in range(2):
        calls.append(("GET portfolio", "GET", "/v1/portfolios/pf-1", key, None))
    for _ in range(2):
        calls.append(("GET orders", "GET", "/v1/portfolios/pf-1/orders", key, None))
    for _ in range(2):
        calls.append(("DELETE order", "DELETE", f"/v1/orders/{order_id}", key, None))
    for _ in range(2):
        calls.append(("PUT portfolio", "PUT", "/v1/portfolios/pf-2", AUTH, {"balances": {"USDT": "5"}}))
    for _ in range(2):
        calls.append(("unknown key", "GET", "/v1/portfolios/pf-1", UNKNOWN_KEY, None))
    for _ in range(2):
        calls.append(("bad-shaped key", "GET", "/v1/portfolios/pf-1", BAD_SHAPE, None))

    async def one(what: str, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[str, float, httpx.Response]:
        started = time.monotonic()
        r = await http.request(method, path, headers=headers, json=body)
        return what, time.monotonic() - started, r

    return list(await asyncio.gather(*(one(*c) for c in calls)))


def assert_fast_problems(answers: list[tuple[str, float, httpx.Response]], extra_s: float = 0.0) -> None:
    wrong = []
    for what, seconds, r in answers:
        limit = DEADLINE_S + SLACK_S + (0.5 if "?wait" in what else 0.0) + extra_s
        expected = 401 if what == "bad-shaped key" else 503
        ok = (
            r.status_code == expected and seconds <= limit
            and r.headers.get("content-type", "").startswith("application/problem+json")
            and (expected == 401 or r.headers.get("retry-after", "").isdigit())
        )
        if not ok:
            wrong.append(f"{what}: {r.status_code} {r.headers.get('content-type')} after {seconds:.2f}s "
                         f"retry-after={r.headers.get('retry-after')} {r.text[:120]}")
    assert not wrong, "\n".join(wrong)


async def timed_get(http: httpx.AsyncClient, path: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    r = await http.get(path)
    return time.monotonic() - started, r


async def test_gateway_when_redis_frozen_or_killed_answers_503_within_deadline_and_recovers_on_thaw(
    redis_server: PrivateRedis, gateway: str
) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        key, order_id = await setup(http)
        redis_server.freeze()
        try:
            answers, (ready_s, ready) = await asyncio.gather(burst(http, key, order_id), timed_get(http, "/readyz"))
            # a second round on the connections the first one left behind (and tore down)
            again = await burst(http, key, order_id)
        finally:
            redis_server.thaw()
        assert_fast_problems(answers)
        assert_fast_problems(again)
        assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["checks"]["redis"] is False
        assert ready_s <= DEADLINE_S + SLACK_S

        # thawed: the same calls work again, promptly
        async def healthy() -> bool:
            r = await http.post("/v1/orders", json=order("pf-1"), headers=key)
            return r.status_code == 202 and (await http.get("/readyz")).status_code == 200

        await eventually(healthy, timeout=10, interval=0.1)
        assert (await http.get(f"/v1/orders/{order_id}", headers=key)).status_code == 200
        assert (await http.get("/v1/portfolios/pf-1/orders", headers=key)).status_code == 200

        # killed: connections refused; the same fast answers
        redis_server.kill()
        answers, (ready_s, ready) = await asyncio.gather(burst(http, key, order_id), timed_get(http, "/readyz"))
        assert_fast_problems(answers)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False
        assert ready_s <= DEADLINE_S + SLACK_S
        r = await http.post("/v1/orders", json=order("pf-1"), headers=key)
        assert r.json()["code"] == "redis_unavailable", r.text


async def test_redis_pool_when_more_concurrent_commands_than_connections_waits_for_a_free_one(
    redis_server: PrivateRedis,
) -> None:
    client = await open_redis(CoreSettings(redis_url=redis_server.url))
    try:
        # 600 blocking commands at once on a pool of 512: the last 88 wait for a connection
        replies = await asyncio.gather(
            *(client.blpop(["nothing-here"], timeout=0.3) for _ in range(600)), return_exceptions=True
        )
    finally:
        await client.aclose()
    errors = [r for r in replies if r is not None]
    assert not errors, f"{len(errors)} failed, e.g. {errors[0]!r}"
