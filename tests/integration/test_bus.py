"""The bus against real Redis, single node and cluster: delivery, acks, duplicates, dead
letters, routes, lag and trimming."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from services.core.bus import Batch, Bus, Commit, Consumer, PermanentError
from services.core.codec import decode_any, encode
from services.core.events import Event, EventType, OrderValidated, Route
from services.core.hotstate import StateReader
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from tests.integration.conftest import eventually, order, stream_total
from tests.integration.echo_service import handle as echo


class Recorder:
    """A handler that remembers what it saw and re-emits like the echo service."""

    def __init__(self, fail_for: set[str] | None = None, permanent: bool = False) -> None:
        self.seen: list[str] = []
        self.fail_for = fail_for or set()
        self.permanent = permanent

    async def __call__(self, event: Event[Any], commit: Commit) -> None:
        self.seen.append(event.event_id)
        if event.payload.order_id in self.fail_for:
            raise (PermanentError if self.permanent else RuntimeError)(f"cannot handle {event.payload.order_id}")
        await echo(event, commit)


async def run_until(consumer: Consumer, check: Callable[[], Any], timeout: float = 20) -> None:
    await consumer.start()
    try:
        await eventually(check, timeout)
    finally:
        consumer.stop()
        assert await consumer.wait(10)


async def test_consumer_when_events_published_handles_each_once_and_never_redelivers(
    redis: AnyRedis, bus: Bus
) -> None:
    events = [order(i) for i in range(400)]
    await bus.publish_many(events)
    handler = Recorder()
    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler})
    await run_until(consumer, lambda: len(handler.seen) >= 400)

    assert sorted(handler.seen) == sorted(e.event_id for e in events)
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 400
    assert await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0

    # A new member of the same group, reading and reclaiming for a while, gets nothing again.
    again = Recorder()
    second = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: again})
    await second.start()
    await asyncio.sleep(0.5)
    assert await second.reclaim() == 0
    second.stop()
    assert await second.wait(5)
    assert again.seen == []


async def test_consumer_when_events_spread_uses_every_shard(redis: AnyRedis, bus: Bus) -> None:
    await bus.publish_many([order(i) for i in range(200)])
    lengths = [await redis.xlen(bus.keys.stream(s, EventType.ORDER_REQUESTED)) for s in range(bus.keys.shards)]
    assert sum(lengths) == 200
    assert all(n > 0 for n in lengths), lengths


@pytest.mark.parametrize("precheck", [True, False], ids=["precheck", "commit-only"])
async def test_consumer_when_same_event_id_reemitted_drops_the_duplicate(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings], precheck: bool
) -> None:
    bus = Bus(redis, bus_settings(precheck_duplicates=precheck))
    first = order(1)
    derived = first.derive(first.payload, "gateway")
    again = derived.derive(derived.payload, "replay")
    # The same derived id published twice, as a stage that crashed after emitting would.
    copy = Event.new(derived.payload, portfolio_id=derived.portfolio_id, event_id=derived.event_id)
    handler = Recorder()
    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler})
    await consumer.start()
    try:
        await bus.publish_many([derived, copy])  # a copy in the same batch
        await eventually(lambda: _outputs(redis, bus, 1))
        await bus.publish(copy)  # and a copy long after the first was committed
        await bus.publish(again)
        # All share a portfolio, so one shard: once the last is handled, so is the copy.
        await eventually(lambda: again.event_id in handler.seen)
    finally:
        consumer.stop()
        assert await consumer.wait(10)

    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 2
    assert await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0
    if precheck:  # dropped before the handler runs
        assert handler.seen == [derived.event_id, again.event_id]
    else:  # the handler runs again, but its commit is dropped
        assert handler.seen == [derived.event_id, derived.event_id, again.event_id]


async def _outputs(redis: AnyRedis, bus: Bus, n: int) -> bool:
    return await stream_total(redis, bus, EventType.ORDER_VALIDATED) >= n



async def _drained(bus: Bus) -> bool:
    return await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0


async def test_consumer_when_entries_are_poison_dead_letters_them_with_reasons_and_keeps_going(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    bus = Bus(redis, bus_settings(max_deliveries=3))
    good = order(1, portfolio="pf-poison")
    shard = bus.keys.shard_of("pf-poison")
    stream = bus.keys.stream(shard, EventType.ORDER_REQUESTED)
    raw = encode(good)
    await redis.xadd(stream, {b"d": b"not json at all"})
    await redis.xadd(stream, {b"x": b"no data field"})
    await redis.xadd(stream, {b"d": raw.replace(b'"order.requested"', b'"order.teleported"')})
    await redis.xadd(stream, {b"d": raw.replace(b'"version":"1.0"', b'"version":"2.0"')})
    await redis.xadd(stream, {b"d": raw.replace(b'"quantity":"0.5"', b'"quantity":"lots"')})
    always_fails = order(666, portfolio="pf-poison")
    rejected = order(667, portfolio="pf-poison")
    await bus.publish_many([always_fails, good])
    handler = Recorder(fail_for={"o666"})
    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler})
    await run_until(consumer, lambda: _dead_count(bus, shard, 6), timeout=30)

    letters = {d.reason: d for d in await bus.dead_letters(shard)}
    reasons = sorted(d.reason for d in await bus.dead_letters(shard))
    assert reasons == sorted(
        ["malformed", "malformed", "unknown_event_type", "unsupported_version", "invalid_payload", "handler_error"]
    )
    failing = letters["handler_error"]
    assert failing.deliveries == 3
    assert "cannot handle o666" in failing.error
    assert failing.group == "echo" and failing.stream == stream
    assert decode_any(failing.data).event_id == always_fails.event_id
    assert handler.seen.count(always_fails.event_id) == 3
    assert good.event_id in handler.seen  # the consumer kept going
    assert await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0

    # A handler's PermanentError dead-letters at once, without retries.
    permanent = Recorder(fail_for={"o667"}, permanent=True)
    await bus.publish(rejected)
    await run_until(Consumer(bus, "echo", {EventType.ORDER_REQUESTED: permanent}), lambda: _dead_count(bus, shard, 7))
    assert permanent.seen == [rejected.event_id]
    assert (await bus.dead_letters(shard))[-1].reason == "rejected_by_handler"


async def _dead_count(bus: Bus, shard: int, n: int) -> bool:
    return len(await bus.dead_letters(shard)) >= n


async def test_consumer_when_handler_fails_then_recovers_retries_until_success(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    bus = Bus(redis, bus_settings(max_deliveries=5))
    event = order(5)
    attempts: list[int] = []

    async def flaky(ev: Event[Any], commit: Commit) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("venue hiccup")
        await echo(ev, commit)

    await bus.publish(event)
    await run_until(Consumer(bus, "echo", {EventType.ORDER_REQUESTED: flaky}), lambda: _drained(bus))
    assert len(attempts) == 3
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 1
    assert await bus.dead_letters() == []
    errors = await redis.hgetall(bus.keys.errors(bus.keys.shard_of(event.portfolio_id), "echo"))
    assert errors == {}  # the success forgot the earlier failures


async def test_consumer_when_event_is_workflow_routed_skips_it_but_observers_see_it(
    redis: AnyRedis, bus: Bus
) -> None:
    stream_event = order(1)
    workflow_event = order(2, route=Route.WORKFLOW)
    await bus.publish_many([stream_event, workflow_event])
    stage, observer = Recorder(), Recorder()
    await run_until(Consumer(bus, "echo", {EventType.ORDER_REQUESTED: stage}), lambda: _drained(bus))
    await run_until(
        Consumer(bus, "observer", {EventType.ORDER_REQUESTED: observer}, routes=frozenset(Route)),
        lambda: len(observer.seen) >= 2,
    )
    assert stage.seen == [stream_event.event_id]
    assert sorted(observer.seen) == sorted([stream_event.event_id, workflow_event.event_id])


async def test_commit_when_output_belongs_to_another_shard_publishes_it_there(redis: AnyRedis, bus: Bus) -> None:
    source = order(1, portfolio="pf-a")
    other = next(f"pf-{i}" for i in range(100) if bus.keys.shard_of(f"pf-{i}") != bus.keys.shard_of("pf-a"))

    async def cross(ev: Event[Any], commit: Commit) -> None:
        p = ev.payload
        commit.emit(ev.derive(OrderValidated(
            order_id=p.order_id, client_order_id=p.client_order_id, symbol=p.symbol, side=p.side,
            order_type=p.order_type, quantity=p.quantity), "cross", portfolio_id=other))

    await bus.publish(source)
    await run_until(Consumer(bus, "echo", {EventType.ORDER_REQUESTED: cross}), lambda: _drained(bus))
    entries = await redis.xrange(bus.keys.stream(bus.keys.shard_of(other), EventType.ORDER_VALIDATED))
    assert len(entries) == 1
    assert decode_any(entries[0][1][b"d"]).causation_id == source.event_id


async def test_backlog_when_group_has_not_read_counts_every_entry(redis: AnyRedis, bus: Bus) -> None:
    await bus.ensure_group("slow", [EventType.ORDER_REQUESTED])
    await bus.publish_many([order(i) for i in range(120)])
    assert await bus.backlog("slow", [EventType.ORDER_REQUESTED]) == 120
    lags = await bus.group_lag("slow", [EventType.ORDER_REQUESTED])
    assert sum(lag for lag, _ in lags.values()) == 120


async def test_trim_when_must_persist_group_lags_keeps_everything_it_has_not_acked(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    bus = Bus(redis, bus_settings(shards=1, retention_s=0, must_persist_groups="recorder"))
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    ids = await bus.publish_many([order(i) for i in range(50)])
    assert await bus.trim([EventType.ORDER_REQUESTED]) == 0  # no recorder group yet: keep all

    await bus.ensure_group("recorder", [EventType.ORDER_REQUESTED])
    await bus.ensure_group("risk", [EventType.ORDER_REQUESTED])
    await redis.xreadgroup("risk", "r1", {stream: ">"}, count=50)
    await redis.xack(stream, "risk", *ids)
    await redis.xreadgroup("recorder", "p1", {stream: ">"}, count=30)  # read 30, ack only 20
    await redis.xack(stream, "recorder", *ids[:10], *ids[15:25])

    trimmed = await bus.trim([EventType.ORDER_REQUESTED])
    remaining = [eid for eid, _ in await redis.xrange(stream)]
    assert trimmed == 10
    assert remaining == ids[10:]  # entries 10..14 are still pending for the recorder

    await redis.xack(stream, "recorder", *ids[10:15], *ids[25:30])
    assert await bus.trim([EventType.ORDER_REQUESTED]) == 20
    assert [eid for eid, _ in await redis.xrange(stream)] == ids[30:]  # never read by the recorder yet


async def test_trim_when_retention_not_reached_keeps_recent_entries(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    bus = Bus(redis, bus_settings(shards=1, retention_s=3600, must_persist_groups="recorder"))
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    ids = await bus.publish_many([order(i) for i in range(5)])
    await bus.ensure_group("recorder", [EventType.ORDER_REQUESTED])
    await redis.xreadgroup("recorder", "p1", {stream: ">"}, count=5)
    await redis.xack(stream, "recorder", *ids)
    assert await bus.trim([EventType.ORDER_REQUESTED]) == 0
    assert await redis.xlen(stream) == 5


async def test_publish_when_decimal_amounts_survives_the_wire_exactly(redis: AnyRedis, bus: Bus) -> None:
    event = Event.new(
        OrderValidated(
            order_id="o", client_order_id="c", symbol="ETH/USDT", side=order(0).payload.side,
            order_type=order(0).payload.order_type, quantity=Decimal("0.000000000000000001"),
            price=Decimal("12345678901234567890.123456789"),
        ),
        portfolio_id="pf-x",
    )
    await bus.publish(event)
    entries = await redis.xrange(bus.stream_of(event))
    data = entries[0][1][b"d"]
    assert b'"price":"12345678901234567890.123456789"' in data  # a string, never a float
    decoded = decode_any(data)
    assert decoded == event
    assert decoded.payload.quantity == Decimal("0.000000000000000001")


async def test_batch_handler_when_registered_for_two_types_gets_them_in_one_call_and_commits_each(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    bus = Bus(redis, bus_settings(shards=1, max_deliveries=5))
    requested = [order(i, portfolio="pf-sink") for i in range(20)]
    validated = [e.derive(OrderValidated(
        order_id=e.payload.order_id, client_order_id=e.payload.client_order_id, symbol=e.payload.symbol,
        side=e.payload.side, order_type=e.payload.order_type, quantity=e.payload.quantity), "risk") for e in requested[:10]]
    await bus.publish_many([*requested, *validated])
    calls: list[int] = []

    async def sink(items: list[tuple[Event[Any], Commit]]) -> None:
        calls.append(len(items))
        if len(calls) == 1:
            raise ConnectionError("database restarting")  # the whole call fails, then is retried
        for event, commit in items:
            commit.write("HSET", commit.key("sink"), event.event_id, str(event.event_type))

    recorder = Batch(sink)
    consumer = Consumer(bus, "sink", {EventType.ORDER_REQUESTED: recorder, EventType.ORDER_VALIDATED: recorder})
    await run_until(consumer, lambda: _hlen(redis, bus.keys.state(0, "sink"), 30), timeout=30)

    stored = await redis.hgetall(bus.keys.state(0, "sink"))
    assert {k.decode() for k in stored} == {e.event_id for e in [*requested, *validated]}
    assert calls[0] == 30  # both types in one call
    assert sum(calls[1:]) == 30  # every event again after the failure, each committed once
    assert await bus.backlog("sink", [EventType.ORDER_REQUESTED, EventType.ORDER_VALIDATED]) == 0
    assert await bus.dead_letters() == []


async def _hlen(redis: AnyRedis, key: str, n: int) -> bool:
    return int(await redis.hlen(key)) >= n


async def test_trim_when_a_group_that_is_not_must_persist_lags_keeps_what_it_has_not_read(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    """Retention is a floor, never a reason to cut: every group on a stream holds the trim,
    not only the must-persist ones."""
    bus = Bus(redis, bus_settings(shards=1, retention_s=0, must_persist_groups="recorder"))
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    ids = await bus.publish_many([order(i) for i in range(50)])
    await bus.ensure_group("recorder", [EventType.ORDER_REQUESTED])
    await bus.ensure_group("portfolio", [EventType.ORDER_REQUESTED])
    await redis.xreadgroup("recorder", "r1", {stream: ">"}, count=50)
    await redis.xack(stream, "recorder", *ids)  # the recorder has everything
    await redis.xreadgroup("portfolio", "p1", {stream: ">"}, count=20)  # read 20, ack 5
    await redis.xack(stream, "portfolio", *ids[:5])

    assert await bus.trim([EventType.ORDER_REQUESTED]) == 5
    assert [eid for eid, _ in await redis.xrange(stream)] == ids[5:]

    await redis.xack(stream, "portfolio", *ids[5:20])
    assert await bus.trim([EventType.ORDER_REQUESTED]) == 15
    assert [eid for eid, _ in await redis.xrange(stream)] == ids[20:]  # never delivered to portfolio yet

    # a group that has not read anything at all holds everything
    await redis.xreadgroup("portfolio", "p1", {stream: ">"}, count=30)
    await redis.xack(stream, "portfolio", *ids[20:])
    await bus.ensure_group("notifications", [EventType.ORDER_REQUESTED], start_id="0")
    assert await bus.trim([EventType.ORDER_REQUESTED]) == 0
    assert await redis.xlen(stream) == 30


async def test_reclaim_when_pending_entry_was_deleted_dead_letters_it_with_a_reason_and_counts_it(
    redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    """An entry pending for a group whose data is gone (trimmed or XDEL'd by hand) is never
    skipped silently: it becomes a dead letter saying why, and is counted."""
    bus = Bus(redis, bus_settings(shards=1))
    stream = bus.keys.stream(0, EventType.ORDER_REQUESTED)
    events = [order(i) for i in range(6)]
    ids = await bus.publish_many(events)
    await bus.ensure_group("echo", [EventType.ORDER_REQUESTED])
    await redis.xreadgroup("echo", "died-1", {stream: ">"}, count=6)  # a consumer that died holding them
    await redis.xdel(stream, ids[1], ids[4])
    before = _dead_lettered("echo", "deleted_while_pending")

    handler = Recorder()
    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: handler})
    await run_until(consumer, lambda: _dead_count(bus, 0, 2))

    letters = await bus.dead_letters(0)
    assert sorted(d.entry_id for d in letters) == sorted(i.decode() for i in (ids[1], ids[4]))
    assert {d.reason for d in letters} == {"deleted_while_pending"}
    assert all(d.group == "echo" and d.stream == stream and "deleted" in d.error for d in letters)
    assert sorted(handler.seen) == sorted(e.event_id for i, e in enumerate(events) if i not in (1, 4))
    assert await bus.backlog("echo", [EventType.ORDER_REQUESTED]) == 0
    assert _dead_lettered("echo", "deleted_while_pending") - before == 2


def _dead_lettered(group: str, reason: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "zvt_bus_dead_lettered_total", {"stream": "order.requested", "group": group, "reason": reason}
    )
    return value or 0.0


class Counter:
    """A stateful stage in small: counts each portfolio's events in a state key it loads with
    ``StateReader`` (so the consumer's duplicate check rides along with that load)."""

    def __init__(self, bus: Bus, read: bool = True) -> None:
        self.reader = StateReader(bus.redis)
        self.read = read
        self.calls: list[tuple[str, bool]] = []

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        keys = [commit.key("count", event.portfolio_id) for event, commit in items]
        values = await self.reader.read([("GET", k) for k in keys]) if self.read else [None] * len(keys)
        counts: dict[str, int] = {}
        for (event, commit), key, value in zip(items, keys, values, strict=True):
            self.calls.append((event.event_id, commit.duplicate))
            if commit.duplicate:
                continue
            counts[key] = counts.get(key, int(value or 0)) + 1
            commit.write("SET", key, counts[key])
            await echo(event, commit)


async def test_stage_when_an_event_comes_again_its_state_load_marks_it_duplicate_and_it_counts_once(
    redis: AnyRedis, bus: Bus
) -> None:
    first = order(1, portfolio="pf-count")
    copy = Event.new(first.payload, portfolio_id=first.portfolio_id, event_id=first.event_id)
    later = order(2, portfolio="pf-count")
    stage = Counter(bus)
    consumer = Consumer(
        bus, "counter", {EventType.ORDER_REQUESTED: Batch(stage.handle, reads_state=True)},
        exclusive=True, precheck_duplicates=True,
    )
    await consumer.start()
    try:
        await bus.publish_many([first, copy])  # a copy in the same read: dropped before the stage
        await eventually(lambda: _outputs(redis, bus, 1))
        await bus.publish(copy)  # a copy after the first was committed: the state load finds it
        await bus.publish(later)
        await eventually(lambda: (later.event_id, False) in stage.calls)
    finally:
        consumer.stop()
        assert await consumer.wait(10)

    assert stage.calls == [(first.event_id, False), (first.event_id, True), (later.event_id, False)]
    key = bus.keys.state(bus.keys.shard_of("pf-count"), "count", "pf-count")
    assert await redis.get(key) == b"2"
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 2
    assert await bus.backlog("counter", [EventType.ORDER_REQUESTED]) == 0


async def test_stage_when_a_reads_state_handler_never_loads_its_state_commits_nothing(
    redis: AnyRedis, bus: Bus
) -> None:
    """Without the load there is no duplicate check and no state version: what it decided
    must not commit (it fails, and ends in the dead letters)."""
    stage = Counter(bus, read=False)
    consumer = Consumer(
        bus, "counter", {EventType.ORDER_REQUESTED: Batch(stage.handle, reads_state=True)},
        exclusive=True, precheck_duplicates=True,
    )
    await bus.publish(order(1, portfolio="pf-noread"))
    await run_until(consumer, lambda: _dead_letters(bus, 1))
    assert await stream_total(redis, bus, EventType.ORDER_VALIDATED) == 0
    [dead] = await bus.dead_letters()
    assert dead.reason == "handler_error" and "without loading its state" in dead.error


async def _dead_letters(bus: Bus, n: int) -> bool:
    return len(await bus.dead_letters()) >= n
