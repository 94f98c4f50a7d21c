"""The event bus: sharded Redis Streams with consumer groups.

Publishing: ``Bus.publish`` / ``Bus.publish_many`` append events to ``<ns>:{shard}:<type>``,
the shard being a stable hash of the event's ``portfolio_id``.

Consuming: a ``Consumer`` reads every shard of the event types it handles, in batches, as one
member of a consumer group. For each batch read from one shard it

1. decodes the entries (an entry that is not a valid event goes to the dead-letter stream),
2. skips events whose route it does not act on, and drops event ids the group already
   processed,
3. calls the handler of each event, which records its effects on a ``Commit`` (output events,
   state writes in the same shard) instead of writing them itself,
4. commits the batch with one Lua script, atomically: for every handled event, if the group's
   dedupe mark for its id is new, the state writes and the output events; then the mark and
   the ack. A crash before that point leaves everything pending, to be redelivered; a crash
   after it loses nothing and repeats nothing.

A handler that raises leaves its entry pending; the entry is retried when the reclaimer finds
it idle, and after ``max_deliveries`` deliveries it moves to the shard's dead-letter stream
with the error and the delivery count. Entries of consumers that died are reclaimed the same
way. The same code runs on one Redis and on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.exceptions import RedisError, ResponseError

from services.core.codec import DecodeError, decode, encode
from services.core.events import Event, EventType, Route
from services.core.keys import Keys
from services.core.redisconn import AnyRedis
from services.core.settings import BusSettings
from services.core.telemetry import (
    BUS_BATCH_SECONDS,
    BUS_BATCH_SIZE,
    BUS_DEAD_LETTERED,
    BUS_DELIVERY_LATENCY,
    BUS_LAG,
    BUS_MESSAGES,
    BUS_PENDING,
    BUS_PUBLISHED,
    BUS_RECLAIMED,
    consumer_span,
    current_trace_context,
    get_logger,
    tracing,
)

__all__ = [
    "Bus",
    "Commit",
    "Consumer",
    "DeadLetter",
    "Handler",
    "PermanentError",
    "default_consumer_name",
]

log = get_logger("zvt.bus")

DATA = b"d"  # the one field of a stream entry: the encoded envelope


class PermanentError(Exception):
    """Raised by a handler for input that can never succeed: dead-lettered at once."""


Handler = Callable[[Event[Any], "Commit"], Awaitable[None]]


def default_consumer_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# Lua: the commit and the dedupe check run inside Redis, in one slot.

_COMMIT_LUA = """
-- ARGV: group, seen-prefix, dedupe-ttl-ms, errors-hash, deadletter-stream, then records:
--   C stream id event-id n-out (out-stream data)* n-ops (n-args arg*)*   commit once, ack
--   A stream id                                                          ack only
--   D stream id n-fields (field value)*                                  dead-letter, ack
--   F stream id error                                                    failed: stays pending
--   X stream id                                                          forget a past error
local group, prefix, ttl, errors, dlq = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local acks, dups = {}, {}
local i, n = 6, #ARGV
local function ack(stream, id)
  local ids = acks[stream]
  if not ids then ids = {}; acks[stream] = ids end
  ids[#ids + 1] = id
end
while i <= n do
  local kind, stream, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if kind == 'C' then
    local eid, nout = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    local fresh = redis.call('SET', prefix .. eid, '1', 'NX', 'PX', ttl)
    if fresh then
      for _ = 1, nout do
        redis.call('XADD', ARGV[i], '*', 'd', ARGV[i + 1])
        i = i + 2
      end
    else
      dups[#dups + 1] = eid
      i = i + 2 * nout
    end
    local nops = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, nops do
      local nargs = tonumber(ARGV[i])
      if fresh then redis.call(unpack(ARGV, i + 1, i + nargs)) end
      i = i + 1 + nargs
    end
    ack(stream, id)
  elseif kind == 'A' then
    ack(stream, id)
  elseif kind == 'D' then
    local nf = tonumber(ARGV[i])
    redis.call('XADD', dlq, '*', unpack(ARGV, i + 1, i + 2 * nf))
    i = i + 1 + 2 * nf
    ack(stream, id)
  elseif kind == 'F' then
    redis.call('HSET', errors, stream .. '|' .. id, ARGV[i])
    i = i + 1
  elseif kind == 'X' then
    redis.call('HDEL', errors, stream .. '|' .. id)
  end
end
for stream, ids in pairs(acks) do
  for s = 1, #ids, 1000 do
    redis.call('XACK', stream, group, unpack(ids, s, math.min(s + 999, #ids)))
  end
end
return dups
"""

_SEEN_LUA = """
local prefix, out = ARGV[1], {}
for j = 2, #ARGV do out[j - 1] = redis.call('EXISTS', prefix .. ARGV[j]) end
return out
"""


# ---------------------------------------------------------------------------------------------
# Publishing


class Bus:
    """Publishes events and answers questions about streams (lag, dead letters, trimming)."""

    def __init__(self, redis: AnyRedis, settings: BusSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shards)
        self._commit = redis.register_script(_COMMIT_LUA)
        self._seen = redis.register_script(_SEEN_LUA)

    def stream_of(self, event: Event[Any]) -> str:
        return self.keys.stream(self.keys.shard_of(event.portfolio_id), event.event_type)

    async def publish(self, event: Event[Any]) -> bytes:
        """Append one event; returns its stream entry id."""
        entry_id: bytes = await self.redis.xadd(self.stream_of(event), {DATA: encode(with_trace(event))})
        BUS_PUBLISHED.labels(event.event_type).inc()
        return entry_id

    async def publish_many(self, events: Sequence[Event[Any]]) -> list[bytes]:
        """Append many events in one pipelined round trip per node (not atomic)."""
        if not events:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.stream_of(event), {DATA: encode(with_trace(event))})
        ids: list[bytes] = await pipe.execute()
        counts: dict[EventType, int] = {}
        for event in events:
            counts[event.event_type] = counts.get(event.event_type, 0) + 1
        for event_type, count in counts.items():
            BUS_PUBLISHED.labels(event_type).inc(count)
        return ids

    # -- groups, lag, dead letters -----------------------------------------------------------

    async def ensure_group(self, group: str, event_types: Iterable[EventType], start_id: str = "0") -> None:
        """Create ``group`` on every shard of each type (and the stream if missing)."""
        async def create(key: str) -> None:
            try:
                await self.redis.xgroup_create(key, group, id=start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await asyncio.gather(
            *(create(self.keys.stream(s, t)) for t in event_types for s in range(self.keys.shards))
        )

    async def group_lag(self, group: str, event_types: Iterable[EventType]) -> dict[tuple[EventType, int], tuple[int, int]]:
        """``(lag, pending)`` of ``group`` per (event type, shard); missing streams count as 0."""
        pairs = [(t, s) for t in event_types for s in range(self.keys.shards)]

        async def one(event_type: EventType, shard: int) -> tuple[int, int]:
            try:
                infos = await self.redis.xinfo_groups(self.keys.stream(shard, event_type))
            except ResponseError:
                return 0, 0
            for info in infos:
                if _s(info["name"]) == group:
                    return int(info.get("lag") or 0), int(info["pending"])
            return 0, 0

        results = await asyncio.gather(*(one(t, s) for t, s in pairs))
        return dict(zip(pairs, results, strict=True))

    async def backlog(self, group: str, event_types: Iterable[EventType]) -> int:
        """Entries ``group`` has not finished: what backpressure decisions look at."""
        return sum(lag + pending for lag, pending in (await self.group_lag(group, event_types)).values())

    async def dead_letters(self, shard: int | None = None, count: int = 1000) -> list[DeadLetter]:
        shards = range(self.keys.shards) if shard is None else [shard]
        out: list[DeadLetter] = []
        for s in shards:
            for entry_id, fields in await self.redis.xrange(self.keys.deadletter(s), count=count):
                out.append(DeadLetter.from_fields(_s(entry_id), fields))
        return out

    # -- retention -----------------------------------------------------------------------------

    async def trim(self, event_types: Iterable[EventType]) -> int:
        """Trim each stream behind what every must-persist group has acknowledged, keeping
        at least ``retention_s`` of history. Never drops an entry such a group still needs.

        Safe to run from many processes at once: what a group has acknowledged only grows.
        """
        must = set(self.settings.must_persist_groups)
        retention_cut = max(0, int(time.time() * 1000) - self.settings.retention_s * 1000)
        trimmed = 0
        for event_type in event_types:
            for shard in range(self.keys.shards):
                key = self.keys.stream(shard, event_type)
                cut = await self._safe_cut(key, must)
                if cut is None:
                    continue
                minid = min(cut, (retention_cut, 0))
                if minid <= (0, 0):
                    continue
                trimmed += int(await self.redis.xtrim(key, minid=f"{minid[0]}-{minid[1]}", approximate=False))
        return trimmed

    async def _safe_cut(self, key: str, must: set[str]) -> tuple[int, int] | None:
        """The smallest entry id some must-persist group still needs; None: trim nothing."""
        try:
            infos = await self.redis.xinfo_groups(key)
        except ResponseError:
            return None  # no stream
        groups = {_s(info["name"]): info for info in infos}
        if not must.issubset(groups):
            return None  # a must-persist group has not even started reading: keep everything
        cut = (2**64 - 1, 2**64 - 1)
        for name in must:
            info = groups[name]
            if int(info["pending"]) > 0:
                summary = await self.redis.xpending(key, name)
                oldest = _parse_id(_s(summary["min"]))
            else:
                last = _parse_id(_s(info["last-delivered-id"]))
                oldest = (last[0], last[1] + 1)
            cut = min(cut, oldest)
        return cut


def with_trace(event: Event[Any]) -> Event[Any]:
    """The event pointing at the current span, when tracing is on and a span is current."""
    if not tracing.enabled:
        return event
    traceparent, tracestate = current_trace_context()
    if traceparent is None or traceparent == event.traceparent:
        return event
    return msgspec.structs.replace(event, traceparent=traceparent, tracestate=tracestate)


# ---------------------------------------------------------------------------------------------
# Consuming


class Commit:
    """What handling one event changes, applied atomically with its ack.

    ``emit`` an event for the same shard and it is appended in the commit; an event for
    another shard is published just before the commit (its derived id makes a repeat
    harmless). ``write`` a Redis command whose first argument is a key of this shard.
    """

    __slots__ = ("_keys", "foreign", "outputs", "shard", "writes")

    def __init__(self, keys: Keys, shard: int) -> None:
        self._keys = keys
        self.shard = shard
        self.outputs: list[Event[Any]] = []
        self.foreign: list[Event[Any]] = []
        self.writes: list[tuple[Any, ...]] = []

    def emit(self, event: Event[Any]) -> None:
        event = with_trace(event)
        if self._keys.shard_of(event.portfolio_id) == self.shard:
            self.outputs.append(event)
        else:
            self.foreign.append(event)

    def write(self, command: str, key: str, *args: Any) -> None:
        self.writes.append((command, key, *args))

    def key(self, *parts: str) -> str:
        """A state key of this commit's shard."""
        return self._keys.state(self.shard, *parts)


@dataclass(slots=True)
class _Entry:
    stream: str
    event_type: EventType
    entry_id: str
    data: bytes | None
    deliveries: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry in a dead-letter stream: where it came from, why, and its original data."""

    id: str
    stream: str
    entry_id: str
    group: str
    reason: str
    error: str
    deliveries: int
    consumer: str
    data: bytes

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[bytes, bytes]) -> DeadLetter:
        return cls(
            id=entry_id,
            stream=_s(fields[b"stream"]),
            entry_id=_s(fields[b"entry_id"]),
            group=_s(fields[b"group"]),
            reason=_s(fields[b"reason"]),
            error=_s(fields[b"error"]),
            deliveries=int(fields[b"deliveries"]),
            consumer=_s(fields[b"consumer"]),
            data=fields.get(b"data", b""),
        )


@dataclass
class _Outcome:
    ok: int = 0
    duplicate: int = 0
    skipped: int = 0
    failed: int = 0
    dead: dict[str, int] = field(default_factory=dict)


class Consumer:
    """One member of a consumer group, reading every shard of the types it handles."""

    def __init__(
        self,
        bus: Bus,
        group: str,
        handlers: Mapping[EventType, Handler],
        *,
        name: str | None = None,
        routes: frozenset[Route] = frozenset({Route.STREAM}),
        shards: Iterable[int] | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("a consumer needs at least one handler")
        self.bus = bus
        self.group = group
        self.name = name or default_consumer_name(group)
        self.handlers = dict(handlers)
        self.routes = routes
        self.shards = list(range(bus.keys.shards) if shards is None else shards)
        self._settings = bus.settings
        self._keys = bus.keys
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams = {
            s: {bus.keys.stream(s, t): t for t in self.handlers} for s in self.shards
        }
        self.healthy = False
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.ensure_group(self.group, self.handlers)
        self._tasks = [asyncio.create_task(self._read_loop(s), name=f"read-{self.group}-{s}") for s in self.shards]
        self._tasks.append(asyncio.create_task(self._reclaim_loop(), name=f"reclaim-{self.group}"))
        self._tasks.append(asyncio.create_task(self._lag_loop(), name=f"lag-{self.group}"))
        self.healthy = True
        log.info("consumer started", group=self.group, consumer=self.name, shards=len(self.shards), types=[str(t) for t in self.handlers])

    def stop(self) -> None:
        """Stop reading; batches in hand are finished, committed and acked."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the loops to end; on timeout cancel them (their entries stay pending)."""
        if not self._tasks:
            return True
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.healthy = False
        if not pending:
            await self._forget_self()
        return not pending

    async def run(self) -> None:
        await self.start()
        await self._stopping.wait()
        await self.wait(None)

    async def _forget_self(self) -> None:
        """Leave the group on a clean stop, if nothing of ours is pending."""
        for streams in self._streams.values():
            for key in streams:
                with contextlib.suppress(RedisError):
                    pending = await self.bus.redis.xpending_range(
                        key, self.group, min="-", max="+", count=1, consumername=self.name
                    )
                    if not pending:
                        await self.bus.redis.xgroup_delconsumer(key, self.group, self.name)

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self, shard: int) -> None:
        streams = self._streams[shard]
        request = dict.fromkeys(streams, ">")
        redis = self.bus.redis
        count, block = self._settings.batch_size, self._settings.block_ms
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                reply = await redis.xreadgroup(self.group, self.name, request, count=count, block=block)
                if reply:
                    entries = [
                        _Entry(key, streams[key], _s(eid), fields.get(DATA) if fields else None, 1)
                        for key, items in _iter_reply(reply)
                        for eid, fields in items
                    ]
                    await self._process(shard, entries)
                backoff = 0.05
            except RedisError as exc:
                log.warning("read failed, retrying", group=self.group, shard=shard, error=str(exc))
                await self._sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                log.exception("unexpected error in read loop", group=self.group, shard=shard)
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- processing ----------------------------------------------------------------------------

    async def _process(self, shard: int, entries: list[_Entry]) -> None:
        started = time.perf_counter()
        settings = self._settings
        out = _Outcome()
        args: list[Any] = [
            self.group,
            self._keys.seen_prefix(shard, self.group),
            settings.dedupe_ttl_s * 1000,
            self._keys.errors(shard, self.group),
            self._keys.deadletter(shard),
        ]
        keys: set[str] = {self._keys.errors(shard, self.group), self._keys.deadletter(shard)}
        todo: list[tuple[_Entry, Event[Any]]] = []
        for entry in entries:
            keys.add(entry.stream)
            if entry.deliveries > 1:
                args += ("X", entry.stream, entry.entry_id)
            if entry.data is None:
                self._dead(args, out, entry, "malformed", "entry has no 'd' field")
                continue
            try:
                event = decode(entry.data, entry.event_type)
            except DecodeError as exc:
                self._dead(args, out, entry, str(exc.reason), exc.message)
                continue
            if event.route not in self.routes:
                args += ("A", entry.stream, entry.entry_id)
                out.skipped += 1
                continue
            todo.append((entry, event))

        if todo:
            seen = (
                await self._seen(shard, [event.event_id for _, event in todo])
                if settings.precheck_duplicates
                else [0] * len(todo)
            )
            fresh, batch_ids = [], set()
            for item, was_seen in zip(todo, seen, strict=True):
                if was_seen or item[1].event_id in batch_ids:
                    args += ("A", item[0].stream, item[0].entry_id)
                    out.duplicate += 1
                else:
                    batch_ids.add(item[1].event_id)
                    fresh.append(item)
            todo = fresh

        foreign: list[Event[Any]] = []
        for entry, event in todo:
            commit = Commit(self._keys, shard)
            try:
                with consumer_span(event, self.group):
                    await self.handlers[entry.event_type](event, commit)
            except PermanentError as exc:
                self._dead(args, out, entry, "rejected_by_handler", f"{type(exc).__name__}: {exc}", event.event_id)
                continue
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if entry.deliveries >= settings.max_deliveries:
                    self._dead(args, out, entry, "handler_error", error, event.event_id)
                else:
                    args += ("F", entry.stream, entry.entry_id, error[:2000])
                    out.failed += 1
                log.warning(
                    "handler failed", group=self.group, event_type=str(entry.event_type),
                    entry_id=entry.entry_id, deliveries=entry.deliveries, error=error,
                    correlation_id=event.correlation_id,
                )
                continue
            foreign += commit.foreign
            args += ("C", entry.stream, entry.entry_id, event.event_id, len(commit.outputs))
            for output in commit.outputs:
                stream = self._keys.stream(shard, output.event_type)
                keys.add(stream)
                args += (stream, encode(output))
            args.append(len(commit.writes))
            for write in commit.writes:
                keys.add(write[1])
                args.append(len(write))
                args += write
            out.ok += 1

        if foreign:
            await self.bus.publish_many(foreign)
        dups = await self.bus._commit(keys=sorted(keys), args=args)
        out.ok -= len(dups)
        out.duplicate += len(dups)
        self.processed += len(entries)
        self._observe(entries, out, time.perf_counter() - started)

    def _dead(self, args: list[Any], out: _Outcome, entry: _Entry, reason: str, error: str, event_id: str = "") -> None:
        fields = (
            "stream", entry.stream, "entry_id", entry.entry_id, "group", self.group, "consumer", self.name,
            "reason", reason, "error", error[:4000], "deliveries", entry.deliveries, "event_id", event_id,
            "dead_lettered_at", int(time.time() * 1000), "data", entry.data or b"",
        )
        args += ("D", entry.stream, entry.entry_id, len(fields) // 2, *fields)
        out.dead[reason] = out.dead.get(reason, 0) + 1
        log.error("dead-lettered", group=self.group, stream=entry.stream, entry_id=entry.entry_id, reason=reason, error=error[:500])

    async def _seen(self, shard: int, event_ids: list[str]) -> list[int]:
        tag = next(iter(self._streams[shard]))
        result: list[int] = await self.bus._seen(keys=[tag], args=[self._keys.seen_prefix(shard, self.group), *event_ids])
        return result

    def _observe(self, entries: list[_Entry], out: _Outcome, seconds: float) -> None:
        group = self.group
        stream = str(entries[0].event_type) if len({e.event_type for e in entries}) == 1 else "mixed"
        for outcome, n in (("ok", out.ok), ("duplicate", out.duplicate), ("skipped", out.skipped), ("failed", out.failed)):
            if n:
                BUS_MESSAGES.labels(stream, group, outcome).inc(n)
        for reason, n in out.dead.items():
            BUS_MESSAGES.labels(stream, group, "dead_lettered").inc(n)
            BUS_DEAD_LETTERED.labels(stream, group, reason).inc(n)
        BUS_BATCH_SECONDS.labels(group).observe(seconds)
        BUS_BATCH_SIZE.labels(group).observe(len(entries))
        oldest_ms = min(int(e.entry_id.split("-", 1)[0]) for e in entries)
        BUS_DELIVERY_LATENCY.labels(group).observe(max(0.0, time.time() - oldest_ms / 1000))

    # -- reclaiming ----------------------------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        interval = self._settings.reclaim_interval_ms / 1000
        while not self._stopping.is_set():
            await self._sleep(interval)
            if self._stopping.is_set():
                break
            try:
                await self.reclaim()
            except RedisError as exc:
                log.warning("reclaim failed", group=self.group, error=str(exc))
            except Exception:
                log.exception("unexpected error in reclaim loop", group=self.group)

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``reclaim_idle_ms`` (of dead consumers, or whose
        handler failed) and process them; dead-letter those delivered too often."""
        total = 0
        for shard in self.shards:
            if self._stopping.is_set():
                break
            for stream, event_type in self._streams[shard].items():
                total += await self._reclaim_stream(shard, stream, event_type)
        return total

    async def _reclaim_stream(self, shard: int, stream: str, event_type: EventType) -> int:
        redis = self.bus.redis
        idle = self._settings.reclaim_idle_ms
        pending = await redis.xpending_range(
            stream, self.group, min="-", max="+", count=self._settings.batch_size, idle=idle
        )
        if not pending:
            return 0
        deliveries = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        claimed = await redis.xclaim(stream, self.group, self.name, min_idle_time=idle, message_ids=list(deliveries))
        entries: list[_Entry] = []
        limit = self._settings.max_deliveries
        exhausted: list[_Entry] = []
        for eid, fields in claimed:
            entry_id = _s(eid)
            if fields is None:
                continue  # trimmed away; XCLAIM dropped it from the pending list
            entry = _Entry(stream, event_type, entry_id, fields.get(DATA), deliveries.get(entry_id, 0) + 1)
            (exhausted if entry.deliveries > limit else entries).append(entry)
        if claimed:
            BUS_RECLAIMED.labels(event_type, self.group).inc(len(claimed))
        if exhausted:
            await self._dead_letter_exhausted(shard, exhausted)
        if entries:
            await self._process(shard, entries)
        return len(claimed)

    async def _dead_letter_exhausted(self, shard: int, entries: list[_Entry]) -> None:
        errors_key = self._keys.errors(shard, self.group)
        errors = await self.bus.redis.hmget(errors_key, [f"{e.stream}|{e.entry_id}" for e in entries])
        args: list[Any] = [
            self.group, self._keys.seen_prefix(shard, self.group), self._settings.dedupe_ttl_s * 1000,
            errors_key, self._keys.deadletter(shard),
        ]
        out = _Outcome()
        for entry, error in zip(entries, errors, strict=True):
            entry.deliveries -= 1  # this claim is not a delivery to a handler
            last = _s(error) if error else "no handler finished it (consumers stopped or died while handling it)"
            args += ("X", entry.stream, entry.entry_id)
            self._dead(args, out, entry, "max_deliveries", last)
        keys = sorted({errors_key, self._keys.deadletter(shard), *(e.stream for e in entries)})
        await self.bus._commit(keys=keys, args=args)
        self._observe(entries, out, 0.0)

    # -- lag -------------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                lags = await self.bus.group_lag(self.group, self.handlers)
                for (event_type, shard), (lag, pending) in lags.items():
                    if shard in self.shards:
                        BUS_LAG.labels(event_type, self.group, str(shard)).set(lag)
                        BUS_PENDING.labels(event_type, self.group, str(shard)).set(pending)
            except RedisError as exc:
                log.warning("lag check failed", group=self.group, error=str(exc))
            await self._sleep(self._settings.lag_interval_s)


# ---------------------------------------------------------------------------------------------
# helpers


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _iter_reply(reply: Any) -> Iterable[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREADGROUP replies are a list of [stream, entries] (RESP2) or a dict (RESP3)."""
    if isinstance(reply, dict):
        for key, value in reply.items():
            yield _s(key), value[0] if value and isinstance(value[0], list) else value
    else:
        for key, items in reply:
            yield _s(key), items
