"""The recorder and its event store, against the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from devstack.stack import ThrowawayPostgres

from services.core.bus import Bus
from services.core.codec import encode
from services.core.events import Event, EventType, OrderValidated, Route
from services.core.redisconn import AnyRedis
from services.core.runtime import Service
from services.core.settings import BusSettings
from services.recorder.__main__ import build
from services.recorder.store import MIGRATIONS, EventStore
from tests.integration.conftest import Target, eventually, order


@pytest.fixture
async def database(postgres_dsn: str) -> AsyncIterator[str]:
    """A database of its own for each test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def store(database: str) -> AsyncIterator[EventStore]:
    store = await EventStore.open(database)
    yield store
    await store.close()


def validated(cause: Event[Any]) -> Event[Any]:
    p = cause.payload
    return cause.derive(
        OrderValidated(order_id=p.order_id, client_order_id=p.client_order_id, symbol=p.symbol, side=p.side,
                       order_type=p.order_type, quantity=p.quantity, price=Decimal("101.25")),
        "risk",
    )


async def test_store_when_migrated_twice_applies_each_step_once(store: EventStore) -> None:
    assert await store.migrate() == [1, 2, 3]
    assert await store.migrate() == []


async def test_store_when_upgraded_from_before_namespaces_keeps_old_rows_under_the_default_one(database: str) -> None:
    old = order(1, portfolio="pf-a")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        # a store of schema step 1, with one event recorded then (no namespace column yet)
        await conn.execute(MIGRATIONS[0][1])
        await conn.execute("CREATE TABLE zvt_schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute("INSERT INTO zvt_schema_migrations (version) VALUES (1)")
        await conn.execute(
            "INSERT INTO zvt_events (event_id, event_type, version, occurred_at, portfolio_id, correlation_id, route, envelope)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
            (old.event_id, str(old.event_type), old.version, old.occurred_at, old.portfolio_id, old.correlation_id,
             str(old.route), encode(old).decode()),
        )
    default, other = await EventStore.open(database), await EventStore.open(database, namespace="elsewhere")
    try:
        assert await default.migrate() == [2, 3] and await other.migrate() == []
        assert [s.event for s in await default.events_for_correlation(old.correlation_id)] == [old]
        assert await other.events_for_correlation(old.correlation_id) == []
        assert await other.events_for_order("o1") == [] and await other.count() == 0
    finally:
        await default.close()
        await other.close()


async def test_store_when_batch_appended_twice_keeps_one_copy_of_each_event(store: EventStore) -> None:
    await store.migrate()
    first = order(1, portfolio="pf-a")
    events = [first, validated(first), order(2, portfolio="pf-b")]
    assert await store.append(events) == 3
    assert await store.append(events) == 0  # a batch re-written after a crash adds nothing
    assert await store.count() == 3


async def test_store_when_read_back_returns_equal_events_in_causal_order(store: EventStore) -> None:
    await store.migrate()
    first = order(7, portfolio="pf-a")
    second = validated(first)
    await store.append([first, order(8, portfolio="pf-a"), second])
    trail = await store.events_for_correlation(first.correlation_id)
    assert [s.event for s in trail] == [first, second]  # equal, decimals and all
    assert trail[1].event.payload.price == Decimal("101.25")
    assert [s.event.event_id for s in await store.events_for_order("o7")] == [first.event_id, second.event_id]
    assert len(await store.events_for_portfolio("pf-a")) == 3
    after = trail[0].seq
    assert [s.event.event_id for s in await store.events_for_portfolio("pf-a", after_seq=after)][-1] == second.event_id


async def test_recorder_when_running_stores_every_event_of_every_route_once(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZVT_RECORDER_POSTGRES_DSN", database)
    settings = bus_settings()
    service = Service("recorder", core=target.core(http_port=0, log_level="WARNING"), bus=settings)
    build(service)
    running = asyncio.create_task(service.run())
    bus = Bus(redis, settings)
    requested = [order(i) for i in range(40)]
    workflow = [order(100 + i, route=Route.WORKFLOW) for i in range(5)]
    events = [*requested, *[validated(e) for e in requested[:10]], *workflow]
    try:
        await bus.publish_many(events)
        await bus.publish_many(events[:5])  # copies of events already published
        check = await EventStore.open(database, namespace=settings.namespace)
        try:
            async def stored() -> bool:
                try:
                    return await check.count() == len(events)
                except psycopg.errors.UndefinedTable:
                    return False  # not migrated yet

            await eventually(stored, timeout=30)
            await asyncio.sleep(0.3)  # let the copies arrive: they must not add rows
            assert await check.count() == len(events)
            trail = await check.events_for_correlation(requested[3].correlation_id)
            assert [s.event.event_type for s in trail] == [EventType.ORDER_REQUESTED, EventType.ORDER_VALIDATED]
        finally:
            await check.close()
        assert await bus.backlog("recorder", list(EventType)) == 0
    finally:
        service.stop()
        assert await asyncio.wait_for(running, 15) == 0


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL these tests stop, freeze and start again (never the shared one)."""
    pg = ThrowawayPostgres.create()
    try:
        yield pg
    finally:
        pg.remove()


async def test_recorder_readyz_when_postgres_goes_away_is_false_until_it_is_back_and_nothing_is_lost(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], private_postgres: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started while its PostgreSQL is down, the recorder waits, not ready; once it is up,
    ready. Down again (stopped, then frozen) for longer than the delivery budget: not ready,
    and the events published meanwhile are stored once it is back, none dead-lettered."""
    pg = private_postgres
    pg.thaw()
    pg.stop()
    for name, value in {
        "ZVT_RECORDER_POSTGRES_DSN": pg.dsn, "ZVT_RECORDER_CONNECT_TIMEOUT_S": "2",
        "ZVT_RECORDER_POOL_TIMEOUT_S": "0.3", "ZVT_RECORDER_WRITE_TIMEOUT_S": "1",
        "ZVT_RECORDER_HEALTH_INTERVAL_S": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    settings = bus_settings(max_deliveries=2)  # reclaimed after 0.3 s: a budget of well under 2 s
    service = Service("recorder", core=target.core(http_port=0, log_level="WARNING"), bus=settings)
    build(service)
    running = asyncio.create_task(service.run())
    bus = Bus(redis, settings)
    http = httpx.AsyncClient(timeout=5)

    async def ready() -> tuple[int, dict[str, bool]]:
        while service.http_port is None:
            await asyncio.sleep(0.02)
        response = await http.get(f"http://127.0.0.1:{service.http_port}/readyz")
        return response.status_code, response.json()["checks"]

    async def is_ready(expected: bool) -> bool:
        status, checks = await ready()
        return (status == 200 and checks["event_store"] is True) if expected else (
            status == 503 and checks["event_store"] is False
        )

    store: EventStore | None = None
    try:
        await eventually(lambda: is_ready(False), timeout=10)
        await asyncio.sleep(1.0)
        assert await is_ready(False) and not running.done()  # still waiting, not crashed
        pg.start()
        await eventually(lambda: is_ready(True), timeout=15)
        store = await EventStore.open(pg.dsn, namespace=settings.namespace)
        first = [order(i) for i in range(20)]
        await bus.publish_many(first)
        await eventually(lambda: _count(store, len(first)), timeout=15)

        published = list(first)
        for fault in ("down", "frozen"):
            if fault == "down":
                pg.stop()
            else:
                pg.freeze()
            await eventually(lambda: is_ready(False), timeout=10)
            during = [order(1000 * len(published) + i) for i in range(20)]
            await bus.publish_many(during)
            published += during
            await asyncio.sleep(3.0)  # the budget, several times over
            assert await is_ready(False)
            if fault == "down":
                pg.start()
            else:
                pg.thaw()
            await eventually(lambda: is_ready(True), timeout=20)
            await eventually(lambda: _count(store, len(published)), timeout=30)
        assert await bus.dead_letters() == []
        assert await bus.backlog("recorder", list(EventType)) == 0
        stored = {s.event.event_id for e in published for s in await store.events_for_correlation(e.correlation_id)}
        assert stored == {e.event_id for e in published}
    finally:
        pg.thaw()
        pg.start()
        if store is not None:
            await store.close()
        await http.aclose()
        service.stop()
        assert await asyncio.wait_for(running, 30) == 0


async def _count(store: EventStore | None, expected: int) -> bool:
    assert store is not None
    try:
        return await store.count() == expected
    except psycopg.OperationalError:
        return False
