"""The gateway's public API in-process (httpx over ASGI) against real Redis, and the audit
endpoint against real PostgreSQL. Each test runs in a namespace of its own."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from prometheus_client import generate_latest
import msgspec
import psycopg
import pytest

from services.client import AsyncClient, OrderRequest
from services.core.bus import Bus
from services.core.codec import decode_any
from services.core.events import Event, EventType, OrderRejected, utcnow
from services.core.hotstate import PositionRecord, StateKeys, dump, load
from services.core.redisconn import AnyRedis, open_redis
from services.core.settings import BusSettings, CoreSettings
from services.gateway import Gateway, GatewaySettings, create_app
from services.recorder.store import EventStore
from services.trading.orders import Order, OrderStatus
from tests.integration.conftest import delete_namespace, eventually, stream_total

ADMIN = "admin-secret-for-the-tests-0001"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@dataclass
class World:
    http: httpx.AsyncClient
    gw: Gateway
    redis: AnyRedis
    bus: Bus

    @property
    def state(self) -> StateKeys:
        return StateKeys(self.bus.keys)

    async def portfolio(self, pid: str, **body: Any) -> None:
        r = await self.http.put(f"/v1/portfolios/{pid}", json={"balances": {"USDT": "100000"}, **body}, headers=AUTH)
        assert r.status_code in (200, 201), r.text

    async def key(self, portfolios: Any, scopes: list[str]) -> dict[str, str]:
        r = await self.http.post("/v1/api-keys", json={"name": "t", "portfolios": portfolios, "scopes": scopes}, headers=AUTH)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['secret']}", "key_id": r.json()["key_id"]}

    async def requested(self) -> int:
        return await stream_total(self.redis, self.bus, EventType.ORDER_REQUESTED)


@contextlib.asynccontextmanager
async def world_on(url: str, cluster: bool, **settings: Any) -> AsyncIterator[World]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    redis = await open_redis(CoreSettings(redis_url=url, redis_cluster=cluster))
    bus = Bus(redis, BusSettings(namespace=namespace, shards=4))
    values: dict[str, Any] = {"admin_api_key": ADMIN, "backlog_interval_s": 0.05, "wait_poll_s": 0.2, "wait_block_ms": 200}
    values.update(settings)
    gw = Gateway(bus, GatewaySettings(**values))
    await gw.start()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(gw)), base_url="http://gateway")
    try:
        yield World(http, gw, redis, bus)
    finally:
        await http.aclose()
        await gw.stop()
        await delete_namespace(redis, namespace)
        await redis.aclose()


@pytest.fixture
async def world(redis_single_url: str) -> AsyncIterator[World]:
    async with world_on(redis_single_url, False) as w:
        yield w


def order_body(pid: str = "pf-1", coid: str = "c-1", **changes: Any) -> dict[str, Any]:
    body = {"client_order_id": coid, "portfolio_id": pid, "symbol": "BTC/USDT", "side": "buy", "type": "market",
            "quantity": "0.5"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status and {"type", "title", "detail"} <= set(body)
    return body


async def write_terminal(w: World, order_id: str, pid: str, **changes: Any) -> None:
    key = w.state.order(pid, order_id)
    record = load(Order, await w.redis.get(key))
    await w.redis.set(key, dump(msgspec.structs.replace(record, updated_at=utcnow(), **changes)))


# -- authentication and authorization ------------------------------------------------------------


async def test_auth_when_key_missing_bad_or_revoked_answers_401(world: World) -> None:
    await world.portfolio("pf-1")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = await world.http.post("/v1/orders", json=order_body(), headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    key = await world.key(["pf-1"], ["read"])
    assert (await world.http.get("/v1/portfolios/pf-1", headers=key)).status_code == 200
    assert (await world.http.delete(f"/v1/api-keys/{key['key_id']}", headers=AUTH)).status_code == 204
    assert_problem(await world.http.get("/v1/portfolios/pf-1", headers=key), 401, "unauthorized")
    assert_problem(await world.http.delete(f"/v1/api-keys/{key['key_id']}", headers=AUTH), 404, "api_key_not_found")
    assert await world.requested() == 0


async def test_auth_when_portfolio_not_granted_answers_403_and_leaks_nothing(world: World) -> None:
    await world.portfolio("pf-a")
    await world.portfolio("pf-b")
    key = await world.key(["pf-a"], ["trade", "read"])
    theirs = (await world.http.post("/v1/orders", json=order_body("pf-b"), headers=AUTH)).json()["order_id"]

    assert_problem(await world.http.post("/v1/orders", json=order_body("pf-b", "c-x"), headers=key), 403, "forbidden")
    for path in ("/v1/portfolios/pf-b", "/v1/portfolios/pf-b/positions", "/v1/portfolios/pf-b/orders",
                 "/v1/portfolios/does-not-exist"):
        body = assert_problem(await world.http.get(path, headers=key), 403, "forbidden")
        assert "pf-b" not in body["detail"]
    # another portfolio's order looks exactly like an order that does not exist
    hidden = assert_problem(await world.http.get(f"/v1/orders/{theirs}", headers=key), 404, "order_not_found")
    unknown_id = theirs[:-8] + "00000000"
    missing = assert_problem(await world.http.get(f"/v1/orders/{unknown_id}", headers=key), 404, "order_not_found")
    assert hidden["detail"].replace(theirs, "") == missing["detail"].replace(unknown_id, "")
    assert_problem(await world.http.delete(f"/v1/orders/{theirs}", headers=key), 404, "order_not_found")
    # a key without the trade scope may not trade even its own portfolio; without admin no admin calls
    reader = await world.key(["pf-a"], ["read"])
    assert_problem(await world.http.post("/v1/orders", json=order_body("pf-a"), headers=reader), 403, "forbidden")
    assert_problem(await world.http.put("/v1/portfolios/pf-a", json={}, headers=key), 403, "forbidden")
    assert_problem(await world.http.post("/v1/api-keys", json={}, headers=key), 403, "forbidden")
    assert await world.requested() == 1


# -- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"client_order_id": "has space"}, "client_order_id"),
        ({"client_order_id": None}, "client_order_id"),
        ({"portfolio_id": "x" * 65}, "portfolio_id"),
        ({"symbol": "btc-usdt"}, "symbol"),
        ({"side": "hold"}, "side"),
        ({"type": "stop"}, "type"),
        ({"quantity": "0"}, "quantity"),
        ({"quantity": "-1"}, "quantity"),
        ({"quantity": 0.5}, "quantity"),
        ({"type": "limit"}, "price"),
        ({"type": "limit", "price": "0"}, "price"),
        ({"price": "100"}, "price"),
        ({"time_in_force": "day"}, "time_in_force"),
        ({"venue": "bad venue"}, "venue"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_order_when_invalid_answers_422_naming_the_field_and_publishes_nothing(
    world: World, changes: dict[str, Any], field: str
) -> None:
    await world.portfolio("pf-1")
    body = order_body()
    for k, v in changes.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    problem = assert_problem(await world.http.post("/v1/orders", json=body, headers=AUTH), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert await world.requested() == 0


async def test_order_when_wait_out_of_range_or_body_malformed_answers_422(world: World) -> None:
    await world.portfolio("pf-1")
    for wait in ("0", "31", "soon"):
        r = await world.http.post(f"/v1/orders?wait={wait}", json=order_body(), headers=AUTH)
        assert assert_problem(r, 422, "validation_error")["errors"][0]["field"] == "wait"
    r = await world.http.post("/v1/orders", content=b"{not json", headers=AUTH)
    assert_problem(r, 422, "malformed_json")
    assert await world.requested() == 0


async def test_order_when_body_too_large_answers_413(world: World) -> None:
    await world.portfolio("pf-1")
    big = order_body(venue="v" * 10)
    big["padding"] = "x" * 70_000
    assert_problem(await world.http.post("/v1/orders", json=big, headers=AUTH), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the streamed size counts
        for _ in range(80):
            yield b" " * 1024

    assert_problem(await world.http.post("/v1/orders", content=chunks(), headers=AUTH), 413, "payload_too_large")
    assert await world.requested() == 0


# -- order submission --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_order_when_submitted_is_recorded_published_once_and_idempotent(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_single_url" if kind == "single" else "redis_cluster_url")
    async with world_on(url, kind == "cluster") as w:
        assert_problem(await w.http.post("/v1/orders", json=order_body("pf-new"), headers=AUTH), 404, "portfolio_not_found")
        await w.portfolio("pf-1")
        r = await w.http.post("/v1/orders", json=order_body(type="limit", price="100.50"), headers=AUTH)
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert set(accepted) == {"order_id", "client_order_id", "status", "correlation_id"}
        assert accepted["status"] == "requested" and accepted["client_order_id"] == "c-1"
        order_id = accepted["order_id"]
        assert accepted["correlation_id"] == order_id

        record = load(Order, await w.redis.get(w.state.order("pf-1", order_id)))
        assert record.status is OrderStatus.REQUESTED and record.price == Decimal("100.50") and record.body_hash
        assert await w.redis.get(w.state.client_order("pf-1", "c-1")) == order_id.encode()
        assert [i.decode() for i in await w.redis.zrange(w.state.orders("pf-1"), 0, -1)] == [order_id]
        stream = w.bus.keys.stream(w.bus.keys.shard_of("pf-1"), EventType.ORDER_REQUESTED)
        entries = await w.redis.xrange(stream)
        assert len(entries) == 1
        event = decode_any(entries[0][1][b"d"])
        assert event.correlation_id == order_id and event.portfolio_id == "pf-1"
        assert event.payload.order_id == order_id and event.payload.price == Decimal("100.50")

        # the same body again (decimals compared by value): the same order, 200, nothing published
        again = await w.http.post("/v1/orders", json=order_body(type="limit", price="100.5"), headers=AUTH)
        assert again.status_code == 200 and again.json()["order_id"] == order_id
        assert again.json()["quantity"] == "0.5" and again.json()["price"] == "100.50"
        other = await w.http.post("/v1/orders", json=order_body(type="limit", price="101"), headers=AUTH)
        assert_problem(other, 409, "client_order_id_conflict")
        assert await w.requested() == 1

        fetched = (await w.http.get(f"/v1/orders/{order_id}", headers=AUTH)).json()
        assert fetched["status"] == "requested" and fetched["fills"] == [] and fetched["filled_quantity"] == "0"


async def test_order_when_canceled_publishes_a_cancel_request_then_409_once_terminal(world: World) -> None:
    await world.portfolio("pf-1")
    order_id = (await world.http.post("/v1/orders", json=order_body(), headers=AUTH)).json()["order_id"]
    r = await world.http.delete(f"/v1/orders/{order_id}", headers=AUTH)
    assert r.status_code == 202 and r.json()["order_id"] == order_id
    stream = world.bus.keys.stream(world.bus.keys.shard_of("pf-1"), EventType.ORDER_CANCEL_REQUESTED)
    [(_, fields)] = await world.redis.xrange(stream)
    event = decode_any(fields[b"d"])
    assert event.payload.order_id == order_id and event.correlation_id == order_id

    await write_terminal(world, order_id, "pf-1", status=OrderStatus.CANCELED)
    assert_problem(await world.http.delete(f"/v1/orders/{order_id}", headers=AUTH), 409, "order_terminal")
    assert await world.redis.xlen(stream) == 1


async def test_orders_when_listed_come_newest_first_and_filter_by_status(world: World) -> None:
    await world.portfolio("pf-1")
    ids = [(await world.http.post("/v1/orders", json=order_body(coid=f"c{i}"), headers=AUTH)).json()["order_id"] for i in range(3)]
    await write_terminal(world, ids[1], "pf-1", status=OrderStatus.REJECTED, reject_code="UNKNOWN_SYMBOL")
    page = (await world.http.get("/v1/portfolios/pf-1/orders", headers=AUTH)).json()
    assert [o["order_id"] for o in page["orders"]] == ids[::-1]
    rejected = (await world.http.get("/v1/portfolios/pf-1/orders?status=rejected", headers=AUTH)).json()
    assert [(o["order_id"], o["reject_code"]) for o in rejected["orders"]] == [(ids[1], "UNKNOWN_SYMBOL")]
    assert len((await world.http.get("/v1/portfolios/pf-1/orders?limit=1", headers=AUTH)).json()["orders"]) == 1


async def test_order_when_waiting_answers_200_once_terminal_and_202_on_timeout(world: World) -> None:
    await world.portfolio("pf-1")
    timed_out = await world.http.post("/v1/orders?wait=0.3", json=order_body(coid="slow"), headers=AUTH)
    assert timed_out.status_code == 202 and timed_out.json()["status"] == "requested"
    assert "symbol" in timed_out.json()  # the full order

    async def reject_when_requested() -> None:
        async def requested() -> bool:
            return await world.requested() == 2

        await eventually(requested, timeout=5, interval=0.01)
        stream = world.bus.keys.stream(world.bus.keys.shard_of("pf-1"), EventType.ORDER_REQUESTED)
        cause = decode_any((await world.redis.xrange(stream))[-1][1][b"d"])
        p = cause.payload
        await world.bus.publish(cause.derive(
            OrderRejected(order_id=p.order_id, client_order_id=p.client_order_id, reason_code="UNKNOWN_SYMBOL",
                          reason="no venue lists XYZ/USDT", stage="risk"), "risk"))
        await asyncio.sleep(0.05)  # the order service writes the record just after the event
        await write_terminal(world, p.order_id, "pf-1", status=OrderStatus.REJECTED, reject_code="UNKNOWN_SYMBOL",
                             reject_reason="no venue lists XYZ/USDT")

    started = asyncio.get_running_loop().time()
    writer = asyncio.create_task(reject_when_requested())
    r = await world.http.post("/v1/orders?wait=10", json=order_body(coid="fast", symbol="XYZ/USDT"), headers=AUTH)
    await writer
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "rejected" and r.json()["reject_code"] == "UNKNOWN_SYMBOL"
    assert asyncio.get_running_loop().time() - started < 2
    assert world.gw.waiters.waiting == 0


# -- backpressure and probes -----------------------------------------------------------------------------


async def test_order_when_risk_backlog_over_threshold_answers_429_with_retry_after(redis_single_url: str) -> None:
    async with world_on(redis_single_url, False, max_backlog=5, retry_after_s=2) as w:
        await w.portfolio("pf-1")
        assert (await w.http.get("/readyz")).status_code == 200
        await w.bus.ensure_group("risk", [EventType.ORDER_REQUESTED], start_id="$")
        for i in range(6):
            assert (await w.http.post("/v1/orders", json=order_body(coid=f"c{i}"), headers=AUTH)).status_code == 202
        await w.gw.measure_backlog()
        r = await w.http.post("/v1/orders", json=order_body(coid="one-too-many"), headers=AUTH)
        assert_problem(r, 429, "backpressure")
        assert r.headers["retry-after"] == "2"
        ready = await w.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"] == {"redis": True, "pipeline": False}
        assert await w.requested() == 6


async def test_probes_and_metrics_label_routes_by_template(world: World) -> None:
    assert (await world.http.get("/healthz")).json() == {"status": "ok"}
    await world.portfolio("pf-1")
    order_id = (await world.http.post("/v1/orders", json=order_body(), headers=AUTH)).json()["order_id"]
    await world.http.get(f"/v1/orders/{order_id}", headers=AUTH)
    assert_problem(await world.http.get("/nowhere"), 404, "not_found")
    assert_problem(await world.http.patch("/v1/orders", headers=AUTH), 405, "method_not_allowed")
    # /metrics is not on the API: it is served on the probe port (ZVT_HTTP_PORT) from the same registry
    assert_problem(await world.http.get("/metrics"), 404, "not_found")
    metrics = generate_latest().decode()
    assert 'zvt_http_requests_total{method="GET",route="/v1/orders/{order_id}",status="200"}' in metrics
    assert 'zvt_http_requests_total{method="POST",route="/v1/orders",status="202"}' in metrics
    assert order_id not in metrics


# -- portfolios -------------------------------------------------------------------------------------


async def test_portfolio_when_put_twice_replaces_balances_merges_limits_and_publishes_updates(world: World) -> None:
    created = await world.http.put(
        "/v1/portfolios/pf-1", json={"base_currency": "USDT", "balances": {"USDT": "1000", "BTC": "1.5"},
                                     "limits": {"price_band": "0.1"}}, headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["limits"]["price_band"] == "0.1" and created.json()["limits"]["window_seconds"] == 1
    updated = await world.http.put(
        "/v1/portfolios/pf-1", json={"balances": {"USDT": "250.25"}, "limits": {"window_seconds": 5}}, headers=AUTH)
    assert updated.status_code == 200
    got = (await world.http.get("/v1/portfolios/pf-1", headers=AUTH)).json()
    assert got["balances"] == {"USDT": "250.25"} and got["trading_state"] == "ACTIVE"
    assert got["limits"]["price_band"] == "0.1" and got["limits"]["window_seconds"] == 5
    assert got["created_at"] == created.json()["created_at"]
    bad = await world.http.put("/v1/portfolios/pf-1", json={"balances": {"USDT": "-1"}}, headers=AUTH)
    assert assert_problem(bad, 422, "validation_error")["errors"][0]["field"] == "balances"
    assert_problem(await world.http.get("/v1/portfolios/pf-none", headers=AUTH), 404, "portfolio_not_found")

    trader = await world.key(["pf-1"], ["trade", "read"])
    r = await world.http.put("/v1/portfolios/pf-1/trading-state", json={"state": "HALTED"}, headers=trader)
    assert_problem(r, 403, "forbidden")
    r = await world.http.put("/v1/portfolios/pf-1/trading-state", json={"state": "HALTED"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["trading_state"] == "HALTED"
    assert r.json()["balances"] == {"USDT": "250.25"}
    assert_problem(await world.http.put("/v1/portfolios/pf-1/trading-state", json={"state": "PAUSED"}, headers=AUTH),
                   422, "validation_error")

    stream = world.bus.keys.stream(world.bus.keys.shard_of("pf-1"), EventType.PORTFOLIO_UPDATED)
    events = [decode_any(f[b"d"]) for _, f in await world.redis.xrange(stream)]
    assert [(e.payload.balances, e.payload.trading_state, e.metadata) for e in events] == [
        ({"USDT": Decimal("1000"), "BTC": Decimal("1.5")}, "ACTIVE", {"source": "api"}),
        ({"USDT": Decimal("250.25")}, "ACTIVE", {"source": "api"}),
        ({"USDT": Decimal("250.25")}, "HALTED", {"source": "api"}),
    ]


async def test_positions_when_marked_show_unrealized_pnl(world: World) -> None:
    await world.portfolio("pf-1")
    now = dt.datetime.now(dt.UTC)
    await world.redis.hset(world.state.positions("pf-1"), mapping={
        "BTC/USDT": dump(PositionRecord(symbol="BTC/USDT", quantity=Decimal("2"), cost_basis=Decimal("200"),
                                        realized_pnl=Decimal("5"), fills=2, updated_at=now)),
        "ETH/USDT": dump(PositionRecord(symbol="ETH/USDT", quantity=Decimal("1"), cost_basis=Decimal("10"), fills=1)),
    })
    await world.redis.hset(world.state.marks(), "BTC/USDT", "110")
    try:
        positions = (await world.http.get("/v1/portfolios/pf-1/positions", headers=AUTH)).json()["positions"]
    finally:
        await world.redis.hdel(world.state.marks(), "BTC/USDT")
    btc, eth = positions
    assert (btc["symbol"], btc["quantity"], btc["average_price"], btc["realized_pnl"]) == ("BTC/USDT", "2", "100", "5")
    assert (btc["mark"], Decimal(btc["unrealized_pnl"])) == ("110", Decimal("20"))
    assert (eth["mark"], eth["unrealized_pnl"]) == (None, None)


async def test_api_keys_when_created_show_the_secret_once_and_grant_what_they_say(world: World) -> None:
    r = await world.http.post("/v1/api-keys", json={"name": "desk", "portfolios": "*", "scopes": ["read"]}, headers=AUTH)
    assert r.status_code == 201
    created = r.json()
    assert created["portfolios"] == "*" and created["scopes"] == ["read"] and created["secret"].startswith("zvt_")
    stored = [v async for v in world.redis.scan_iter(match=f"{world.bus.keys.namespace}:global:apikey:*")]
    values = [await world.redis.get(k) for k in stored]
    assert len(values) == 2 and all(created["secret"].encode() not in v for v in values)
    bad = await world.http.post("/v1/api-keys", json={"name": "x", "portfolios": "*", "scopes": ["root"]}, headers=AUTH)
    assert assert_problem(bad, 422, "validation_error")["errors"][0]["field"] == "scopes.0"


# -- audit trail (PostgreSQL) ----------------------------------------------------------------------------


@pytest.fixture
async def event_db(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_events_when_recorded_come_in_order_and_only_for_granted_portfolios(
    redis_single_url: str, event_db: str
) -> None:
    async with world_on(redis_single_url, False, postgres_dsn=event_db) as w:
        await w.portfolio("pf-1")
        order_id = (await w.http.post("/v1/orders", json=order_body(), headers=AUTH)).json()["order_id"]
        # nothing recorded yet (not even the table): an empty trail, not an error
        assert (await w.http.get(f"/v1/events?correlation_id={order_id}", headers=AUTH)).json()["events"] == []
        stream = w.bus.keys.stream(w.bus.keys.shard_of("pf-1"), EventType.ORDER_REQUESTED)
        requested = decode_any((await w.redis.xrange(stream))[0][1][b"d"])
        p = requested.payload
        rejected = requested.derive(OrderRejected(order_id=order_id, client_order_id=p.client_order_id,
                                                  reason_code="UNKNOWN_SYMBOL", reason="-", stage="risk"), "risk")
        store = await EventStore.open(event_db, namespace=w.bus.keys.namespace)
        try:
            await store.migrate()
            await store.append([requested, rejected])
        finally:
            await store.close()
        trail = (await w.http.get(f"/v1/events?correlation_id={order_id}", headers=AUTH)).json()
        assert [e["event"]["event_type"] for e in trail["events"]] == ["order.requested", "order.rejected"]
        assert trail["events"][0]["event"]["payload"]["quantity"] == "0.5"
        outsider = await w.key(["pf-2"], ["read"])
        hidden = (await w.http.get(f"/v1/events?correlation_id={order_id}", headers=outsider)).json()
        assert hidden == {"correlation_id": order_id, "events": []}


# -- the async client against the real app ----------------------------------------------------------------


async def test_async_client_when_placing_an_order_round_trips_decimals_and_errors(world: World) -> None:
    from services.client import ApiError

    transport = httpx.ASGITransport(create_app(world.gw))
    async with AsyncClient("http://gateway", ADMIN, transport=transport) as zvt:
        portfolio = await zvt.put_portfolio("pf-1", balances={"USDT": Decimal("1000.5")})
        assert portfolio["balances"] == {"USDT": Decimal("1000.5")}
        request = OrderRequest(portfolio_id="pf-1", symbol="ETH/USDT", side="sell", order_type="limit",
                               quantity=Decimal("1.25"), price=Decimal("2500"))
        placed = await zvt.place_order(request)
        assert placed.http_status == 202 and placed.status == "requested" and placed.success
        again = await zvt.place_order(request)
        assert again.order_id == placed.order_id and again.quantity == Decimal("1.25") and again.price == Decimal("2500")
        assert (await zvt.get_order(placed.order_id)).symbol == "ETH/USDT"
        assert [o.order_id for o in await zvt.orders("pf-1")] == [placed.order_id]
        assert (await zvt.cancel_order(placed.order_id)).order_id == placed.order_id
        with pytest.raises(ApiError) as info:
            await zvt.place_order(OrderRequest(portfolio_id="pf-1", symbol="ETH/USDT", side="buy", quantity=Decimal("0")))
        assert info.value.status == 422 and info.value.code == "validation_error"
        assert info.value.errors[0]["field"] == "quantity"
        key = await zvt.create_api_key("bot", portfolios=["pf-1"], scopes=["read"])
        await zvt.revoke_api_key(key["key_id"])
        assert (await zvt.set_trading_state("pf-1", "REDUCING"))["trading_state"] == "REDUCING"
        assert await zvt.positions("pf-1") == []




async def test_order_when_tracing_is_on_starts_the_trace_in_a_server_span(world: World) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from services.core import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.setup_tracing(CoreSettings(), provider=provider)
    try:
        await world.portfolio("pf-1")
        order_id = (await world.http.post("/v1/orders", json=order_body(), headers=AUTH)).json()["order_id"]
    finally:
        telemetry.tracing.enabled = False
    [span] = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/orders"]
    assert span.kind is SpanKind.SERVER and span.attributes["http.response.status_code"] == 202
    stream = world.bus.keys.stream(world.bus.keys.shard_of("pf-1"), EventType.ORDER_REQUESTED)
    event = decode_any((await world.redis.xrange(stream))[0][1][b"d"])
    assert event.payload.order_id == order_id
    assert event.traceparent.startswith(f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-")
