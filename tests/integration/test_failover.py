"""Failover of an exclusive stage within a second: two replicas of a real service process share
the shards; the owner of a shard is killed (-9) or stopped (SIGTERM) in the middle of a steady
stream of orders, and the other replica handles that shard's orders again within a second,
each order exactly once. Both run at the default lease settings.

The time measured: from the signal to the first order of each of the victim's shards that the
heir committed (the commit time is the entry id of the ``order.validated`` it appended; the
echo service records which process handled each order)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable

from services.core.bus import Bus
from services.core.codec import decode
from services.core.events import EventType
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import eventually, handled_counts, order, stream_total

KILL_LIMIT_S = 1.5
"""The target is 1 s; this 2-vCPU machine runs the test next to other work, so a little slack."""
TERM_LIMIT_S = 1.0


class Feed:
    """Publishes a steady stream of orders over every shard (~400/s) until stopped."""

    def __init__(self, bus: Bus, per_tick: int = 4, tick_s: float = 0.01) -> None:
        self.bus = bus
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.bus.publish_many([order(self.sent + j) for j in range(self.per_tick)])
            self.sent += self.per_tick
            await asyncio.sleep(self.tick_s)


async def lease_owners(redis: AnyRedis, bus: Bus) -> dict[int, str]:
    owners = {}
    for shard in range(bus.keys.shards):
        value = await redis.get(bus.keys.lease(shard, "echo"))
        owners[shard] = value.decode() if value else ""
    return owners


def pid_of(member: str) -> int:
    return int(member.rsplit("-", 1)[1]) if member else 0


async def first_commit_by(redis: AnyRedis, bus: Bus, shard: int, pid: int, after_ms: int) -> int | None:
    """Commit time (ms) of the first order of ``shard`` that process ``pid`` handled after
    ``after_ms``, or None."""
    by = await redis.hgetall(bus.keys.state(shard, "echo", "by"))
    entries = await redis.xrange(bus.keys.stream(shard, EventType.ORDER_VALIDATED), min=str(after_ms))
    for entry_id, fields in entries:
        event = decode(fields[b"d"], EventType.ORDER_VALIDATED)
        if by.get(event.payload.order_id.encode()) == str(pid).encode():
            return int(entry_id.decode().partition("-")[0])
    return None


async def two_replicas(
    redis: AnyRedis, bus: Bus, settings: BusSettings, spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> list[subprocess.Popen[bytes]]:
    procs = [spawn_echo(settings, ZVT_ECHO_DELAY_MS="2", ZVT_ECHO_EXCLUSIVE="1") for _ in range(2)]
    pids = {p.pid for p in procs}

    async def split() -> bool:
        owners = [pid_of(o) for o in (await lease_owners(redis, bus)).values()]
        return set(owners) == pids and all(owners.count(pid) == bus.keys.shards // 2 for pid in pids)

    await eventually(split, timeout=30)
    return procs


async def fail_over(
    redis: AnyRedis, bus: Bus, procs: list[subprocess.Popen[bytes]], sig: signal.Signals
) -> tuple[dict[int, float], subprocess.Popen[bytes], int]:
    """With orders flowing, send ``sig`` to the owner of shard 0; returns the seconds from the
    signal to the heir's first commit on each of the victim's shards, the victim, and how many
    orders were published."""
    feed = Feed(bus)
    feed.start()
    try:
        await eventually(lambda: _handled_at_least(redis, bus, 200), timeout=30)
        owners = await lease_owners(redis, bus)
        victim = next(p for p in procs if p.pid == pid_of(owners[0]))
        heir = next(p for p in procs if p is not victim)
        shards = [s for s, o in owners.items() if pid_of(o) == victim.pid]
        sent_at = time.time()
        victim.send_signal(sig)
        code = await asyncio.to_thread(victim.wait, 30)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        after_ms = int(sent_at * 1000)
        first: dict[int, int] = {}

        async def resumed() -> bool:
            for shard in shards:
                if shard not in first:
                    at = await first_commit_by(redis, bus, shard, heir.pid, after_ms)
                    if at is not None:
                        first[shard] = at
            return len(first) == len(shards)

        await eventually(resumed, timeout=30, interval=0.02)
        await asyncio.sleep(0.3)  # a little more traffic on the heir alone
    finally:
        await feed.stop()
    assert [pid_of(o) for o in (await lease_owners(redis, bus)).values()] == [heir.pid] * bus.keys.shards
    return {s: (at - sent_at * 1000) / 1000 for s, at in first.items()}, victim, feed.sent


async def _handled_at_least(redis: AnyRedis, bus: Bus, n: int) -> bool:
    return len(await handled_counts(redis, bus)) >= n


async def assert_each_order_handled_once(redis: AnyRedis, bus: Bus, sent: int) -> None:
    async def all_handled() -> bool:
        return len(await handled_counts(redis, bus)) == sent

    await eventually(all_handled, timeout=30)
    counts = await handled_counts(redis, bus)
    assert set(counts) == {f"o{i}" for i in range(sent)}
    assert set(counts.values()) == {1}, "an order was committed twice"
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == sent
    assert await bus.dead_letters() == []


async def test_exclusive_stage_when_the_owner_of_a_shard_is_killed_mid_stream_its_peer_resumes_the_shard_within_a_second(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # default lease settings and read block; entries of the dead are moved only by the take-over
    settings = bus_settings(shards=8, block_ms=500, reclaim_idle_ms=60_000)
    bus = Bus(redis, settings)
    procs = await two_replicas(redis, bus, settings, spawn_echo)

    recovery, _, sent = await fail_over(redis, bus, procs, signal.SIGKILL)

    await assert_each_order_handled_once(redis, bus, sent)
    figures = ", ".join(f"shard {s}: {t:.3f} s" for s, t in sorted(recovery.items()))
    print(f"\nkill -9 -> orders flowing again: {figures}")
    assert max(recovery.values()) < KILL_LIMIT_S, figures


async def test_exclusive_stage_when_the_owner_of_a_shard_stops_on_sigterm_its_peer_takes_the_shard_at_once(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], spawn_echo: Callable[..., subprocess.Popen[bytes]]
) -> None:
    settings = bus_settings(shards=8, block_ms=500, reclaim_idle_ms=60_000)
    bus = Bus(redis, settings)
    procs = await two_replicas(redis, bus, settings, spawn_echo)

    handover, victim, sent = await fail_over(redis, bus, procs, signal.SIGTERM)

    await assert_each_order_handled_once(redis, bus, sent)
    figures = ", ".join(f"shard {s}: {t:.3f} s" for s, t in sorted(handover.items()))
    print(f"\nSIGTERM -> orders flowing again: {figures}")
    assert max(handover.values()) < TERM_LIMIT_S, figures
    members = [m.decode() for m in await redis.zrange(bus.keys.members("echo"), 0, -1)]
    assert not [m for m in members if pid_of(m) == victim.pid], "the stopped member left the group"
