"""Finished orders leave Redis after their retention and the API still serves them (issue 12.4).

The fleet (risk, order, routing, portfolio, recorder, gateway) runs as processes with a
two-second ``ZVT_ORDER_TERMINAL_RETENTION_S``. An order that filled is gone from Redis (record
and orders-index entry) once that has passed, and ``GET /v1/orders/{id}`` and the portfolio's
order list rebuild it from the event store with the same fields the live record had; a cancel
of it is a 409, another key's view of it a 404. The shards' open-order indexes hold no order
once every order has finished."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.fleet import Fleet, logged
from services.core.bus import Bus
from services.core.hotstate import StateKeys
from services.core.redisconn import AnyRedis, open_redis
from services.core.settings import BusSettings
from tests.e2e.conftest import SHARDS, stack_env
from tests.integration.conftest import Target, delete_namespace, eventually

ADMIN = "ret-admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN}"}
RETENTION_S = 2


@dataclass
class Live:
    http: httpx.AsyncClient
    redis: AnyRedis
    bus: Bus

    @property
    def state(self) -> StateKeys:
        return StateKeys(self.bus.keys)


@pytest.fixture
async def live(redis_single_url: str, postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Live]:
    target = Target("single", redis_single_url)
    namespace = f"o{uuid.uuid4().hex[:10]}"
    env = stack_env(
        target, namespace, postgres_dsn, ZVT_GATEWAY_ADMIN_API_KEY=ADMIN,
        ZVT_ORDER_TERMINAL_RETENTION_S=str(RETENTION_S),
    )
    fleet = Fleet(env, log_dir=tmp_path / "logs", start_timeout=60)
    redis = await open_redis(target.core())
    bus = Bus(redis, BusSettings(namespace=namespace, shards=SHARDS))
    try:
        procs = fleet.start(["risk", "order", "routing", "portfolio", "recorder", "gateway"])
        gateway = next(p for p in procs if p.name == "gateway")
        port = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Live(http, redis, bus)
    finally:
        fleet.stop()
        await delete_namespace(redis, namespace)
        await redis.aclose()


async def _submit(lv: Live, pid: str, coid: str) -> str:
    body = {"client_order_id": coid, "portfolio_id": pid, "symbol": "BTC/USDT", "side": "buy", "type": "market",
            "quantity": "0.01"}
    r = await lv.http.post("/v1/orders", json=body, headers=AUTH, params={"wait": "10"})
    assert r.status_code == 200 and r.json()["status"] == "filled", r.text
    return str(r.json()["order_id"])


def _without_updated_at(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k != "updated_at"}


async def test_finished_order_when_past_its_retention_is_gone_from_redis_and_served_from_the_event_store(
    live: Live,
) -> None:
    lv = live
    pid = f"ret-{uuid.uuid4().hex[:6]}"
    r = await lv.http.put(f"/v1/portfolios/{pid}", json={"balances": {"USDT": "1000000", "BTC": "10"}}, headers=AUTH)
    assert r.status_code in (200, 201), r.text

    async def priced() -> bool:
        return bool(await lv.redis.hget(lv.state.marks(), "BTC/USDT"))

    await eventually(priced, timeout=20)

    first = await _submit(lv, pid, "c-1")
    live_view = (await lv.http.get(f"/v1/orders/{first}", headers=AUTH)).json()
    assert live_view["status"] == "filled" and live_view["fills"]
    record_key = lv.state.order(pid, first)
    assert 0 < int(await lv.redis.pttl(record_key)) <= RETENTION_S * 1000  # set to expire in the terminal commit

    async def gone() -> bool:
        return not await lv.redis.exists(record_key)

    await eventually(gone, timeout=10)

    # a later order's terminal commit trims the first one's entry from the portfolio's index
    second = await _submit(lv, pid, "c-2")
    assert await lv.redis.zscore(lv.state.orders(pid), first) is None
    assert await lv.redis.zscore(lv.state.orders(pid), second) is not None

    # served from the event store: the same view (updated_at is the time of its last event
    # there, the live record's is when the order stage handled it, a little later)
    async def served() -> bool:
        r = await lv.http.get(f"/v1/orders/{first}", headers=AUTH)
        assert r.status_code in (200, 404), r.text
        return r.status_code == 200 and r.json()["status"] == "filled"

    await eventually(served, timeout=10)  # the recorder has stored its events by now, or soon
    archived = (await lv.http.get(f"/v1/orders/{first}", headers=AUTH)).json()
    assert _without_updated_at(archived) == _without_updated_at(live_view)
    assert dt.datetime.fromisoformat(archived["updated_at"]) <= dt.datetime.fromisoformat(live_view["updated_at"])

    listed = (await lv.http.get(f"/v1/portfolios/{pid}/orders", headers=AUTH)).json()["orders"]
    assert [o["order_id"] for o in listed] == [second, first]
    assert _without_updated_at(listed[1]) == _without_updated_at(live_view)
    filled = (await lv.http.get(f"/v1/portfolios/{pid}/orders", params={"status": "filled"}, headers=AUTH)).json()
    assert [o["order_id"] for o in filled["orders"]] == [second, first]
    assert (await lv.http.get(f"/v1/portfolios/{pid}/orders", params={"status": "routed"}, headers=AUTH)
            ).json()["orders"] == []

    # the same submission again, within the idempotency window: the same order; another body: 409
    assert await _submit(lv, pid, "c-1") == first
    body = {"client_order_id": "c-1", "portfolio_id": pid, "symbol": "BTC/USDT", "side": "sell", "type": "market",
            "quantity": "0.01"}
    r = await lv.http.post("/v1/orders", json=body, headers=AUTH)
    assert r.status_code == 409 and r.json()["code"] == "client_order_id_conflict", r.text

    # a cancel of it: terminal
    r = await lv.http.delete(f"/v1/orders/{first}", headers=AUTH)
    assert r.status_code == 409 and r.json()["code"] == "order_terminal", r.text

    # another key's view of it, and an id nobody has: 404
    r = await lv.http.post("/v1/api-keys", json={"name": "other", "portfolios": ["elsewhere"], "scopes": ["read"]},
                           headers=AUTH)
    other = {"Authorization": f"Bearer {r.json()['secret']}"}
    assert (await lv.http.get(f"/v1/orders/{first}", headers=other)).status_code == 404
    unknown = first[:-12] + "0000000" + first[-5:]
    assert (await lv.http.get(f"/v1/orders/{unknown}", headers=AUTH)).status_code == 404

    # no finished order is left in any shard's open-order index
    for shard in range(SHARDS):
        assert int(await lv.redis.zcard(lv.state.open_orders(shard))) == 0
