"""Dead letters can be handled (issue 12): ``python -m services.deadletters list | show |
requeue | purge`` against real Redis, single node and cluster. Requeue puts the original
event back on its stream for the group that dead-lettered it, removing the dead letter in the
same script: requeued twice, it is handled once. Dead-letter streams are bounded."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.core.bus import Bus, Commit, Consumer, PermanentError
from services.core.events import Event, EventType
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import ROOT, Target, eventually, handled_counts, order
from services.deadletters.__main__ import run
from tests.integration.echo_service import handle as echo

FIVE_HOURS_MS = 5 * 3_600_000


def _env(target: Target, settings: BusSettings) -> dict[str, str]:
    return {**target.env(), "ZVT_BUS_NAMESPACE": settings.namespace, "ZVT_BUS_SHARDS": str(settings.shards),
            "ZVT_LOG_LEVEL": "WARNING"}


async def cli(target: Target, settings: BusSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, as an operator runs it."""
    env = {**os.environ, **_env(target, settings)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.deadletters", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def inproc(
    target: Target, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Awaitable[tuple[int, str, str]]]:
    """The same command run in this process (its ``run``), to keep the test quick: the
    environment is set as for the process, the output captured."""

    async def call(settings: BusSettings, *args: str) -> tuple[int, str, str]:
        for key, value in _env(target, settings).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = await run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


async def listed(inproc: Callable[..., Awaitable[tuple[int, str, str]]], settings: BusSettings,
                 *args: str) -> list[dict[str, Any]]:
    code, out, err = await inproc(settings, "list", "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class Flaky:
    """Fails the order ids in ``failing`` (permanently if asked) until they are removed."""

    def __init__(self, failing: set[str], permanent: bool = False) -> None:
        self.failing = failing
        self.permanent = permanent

    async def __call__(self, event: Event[Any], commit: Commit) -> None:
        if event.payload.order_id in self.failing:
            raise (PermanentError if self.permanent else RuntimeError)(f"venue said no to {event.payload.order_id}")
        await echo(event, commit)


async def _dead(bus: Bus, n: int) -> bool:
    return len(await bus.dead_letters()) >= n


async def test_deadletters_when_listed_with_filters_shows_shows_and_purges_only_the_matching(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings],
    inproc: Callable[..., Awaitable[tuple[int, str, str]]],
) -> None:
    settings = bus_settings(shards=2, max_deliveries=1)
    bus = Bus(redis, settings)
    old_shard = bus.keys.shard_of("pf-old")
    # a dead letter from five hours ago (written as the commit script writes them)
    await redis.xadd(bus.keys.deadletter(old_shard), {
        "stream": bus.keys.stream(old_shard, EventType.ORDER_REQUESTED), "entry_id": "1-0", "group": "legacy",
        "consumer": "legacy-1", "reason": "handler_error", "error": "RuntimeError: long ago", "deliveries": 5,
        "event_id": "e-old", "dead_lettered_at": 0, "data": b"",
    }, id=f"{int(time.time() * 1000) - FIVE_HOURS_MS}-0")
    stream = bus.keys.stream(bus.keys.shard_of("pf-a"), EventType.ORDER_REQUESTED)
    await redis.xadd(stream, {b"d": b"not an event"})
    await bus.publish_many([order(1, portfolio="pf-a"), order(2, portfolio="pf-b"), order(3, portfolio="pf-a")])
    consumers = [
        Consumer(bus, "echo", {EventType.ORDER_REQUESTED: Flaky({"o1", "o2"})}),
        Consumer(bus, "audit", {EventType.ORDER_VALIDATED: Flaky({"o3"}, permanent=True)}),
    ]
    for c in consumers:
        await c.start()
    try:
        await eventually(lambda: _dead(bus, 5), timeout=20)
    finally:
        for c in consumers:
            c.stop()
            assert await c.wait(10)

    everything = await listed(inproc, settings)
    assert sorted((d["group"], d["reason"]) for d in everything) == [
        ("audit", "rejected_by_handler"), ("echo", "handler_error"), ("echo", "handler_error"),
        ("echo", "malformed"), ("legacy", "handler_error"),
    ]
    assert {d["group"] for d in await listed(inproc, settings, "--group", "echo")} == {"echo"}
    assert len(await listed(inproc, settings, "--group", "echo", "--reason", "handler")) == 2
    assert [d["group"] for d in await listed(inproc, settings, "--stream", "order.validated")] == ["audit"]
    assert [d["group"] for d in await listed(inproc, settings, "--older-than", "1h")] == ["legacy"]
    assert len(await listed(inproc, settings, "--newer-than", "30m")) == 4

    # show: the whole entry, with its error and the original event
    (audit,) = await listed(inproc, settings, "--group", "audit")
    shown = await cli(target, settings, "show", audit["id"])
    assert shown.returncode == 0, shown.stderr
    assert "PermanentError: venue said no to o3" in shown.stdout
    assert "rejected_by_handler" in shown.stdout and '"order_id": "o3"' in shown.stdout
    code, _, err = await inproc(settings, "show", "0/1-1")
    assert code == 1 and "no dead letter" in err

    # purge: only what the filters select; nothing without a filter unless --all
    code, _, err = await inproc(settings, "purge")
    assert code == 2 and "--all" in err
    code, out, err = await inproc(settings, "purge", "--reason", "malformed")
    assert code == 0 and "purged 1" in out, out + err
    assert sorted(d["reason"] for d in await listed(inproc, settings)) == [
        "handler_error", "handler_error", "handler_error", "rejected_by_handler",
    ]


