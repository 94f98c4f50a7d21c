"""A handler whose dependency is down (it raises ``Unavailable``) spends none of the entries'
delivery budget: the consumer pauses, reads and reclaims nothing new, retries the entries in
hand with backoff, and dead-letters nothing, however long it lasts (issue 12)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.core.bus import Batch, Bus, Commit, Consumer, Unavailable
from services.core.events import Event, EventType
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import eventually, order


async def _pending(redis: AnyRedis, bus: Bus, group: str) -> list[Any]:
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    return list(await redis.xpending_range(stream, group, min="-", max="+", count=1000))


async def test_consumer_when_a_dependency_is_down_longer_than_the_budget_pauses_and_dead_letters_nothing(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings],
) -> None:
    # one shard: one read loop, so "reads nothing new while paused" is exact
    settings = bus_settings(shards=1, max_deliveries=2)  # reclaimed after 0.3 s
    bus = Bus(redis, settings)
    down = True
    calls: list[list[str]] = []
    stored: list[str] = []

    async def sink(items: list[tuple[Event[Any], Commit]]) -> None:
        calls.append([event.event_id for event, _ in items])
        if down:
            raise Unavailable("database unreachable")
        stored.extend(event.event_id for event, _ in items)

    consumer = Consumer(bus, "sink", {EventType.ORDER_REQUESTED: Batch(sink)})
    await consumer.start()
    try:
        first = [order(i) for i in range(10)]
        await bus.publish_many(first)
        await eventually(lambda: consumer.paused, timeout=10)
        later = [order(100 + i) for i in range(10)]
        await bus.publish_many(later)
        await asyncio.sleep(2.5)  # the budget (2 deliveries, 0.3 s apart), many times over

        handled = {eid for call in calls for eid in call}
        assert handled <= {e.event_id for e in first}  # nothing new read while paused
        assert len(calls) >= 5  # retried, with backoff
        pending = await _pending(redis, bus, "sink")
        assert pending and all(p["times_delivered"] <= 1 for p in pending)  # no delivery spent
        assert await bus.dead_letters() == []

        down = False
        everything = {e.event_id for e in first + later}
        await eventually(lambda: set(stored) == everything, timeout=10)
        assert len(stored) == len(everything)  # each once
        assert not consumer.paused
        assert await bus.dead_letters() == []
        await eventually(lambda: _no_backlog(bus), timeout=10)
    finally:
        consumer.stop()
        assert await consumer.wait(10)


async def test_consumer_when_stopped_while_a_dependency_is_down_leaves_the_entries_pending_uncounted(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings],
) -> None:
    settings = bus_settings(shards=1, max_deliveries=2)
    bus = Bus(redis, settings)

    async def sink(items: list[tuple[Event[Any], Commit]]) -> None:
        raise Unavailable("database unreachable")

    consumer = Consumer(bus, "sink", {EventType.ORDER_REQUESTED: Batch(sink)})
    await consumer.start()
    await bus.publish_many([order(i) for i in range(5)])
    await eventually(lambda: consumer.paused, timeout=10)
    await asyncio.sleep(1.0)
    consumer.stop()
    assert await asyncio.wait_for(consumer.wait(5), 6)  # a clean, prompt stop
    pending = await _pending(redis, bus, "sink")
    assert len(pending) == 5 and all(p["times_delivered"] == 0 for p in pending)
    assert await bus.dead_letters() == []


async def _no_backlog(bus: Bus) -> bool:
    return await bus.backlog("sink", [EventType.ORDER_REQUESTED]) == 0
