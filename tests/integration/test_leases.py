"""Exclusive consumers: shard leases give one owner per shard at a time, in order, with a
fenced commit, on a single Redis and on the cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from services.core.bus import Bus, Commit, Consumer
from services.core.events import Event, EventType
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import eventually, handled_counts, order, stream_total
from tests.integration.echo_service import handle as echo



async def test_exclusive_consumers_when_two_share_a_group_split_the_shards_and_keep_each_portfolio_in_order(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    settings = bus_settings(shards=8, lease_ttl_ms=900)
    bus = Bus(redis, settings)
    seen: list[tuple[str, int]] = []

    async def handler(event: Event[Any], commit: Commit) -> None:
        seen.append((event.portfolio_id, int(event.payload.order_id[1:])))
        await echo(event, commit)

    first = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler}, name="first", exclusive=True)
    second = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler}, name="second", exclusive=True)
    await first.start()
    try:
        await eventually(lambda: len(first.owned_shards) == 8)
        await bus.publish_many([order(i, portfolio=f"pf-{i % 12}") for i in range(300)])
        await second.start()  # joins while the first is busy: the shards are rebalanced
        await bus.publish_many([order(i, portfolio=f"pf-{i % 12}") for i in range(300, 600)])
        await eventually(lambda: len(first.owned_shards) == 4 and len(second.owned_shards) == 4)
        await bus.publish_many([order(i, portfolio=f"pf-{i % 12}") for i in range(600, 900)])

        async def all_handled() -> bool:
            return len(await handled_counts(redis, bus)) == 900

        await eventually(all_handled, timeout=30)
        assert set(first.owned_shards).isdisjoint(second.owned_shards)
    finally:
        first.stop()
        second.stop()
        assert await first.wait(10) and await second.wait(10)

    assert set((await handled_counts(redis, bus)).values()) == {1}
    for portfolio in {p for p, _ in seen}:
        numbers = [n for p, n in seen if p == portfolio]
        assert numbers == sorted(numbers), f"{portfolio} handled out of order"
    assert not await redis.exists(*[bus.keys.lease(s, "echo") for s in range(8)])  # given back on stop


async def test_exclusive_consumer_when_owner_is_killed_takes_its_shards_and_pending_entries_once(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> None:
    settings = bus_settings(shards=4, batch_size=40, lease_ttl_ms=1000, reclaim_idle_ms=60_000)
    bus = Bus(redis, settings)
    await bus.publish_many([order(i) for i in range(400)])
    victim = spawn_echo(settings, ZVT_ECHO_DELAY_MS="4", ZVT_ECHO_EXCLUSIVE="1")

    async def busy() -> bool:
        return len(await handled_counts(redis, bus)) >= 60

    await eventually(busy, timeout=30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert len(await handled_counts(redis, bus)) < 400

    heir = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: echo}, name="heir", exclusive=True)
    await heir.start()
    try:
        async def all_handled() -> bool:
            return len(await handled_counts(redis, bus)) == 400

        # reclaim_idle_ms is a minute: only the take-over of the dead owner's shards can do it
        await eventually(all_handled, timeout=30)
        assert heir.owned_shards == [0, 1, 2, 3]
    finally:
        heir.stop()
        assert await heir.wait(10)
    assert set((await handled_counts(redis, bus)).values()) == {1}
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 400


async def test_exclusive_commit_when_the_lease_was_taken_meanwhile_is_refused_whole(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    settings = bus_settings(shards=1, lease_ttl_ms=60_000)
    bus = Bus(redis, settings)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(event: Event[Any], commit: Commit) -> None:
        entered.set()
        await release.wait()
        await echo(event, commit)

    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: slow}, name="deposed", exclusive=True)
    await consumer.start()
    try:
        await bus.publish(order(1))
        await asyncio.wait_for(entered.wait(), 10)
        await redis.set(bus.keys.lease(0, "echo"), "usurper")  # another member owns it now
        release.set()
        await eventually(lambda: consumer.owned_shards == [], timeout=10)
    finally:
        consumer.stop()
        await consumer.wait(10)
    assert await handled_counts(redis, bus) == {}  # nothing of the refused commit was applied
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 0
    lags = await bus.group_lag("echo", [EventType.ORDER_REQUESTED])
    assert sum(pending for _, pending in lags.values()) == 1  # still pending, for the new owner
    assert await redis.get(bus.keys.lease(0, "echo")) == b"usurper"  # not released by the deposed