async def test_requeue_when_run_twice_the_event_is_handled_once(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings],
    inproc: Callable[..., Awaitable[tuple[int, str, str]]],
) -> None:
    settings = bus_settings(shards=2, max_deliveries=1)
    bus = Bus(redis, settings)
    failing = Flaky({"o7"})
    echo_consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: failing})
    seen_by_observer: list[str] = []

    async def observe(event: Event[Any], commit: Commit) -> None:
        seen_by_observer.append(event.event_id)

    observer = Consumer(bus, "observer", {EventType.ORDER_REQUESTED: observe})
    events = [order(7, portfolio="pf-r"), order(8, portfolio="pf-r")]
    await echo_consumer.start()
    await observer.start()
    try:
        await bus.publish_many(events)
        await eventually(lambda: _dead(bus, 1), timeout=20)
        await eventually(lambda: len(seen_by_observer) == 2, timeout=20)
        (letter,) = await listed(inproc, settings)
        assert letter["event_id"] == events[0].event_id and letter["reason"] == "handler_error"

        failing.failing.clear()  # the cause is fixed
        # an operator runs it twice at once, and once more
        first, second = await asyncio.gather(
            cli(target, settings, "requeue", letter["id"]), cli(target, settings, "requeue", letter["id"])
        )
        code, third, err = await inproc(settings, "requeue", "--group", "echo")
        outputs = [first.stdout, second.stdout, third]
        assert [first.returncode, second.returncode, code] == [0, 0, 0], [first.stderr, second.stderr, err]
        assert sum("requeued 1" in out for out in outputs) == 1, outputs
        assert await bus.dead_letters() == []

        async def handled() -> bool:
            return (await handled_counts(redis, bus)).get("o7") == 1

        await eventually(handled, timeout=20)
        # a copy of the same event on the stream again (a requeue repeated after a crash,
        # say) is dropped by the group's dedupe: it keeps the event id
        shard = bus.keys.shard_of("pf-r")
        copy = (await redis.xrange(bus.keys.stream(shard, EventType.ORDER_REQUESTED)))[-1][1]
        await redis.xadd(bus.keys.stream(shard, EventType.ORDER_REQUESTED), copy)
        later = order(9, portfolio="pf-r")
        await bus.publish(later)

        async def later_handled() -> bool:
            return (await handled_counts(redis, bus)).get("o9") == 1 and len(seen_by_observer) == 3

        await eventually(later_handled, timeout=20)
    finally:
        for c in (echo_consumer, observer):
            c.stop()
            assert await c.wait(10)
    assert await handled_counts(redis, bus) == {"o7": 1, "o8": 1, "o9": 1}
    # the group that had handled the original never sees the requeued copy
    assert sorted(seen_by_observer) == sorted([events[0].event_id, events[1].event_id, later.event_id])
    assert await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0
    assert await bus.backlog("observer", [EventType.ORDER_REQUESTED]) == 0


async def test_deadletter_stream_when_past_its_bound_is_capped_and_measured(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    settings = bus_settings(shards=1, deadletter_maxlen=100)
    bus = Bus(redis, settings)
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    for _ in range(5):
        pipe = redis.pipeline(transaction=False)
        for _ in range(100):
            pipe.xadd(stream, {b"d": b"poison"})
        await pipe.execute()
    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: echo})
    await consumer.start()
    try:
        async def drained() -> bool:
            return await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0

        await eventually(drained, timeout=20)
    finally:
        consumer.stop()
        assert await consumer.wait(10)
    length = int(await redis.xlen(bus.keys.deadletter(0)))
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): about the bound
    assert 100 <= length < 300, length
    assert await bus.deadletter_lengths() == {0: length}
