"""The recorder and its event store, against the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest

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
