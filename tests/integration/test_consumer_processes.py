"""Consumers as real processes: kill -9 in the middle of a batch, SIGTERM under load, and a
bad setting at start-up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from services.core.bus import Bus
from services.core.events import EventType
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import ROOT, eventually, handled_counts, order, stream_total


async def test_consumer_when_killed_mid_batch_another_reclaims_its_entries_and_nothing_is_lost(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> None:
    settings = bus_settings(batch_size=50, reclaim_idle_ms=1000, reclaim_interval_ms=200)
    bus = Bus(redis, settings)
    events = [order(i) for i in range(600)]
    await bus.publish_many(events)

    victim = spawn_echo(settings, ZVT_ECHO_DELAY_MS="4")

    async def busy() -> bool:
        return len(await handled_counts(redis, bus)) >= 100

    await eventually(busy, timeout=30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = len(await handled_counts(redis, bus))
    in_flight = await _pending_of(redis, bus, "echo")
    assert 0 < done_before < 600
    assert in_flight > 0, "the victim died holding no entries; the test did not hit a batch"

    spawn_echo(settings)

    async def all_handled() -> bool:
        return len(await handled_counts(redis, bus)) == 600

    await eventually(all_handled, timeout=60)
    await eventually(lambda: _backlog_zero(bus), timeout=30)
    counts = await handled_counts(redis, bus)
    assert set(counts) == {e.payload.order_id for e in events}
    assert set(counts.values()) == {1}, "an order was committed twice"
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 600
    assert await bus.dead_letters() == []


async def test_consumer_when_sigterm_during_busy_loop_exits_in_grace_and_loses_nothing(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> None:
    settings = bus_settings(batch_size=100, reclaim_idle_ms=60_000)
    bus = Bus(redis, settings)
    events = [order(i) for i in range(3000)]
    await bus.publish_many(events)
    grace = 10.0
    proc = spawn_echo(settings, ZVT_ECHO_DELAY_MS="1", ZVT_DRAIN_TIMEOUT_S=str(grace))

    async def busy() -> bool:
        return len(await handled_counts(redis, bus)) >= 200

    await eventually(busy, timeout=30)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, grace + 5)
    took = time.monotonic() - sent
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert took < grace

    # Everything it read was finished and acked: nothing of its is pending.
    assert await _pending_of(redis, bus, "echo") == 0
    handled = await handled_counts(redis, bus)
    assert 0 < len(handled) < 3000
    assert set(handled.values()) == {1}

    spawn_echo(settings)

    async def all_handled() -> bool:
        return len(await handled_counts(redis, bus)) == 3000

    await eventually(all_handled, timeout=60)
    assert set((await handled_counts(redis, bus)).values()) == {1}
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 3000


def test_service_when_setting_is_invalid_exits_with_one_line_naming_it() -> None:
    env = dict(os.environ, ZVT_BUS_SHARDS="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.echo_service"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ZVT_BUS_SHARDS" in lines[0] and "greater than or equal to 1" in lines[0]


async def _pending_of(redis: AnyRedis, bus: Bus, group: str) -> int:
    lags = await bus.group_lag(group, [EventType.ORDER_REQUESTED])
    return sum(pending for _, pending in lags.values())


async def _backlog_zero(bus: Bus) -> bool:
    return await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0


def test_service_when_asked_for_help_lists_its_settings_and_exits_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.echo_service", "--help"], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m services.echo")
    assert "ZVT_BUS_SHARDS" in proc.stdout and "ZVT_REDIS_URL" in proc.stdout
