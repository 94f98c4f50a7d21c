"""The event bus: sharded Redis Streams with consumer groups.

Publishing: ``Bus.publish`` / ``Bus.publish_many`` append events to ``<ns>:{shard}:<type>``,
the shard being a stable hash of the event's ``portfolio_id``.

Consuming: a ``Consumer`` reads every shard of the event types it handles, in batches, as one
member of a consumer group (on a single Redis a few read loops share the shards, on a
cluster each shard has its own). For each batch it

1. decodes the entries (an entry that is not a valid event goes to the dead-letter stream),
2. skips events whose route it does not act on, and drops repeated event ids,
3. calls the handler of each event, which records its effects on a ``Commit`` (output events,
   state writes in the same shard) instead of writing them itself,
4. commits the batch with one Lua script (per slot), atomically: for every handled event, if the group's
   dedupe mark for its id is new, the state writes and the output events; then the mark and
   the ack. A crash before that point leaves everything pending, to be redelivered; a crash
   after it loses nothing and repeats nothing.

A handler that raises leaves its entry pending; the entry is retried when the reclaimer finds
it idle, and after ``max_deliveries`` deliveries it moves to the shard's dead-letter stream
with the error and the delivery count. Entries of consumers that died are reclaimed the same
way. A handler that raises ``Unavailable`` (a dependency is down, not a verdict on the input)
spends none of that budget: the consumer pauses and retries the same entries with backoff.
The same code runs on one Redis and on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from services.core.codec import DecodeError, decode, encode
from services.core.events import Event, EventType, Route
from services.core.keys import Keys
from services.core.redisconn import AnyRedis, Lane
from services.core.settings import BusSettings
from services.core.telemetry import (
    BUS_BATCH_SECONDS,
    BUS_BATCH_SIZE,
    BUS_DEAD_LETTERED,
    BUS_STATE_CONFLICTS,
    BUS_DELIVERY_LATENCY,
    BUS_LAG,
    BUS_MESSAGES,
    BUS_PAUSED,
    BUS_PENDING,
    BUS_PUBLISHED,
    BUS_RECLAIMED,
    batch_span,
    consumer_span,
    current_event,
    current_trace_context,
    get_logger,
    tracing,
)

__all__ = [
    "Batch",
    "LeaseLost",
    "Bus",
    "Commit",
    "Consumer",
    "DeadLetter",
    "EventHandler",
    "Handler",
    "PermanentError",
    "Unavailable",
    "VersionedRead",
    "default_consumer_name",
]

log = get_logger("zvt.bus")

DATA = b"d"  # the one field of a stream entry: the encoded envelope
TARGET = b"g"  # only on a requeued dead letter: the one group it is for (the others had the original)


class LeaseLost(Exception):
    """This consumer no longer owns the shards named: their commit was refused."""

    def __init__(self, shards: list[int]) -> None:
        super().__init__(f"lease lost for shards {shards}")
        self.shards = shards


class PermanentError(Exception):
    """Raised by a handler for input that can never succeed: dead-lettered at once."""


class Unavailable(Exception):
    """Raised by a handler when something it depends on is down (its database unreachable or
    hung, a connection lost): not a verdict on the input, so it costs the entries nothing.

    The attempt does not count toward ``max_deliveries`` (the entries' delivery counts are put
    back) and nothing is dead-lettered. The consumer pauses: it reads and reclaims nothing new
    while it retries the same entries with backoff (doubling up to ``UNAVAILABLE_BACKOFF_MAX_S``)
    until they go through. On a stop they stay pending, counted as before. If any handler of a
    read raises it, none of that read's handled entries commit: they are all retried together,
    in order.
    """


EventHandler = Callable[[Event[Any], "Commit"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Batch:
    """A handler that takes every event of its types in a batch at once, as a list of
    ``(event, commit)`` in the order Redis appended them: for sinks that write many events in
    one transaction (the recorder).

    If it raises, every event of the call counts as failed (retried, then dead-lettered);
    if it returns, each commit is applied as for a per-event handler, except those it marked
    with ``Commit.fail`` (handled as if that event's handler had raised). Register the same
    ``Batch`` for several types to receive them in one call.
    """

    fn: Callable[[list[tuple[Event[Any], "Commit"]]], Awaitable[None]]
    reads_state: bool = False
    """The handler loads its state through ``services.core.hotstate.StateReader`` before it
    decides anything, and skips every event whose ``Commit.duplicate`` is set after that load.
    The consumer then sends its duplicate check and the shards' state versions along with the
    handler's first read instead of in a round trip of their own (``StateRead``)."""


Handler = EventHandler | Batch


class StateRead:
    """A batch's state reads for a ``Batch(reads_state=True)`` handler: the first also asks,
    in the same script call, which events were handled before (their commits get
    ``duplicate``) and at which version each shard's state is read."""

    __slots__ = ("_check", "_commits", "_consumer", "_lane", "_shards", "_todo", "done", "versions")

    def __init__(
        self, consumer: Consumer, todo: list[tuple[_Entry, Event[Any], list[Any]]], commits: dict[int, Commit],
        lane: Lane | None,
    ) -> None:
        self._consumer = consumer
        self._todo = todo
        self._commits = commits  # id(entry) -> its commit
        self._lane = lane
        self._check = consumer._precheck
        self._shards = sorted({entry.shard for entry, _, _ in todo}) if consumer.exclusive else []
        self.done = False
        self.versions: dict[int, str] = {}

    async def read(self, ops: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``ops``: ``(command, key, *args)`` each; their replies in order."""
        if self.done:
            return await self._consumer._read_state(list(ops), self._lane) if ops else []
        headers = self._consumer._headers
        extra: list[tuple[Any, ...]] = [("GET", headers[s][5]) for s in self._shards]
        if self._check:
            extra += [("EXISTS", headers[entry.shard][0] + event.event_id) for entry, event, _ in self._todo]
        replies = await self._consumer._read_state(extra + list(ops), self._lane)
        self.done = True
        n = len(self._shards)
        self.versions = {s: _s(v) if v else "0" for s, v in zip(self._shards, replies[:n], strict=True)}
        if self._check:
            for (entry, _, _), seen in zip(self._todo, replies[n : len(extra)], strict=True):
                if seen:
                    self._commits[id(entry)].duplicate = True
        return replies[len(extra):]


class VersionedRead:
    """One event's state reads outside a consumer (a workflow task calling a stage, then
    ``Bus.apply``): the first also asks, in the same script call, at which version ``group``'s
    state in ``shard`` is read (``version``, for ``apply``)."""

    __slots__ = ("_bus", "_key", "done", "version")

    def __init__(self, bus: Bus, group: str, shard: int) -> None:
        self._bus = bus
        self._key = bus.keys.version(shard, group)
        self.done = False
        self.version = "0"

    async def read(self, ops: Sequence[tuple[Any, ...]]) -> list[Any]:
        if self.done:
            return await self._bus.read_state(ops) if ops else []
        replies = await self._bus.read_state([("GET", self._key), *ops])
        self.done = True
        self.version = _s(replies[0]) if replies[0] else "0"
        return replies[1:]


current_state_read: ContextVar[StateRead | VersionedRead | None] = ContextVar("current_state_read", default=None)
"""Set while a ``Batch(reads_state=True)`` handler runs under a consumer, or a stage's handler
under ``Bus.apply``'s caller (``VersionedRead``)."""


UNAVAILABLE_BACKOFF_S = 0.1
"""First pause of a consumer whose handler raised ``Unavailable``; it doubles per failed retry ..."""
UNAVAILABLE_BACKOFF_MAX_S = 5.0
"""... up to this, or half of ``reclaim_idle_ms`` if less (the entries held are touched before
each retry, so other members of the group do not reclaim them meanwhile)."""


def default_consumer_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# Lua: the commit and the dedupe check run inside Redis, in one slot.

_COMMIT_LUA = """
-- ARGV[1] group, ARGV[2] dedupe ttl (ms), ARGV[3] msgpack: a list of per-shard batches
-- (ARGV[4] the bound of a dead-letter stream, MAXLEN ~)
--   {seen-prefix, errors-hash, deadletter-stream, records, lease-key or '', owner,
--    version-key or '', the version the batch's state was read at};
-- returns {duplicate event ids, leases found lost, version keys found moved}. Each record a list:
--   {'C', stream, id, event-id, {{out-stream, data}...}, {{command, key, arg...}...}}
--                                           commit once (mark new: writes and outputs), ack
--   {'A', stream, id}                       ack only
--   {'D', stream, id, {field, value, ...}}  dead-letter, ack
--   {'F', stream, id, error}                failed: stays pending, the error is remembered
--   {'X', stream, id}                       forget a past error
local group, ttl = ARGV[1], ARGV[2]
local dups, lost, moved = {}, {}, {}
for _, batch in ipairs(cmsgpack.unpack(ARGV[3])) do
  local prefix, errors, dlq = batch[1], batch[2], batch[3]
  local acks = {}
  local records = batch[4]
  -- a shard lease (exclusive consumers): a deposed owner's commit is refused whole
  if batch[5] ~= '' and redis.call('GET', batch[5]) ~= batch[6] then
    lost[#lost + 1] = batch[5]
    records = {}
  elseif batch[7] ~= '' then
    -- the state changed since it was read (a workflow task committed): refused whole, redone
    if (redis.call('GET', batch[7]) or '0') ~= batch[8] then
      moved[#moved + 1] = batch[7]
      records = {}
    else
      redis.call('INCR', batch[7])
    end
  end
  for _, r in ipairs(records) do
    local kind, stream, id = r[1], r[2], r[3]
    local ack = true
    if kind == 'C' then
      if redis.call('SET', prefix .. r[4], '1', 'NX', 'PX', ttl) then
        for _, o in ipairs(r[5]) do redis.call('XADD', o[1], '*', 'd', o[2]) end
        for _, w in ipairs(r[6]) do redis.call(unpack(w)) end
      else
        dups[#dups + 1] = r[4]
      end
    elseif kind == 'D' then
      redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[4], '*', unpack(r[4]))
    elseif kind == 'F' then
      redis.call('HSET', errors, stream .. '|' .. id, r[4])
      ack = false
    elseif kind == 'X' then
      redis.call('HDEL', errors, stream .. '|' .. id)
      ack = false
    end
    if ack then
      local ids = acks[stream]
      if not ids then ids = {}; acks[stream] = ids end
      ids[#ids + 1] = id
    end
  end
  for stream, ids in pairs(acks) do
    for s = 1, #ids, 1000 do
      redis.call('XACK', stream, group, unpack(ids, s, math.min(s + 999, #ids)))
    end
  end
end
return {dups, lost, moved}
"""

_RENEW_LUA = """
-- KEYS[1] a lease, ARGV[1] its owner, ARGV[2] ttl ms (0: release); 1 if still ours
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_ACQUIRE_LUA = """
-- KEYS[1] a lease, ARGV[1] the candidate, ARGV[2] ttl ms; 1 if it is the candidate's now
-- (free, or already its own: a member restarted under the same name keeps its shards)
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_TICK_LUA = """
-- The upkeep of an exclusive member, over keys of one slot (on a single Redis: all at once).
-- ARGV[1] the member, ARGV[2] ttl ms (0: it leaves, releasing what it holds),
-- ARGV[3] msgpack: the leases it holds, each renewed (or released) if still its own;
-- ARGV[4] the members registry or '' (a zset: member -> heartbeat expiry, in Redis's clock),
-- ARGV[5] the shards each member holds (a hash in the registry's slot: member -> '1,5,9'),
-- ARGV[6] this member's shards. Expired members are dropped from both.
-- Returns {{1 or 0 per lease: still its own}, {member, its shards, ...} of the live members}
local name, ttl = ARGV[1], tonumber(ARGV[2])
local held = {}
for i, key in ipairs(cmsgpack.unpack(ARGV[3])) do
  if redis.call('GET', key) == name then
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('DEL', key) end
    held[i] = 1
  else
    held[i] = 0
  end
end
local live = {}
if ARGV[4] ~= '' then
  local members, shards = ARGV[4], ARGV[5]
  if ttl > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZADD', members, now + ttl, name)
    redis.call('HSET', shards, name, ARGV[6])
    for _, gone in ipairs(redis.call('ZRANGEBYSCORE', members, '-inf', '(' .. now)) do
      redis.call('ZREM', members, gone)
      redis.call('HDEL', shards, gone)
    end
    redis.call('PEXPIRE', members, ttl * 10)
    redis.call('PEXPIRE', shards, ttl * 10)
  else
    redis.call('ZREM', members, name)
    redis.call('HDEL', shards, name)
  end
  for _, m in ipairs(redis.call('ZRANGE', members, 0, -1)) do
    live[#live + 1] = m
    live[#live + 1] = redis.call('HGET', shards, m) or ''
  end
end
return {held, live}
"""

_SEEN_LUA = """
-- ARGV[1] msgpack: a list of {seen-prefix, {event-id...}, version-key or ''}; returns 1 or 0
-- per id, in order, then each batch's state version ('' without a version key)
local out, versions = {}, {}
for i, batch in ipairs(cmsgpack.unpack(ARGV[1])) do
  for _, eid in ipairs(batch[2]) do out[#out + 1] = redis.call('EXISTS', batch[1] .. eid) end
  versions[i] = batch[3] == '' and '' or (redis.call('GET', batch[3]) or '0')
end
for _, v in ipairs(versions) do out[#out + 1] = v end
return out
"""

_APPLY_LUA = """
-- A commit made outside a consumer group (a workflow task): KEYS[1] the dedupe mark of the
-- input for the stage's group, KEYS[2] the group's state version in the shard, KEYS[3] where
-- the outputs are kept for a repeat; ARGV[1] dedupe ttl (ms), ARGV[2] the version the state
-- was read at, ARGV[3] msgpack {{out-stream, data}...}, ARGV[4] msgpack {{command, key, arg...}...},
-- ARGV[5] the outputs to keep.
-- Returns {1} applied, {0, kept outputs} already applied, {-1} the state moved since it was read.
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('GET', KEYS[3]) or ''} end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[2] then return {-1} end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[1])
redis.call('INCR', KEYS[2])
for _, o in ipairs(cmsgpack.unpack(ARGV[3])) do redis.call('XADD', o[1], '*', 'd', o[2]) end
for _, w in ipairs(cmsgpack.unpack(ARGV[4])) do redis.call(unpack(w)) end
return {1}
"""

STATE_READ_LUA = """
-- KEYS: one key per read; ARGV[1]: msgpack list of {command, extra args...}, one per key
local out = {}
for i, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  out[i] = redis.call(op[1], KEYS[i], unpack(op, 2))
end
return out
"""

def state_read_call(ops: Sequence[tuple[Any, ...]]) -> tuple[list[Any], list[bytes]]:
    """The keys and arguments of ``STATE_READ_LUA`` for ``ops`` (``(command, key, *args)`` each)."""
    return [op[1] for op in ops], [_pack([[op[0], *op[2:]] for op in ops])]


_PUBLISH_LUA = """
-- ARGV[1] msgpack: a list of {stream, data}; appends each, returns the entry ids in order
local ids = {}
for i, e in ipairs(cmsgpack.unpack(ARGV[1])) do ids[i] = redis.call('XADD', e[1], '*', 'd', e[2]) end
return ids
"""

_pack = msgspec.msgpack.Encoder().encode


def _mp_bytes(data: bytes) -> msgspec.Raw:
    """Bytes as a msgpack *str*: Redis's Lua msgpack predates the bin types, and Lua strings
    are binary-safe anyway."""
    n = len(data)
    if n < 32:
        head = bytes((0xA0 | n,))
    elif n < 0x100:
        head = bytes((0xD9, n))
    elif n < 0x10000:
        head = b"\xda" + n.to_bytes(2, "big")
    else:
        head = b"\xdb" + n.to_bytes(4, "big")
    return msgspec.Raw(head + data)


def _raw_reply(response: Any, **_: Any) -> Any:
    """XREADGROUP replies as Redis sent them: the bus reads only field ``d`` of each entry,
    and skipping redis-py's per-entry dict building is a large share of the read cost."""
    return response


# ---------------------------------------------------------------------------------------------
# Publishing


class Bus:
    """Publishes events and answers questions about streams (lag, dead letters, trimming)."""

    def __init__(self, redis: AnyRedis, settings: BusSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shards)
        self.cluster = isinstance(redis, RedisCluster)
        self._commit = redis.register_script(_COMMIT_LUA)
        self._seen = redis.register_script(_SEEN_LUA)
        self._append = redis.register_script(_PUBLISH_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._tick = redis.register_script(_TICK_LUA)
        self._apply = redis.register_script(_APPLY_LUA)
        self._read = redis.register_script(STATE_READ_LUA)
        self.group_ages: dict[tuple[str, str], float] = {}
        redis.set_response_callback("XREADGROUP", _raw_reply)

    def stream_of(self, event: Event[Any]) -> str:
        return self.keys.stream(self.keys.shard_of(event.portfolio_id), event.event_type)

    async def publish(self, event: Event[Any]) -> bytes:
        """Append one event; returns its stream entry id."""
        entry_id: Any = await self.redis.xadd(self.stream_of(event), {DATA: encode(with_trace(event))})
        BUS_PUBLISHED.labels(event.event_type).inc()
        return bytes(entry_id)

    async def publish_many(self, events: Sequence[Event[Any]]) -> list[bytes]:
        """Append many events: one script call per slot (one in all on a single Redis),
        concurrently. Atomic per slot, not across slots; returns the entry ids in order."""
        if not events:
            return []
        keys = self.keys
        groups: dict[int, list[int]] = {}
        entries: list[tuple[str, msgspec.Raw]] = []
        counts: dict[EventType, int] = {}
        for i, event in enumerate(events):
            shard = keys.shard_of(event.portfolio_id)
            entries.append((keys.stream(shard, event.event_type), _mp_bytes(encode(with_trace(event)))))
            groups.setdefault(shard if self.cluster else 0, []).append(i)
            counts[event.event_type] = counts.get(event.event_type, 0) + 1

        async def append(indexes: list[int]) -> list[Any]:
            batch = [entries[i] for i in indexes]
            ids: list[Any] = await self._append(keys=[batch[0][0]], args=[_pack(batch)])
            return ids

        ordered = list(groups.values())
        replies = await asyncio.gather(*(append(ix) for ix in ordered))
        result: list[bytes] = [b""] * len(events)
        for indexes, ids in zip(ordered, replies, strict=True):
            for i, entry_id in zip(indexes, ids, strict=True):
                result[i] = entry_id
        for event_type, count in counts.items():
            BUS_PUBLISHED.labels(event_type).inc(count)
        return result

    # -- groups, lag, dead letters -----------------------------------------------------------

    async def read_state(self, ops: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Reads of one slot in one script call (``STATE_READ_LUA``); ``ops``: ``(command,
        key, *args)`` each; their replies in order."""
        keys, args = state_read_call(ops)
        result: list[Any] = await self._read(keys=keys, args=args)
        return result

    async def state_version(self, group: str, shard: int) -> str:
        """The version of ``group``'s state in ``shard``, to pass to ``apply``."""
        value = await self.redis.get(self.keys.version(shard, group))
        return _s(value) if value else "0"

    async def apply(
        self, group: str, event: Event[Any] | str, commit: Commit, version: str
    ) -> list[Event[Any]] | None:
        """Commit what a stage decided about ``event`` outside its consumer group (a workflow
        task calling the stage): the writes, the outputs and ``group``'s dedupe mark for the
        event, all or nothing, and only if the state is still at ``version``. ``event`` may be
        an id alone: what the stage decided about something it observed rather than consumed
        (routing following its orders at the venues), named by that observation.

        Returns the events the stage emitted. When the event had already been handled (the
        task ran again after its commit), nothing is written and the events of that first
        commit come back. None: the state moved since it was read; read it again, decide
        again and apply again."""
        if commit.error is not None:
            raise commit.error
        if commit.foreign:
            await self.publish_many(commit.foreign)
        shard = commit.shard
        emitted = commit.outputs + commit.foreign
        outputs = [(self.keys.stream(shard, o.event_type), _mp_bytes(encode(o))) for o in commit.outputs]
        kept = _pack([(str(o.event_type), _mp_bytes(encode(o))) for o in emitted])
        tag = self.keys.tag(shard)
        event_id = event if isinstance(event, str) else event.event_id
        reply: list[Any] = await self._apply(
            keys=[self.keys.seen_prefix(shard, group) + event_id, self.keys.version(shard, group),
                  f"{tag}:applied:{group}:{event_id}"],
            args=[self.settings.dedupe_ttl_s * 1000, version, _pack(outputs), _pack(commit.writes), kept],
        )
        result = int(reply[0])
        if result == -1:
            return None
        if result == 1:
            for o in commit.outputs:
                BUS_PUBLISHED.labels(o.event_type).inc()
            return emitted
        if not reply[1]:
            return []  # handled by a stream consumer, whose outputs are not kept
        return [decode(_b(data), EventType(t)) for t, data in msgspec.msgpack.decode(reply[1])]

    async def ensure_group(self, group: str, event_types: Iterable[EventType], start_id: str = "0") -> None:
        """Create ``group`` on every shard of each type (and the stream if missing)."""
        async def create(key: str) -> None:
            try:
                await self.redis.xgroup_create(key, group, id=start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await _gather_bounded([create(self.keys.stream(s, t)) for t in event_types for s in range(self.keys.shards)])

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

        results = await _gather_bounded([one(t, s) for t, s in pairs])
        return dict(zip(pairs, results, strict=True))

    async def backlog(self, group: str, event_types: Iterable[EventType]) -> int:
        """Entries ``group`` has not finished: what backpressure decisions look at."""
        return sum(lag + pending for lag, pending in (await self.group_lag(group, event_types)).values())

    async def dead_letters(self, shard: int | None = None, count: int = 1000) -> list[DeadLetter]:
        shards = range(self.keys.shards) if shard is None else [shard]
        out: list[DeadLetter] = []
        for s in shards:
            entries: Any = await self.redis.xrange(self.keys.deadletter(s), count=count)
            for entry_id, fields in entries:
                out.append(DeadLetter.from_fields(_s(entry_id), fields, s))
        return out

    # -- retention -----------------------------------------------------------------------------

    async def trim(self, event_types: Iterable[EventType]) -> int:
        """Trim each stream behind what *every* consumer group on it has acknowledged, keeping
        at least ``retention_s`` of history. Never drops an entry some group has not
        acknowledged (pending, or not yet delivered): retention is a floor, never a reason to
        cut. A stream missing one of ``must_persist_groups`` is not trimmed at all.

        Also measures, for every group, the age of the oldest entry it has not acknowledged
        (``group_ages`` afterwards: (event type, group) -> seconds, the maximum over shards).

        Safe to run from many processes at once: what a group has acknowledged only grows.
        """
        must = set(self.settings.must_persist_groups)
        now_ms = int(time.time() * 1000)
        retention_cut = (max(0, now_ms - self.settings.retention_s * 1000), 0)
        ages: dict[tuple[str, str], float] = {}
        trimmed = 0
        for event_type in event_types:
            for shard in range(self.keys.shards):
                key = self.keys.stream(shard, event_type)
                positions = await self._group_positions(key)
                if positions is None:
                    continue  # no stream
                for group, (_, oldest) in positions.items():
                    age = 0.0 if oldest is None else max(0.0, (now_ms - oldest[0]) / 1000)
                    label = (str(event_type), group)
                    ages[label] = max(ages.get(label, 0.0), age)
                if not must.issubset(positions):
                    continue  # a must-persist group has not even started reading: keep everything
                minid = min([retention_cut, *(cut for cut, _ in positions.values())])
                if minid <= (0, 0):
                    continue
                trimmed += int(await self.redis.xtrim(key, minid=f"{minid[0]}-{minid[1]}", approximate=False))
        self.group_ages = ages
        return trimmed

    async def _group_positions(
        self, key: str
    ) -> dict[str, tuple[tuple[int, int], tuple[int, int] | None]] | None:
        """For each group on stream ``key``: the smallest entry id it may still need (nothing
        below it may be trimmed), and the id of the oldest entry it has not acknowledged (None
        when it has everything). None: no such stream."""
        try:
            infos = await self.redis.xinfo_groups(key)
        except ResponseError:
            return None
        out: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {}
        for info in infos:
            name = _s(info["name"])
            last = _parse_id(_s(info["last-delivered-id"]))
            after_last = (last[0], last[1] + 1)
            undelivered: tuple[int, int] | None = None
            lag = info.get("lag")
            if lag is None or int(lag) > 0:  # None: Redis cannot tell (entries were deleted)
                first: Any = await self.redis.xrange(key, min=f"({last[0]}-{last[1]}", count=1)
                if first:
                    undelivered = _parse_id(_s(first[0][0]))
            summary = await self.redis.xpending(key, name) if int(info["pending"]) > 0 else None
            if summary is not None and summary.get("min") is not None:
                oldest_pending = _parse_id(_s(summary["min"]))
                out[name] = (min(oldest_pending, after_last), oldest_pending)
            else:  # nothing pending (acknowledged since XINFO answered: it is no older than this)
                out[name] = (after_last, undelivered)
        return out

    async def deadletter_lengths(self) -> dict[int, int]:
        """Entries in each shard's dead-letter stream."""
        shards = list(range(self.keys.shards))
        lengths = await _gather_bounded([self.redis.xlen(self.keys.deadletter(s)) for s in shards])
        return {s: int(n) for s, n in zip(shards, lengths, strict=True)}


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

    __slots__ = ("_keys", "duplicate", "error", "foreign", "outputs", "shard", "writes")

    def __init__(self, keys: Keys, shard: int) -> None:
        self._keys = keys
        self.shard = shard
        self.outputs: list[Event[Any]] = []
        self.foreign: list[Event[Any]] = []
        self.writes: list[tuple[Any, ...]] = []
        self.error: Exception | None = None
        self.duplicate = False
        """Set by the state load of a ``Batch(reads_state=True)`` handler: this event was
        handled before (a redelivery); the handler skips it, and it is only acknowledged."""

    def fail(self, error: Exception) -> None:
        """For ``Batch`` handlers: this one event failed (as if its handler had raised
        ``error``): its outputs and writes are dropped, the rest of the batch commits."""
        self.error = error
        self.outputs.clear()
        self.foreign.clear()
        self.writes.clear()

    def emit(self, event: Event[Any]) -> None:
        event = with_trace(event)
        if self._keys.shard_of(event.portfolio_id) == self.shard:
            self.outputs.append(event)
        else:
            self.foreign.append(event)

    def write(self, command: str, key: str, *args: Any) -> None:
        self.writes.append((command, key, *(_mp_bytes(a) if isinstance(a, bytes) else a for a in args)))

    def key(self, *parts: str) -> str:
        """A state key of this commit's shard."""
        return self._keys.state(self.shard, *parts)


@dataclass(slots=True)
class _Entry:
    shard: int
    stream: str
    event_type: EventType
    entry_id: str
    data: bytes | None
    deliveries: int
    target: str | None = None  # a requeued entry is for this group only (field ``g``)


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
    event_id: str = ""
    dead_lettered_at: int = 0
    """Milliseconds since the epoch (the dead-letter entry's id)."""
    shard: int = 0

    @property
    def ref(self) -> str:
        """How tools name it: ``<shard>/<id in the shard's dead-letter stream>``."""
        return f"{self.shard}/{self.id}"

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[bytes, bytes], shard: int = 0) -> DeadLetter:
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
            event_id=_s(fields.get(b"event_id", b"")),
            dead_lettered_at=_parse_id(entry_id)[0],
            shard=shard,
        )


class _Outcome:
    """What became of a batch's entries: counts per (event type, outcome), and dead-letter
    reasons per event type, for the metrics."""

    __slots__ = ("counts", "dead")

    def __init__(self) -> None:
        self.counts: dict[tuple[EventType, str], int] = {}
        self.dead: dict[tuple[EventType, str], int] = {}

    def add(self, event_type: EventType, outcome: str, n: int = 1) -> None:
        key = (event_type, outcome)
        self.counts[key] = self.counts.get(key, 0) + n


class Consumer:
    """One member of a consumer group, reading every shard of the types it handles.

    On a single Redis ``read_loops`` loops share the shards (one ``XREADGROUP`` over their
    streams, one commit script per read). On a cluster a command may only touch one slot, so
    each shard has its own read loop and commit.
    """

    def __init__(
        self,
        bus: Bus,
        group: str,
        handlers: Mapping[EventType, Handler],
        *,
        name: str | None = None,
        routes: frozenset[Route] = frozenset({Route.STREAM}),
        shards: Iterable[int] | None = None,
        precheck_duplicates: bool | None = None,
        exclusive: bool = False,
    ) -> None:
        """``exclusive``: own shards through leases, so that one member of the group at a
        time handles a shard, in order: for stages that read the state they write."""
        if not handlers:
            raise ValueError("a consumer needs at least one handler")
        self.bus = bus
        self.group = group
        self.name = name or default_consumer_name(group)
        self.handlers = dict(handlers)
        self.routes = routes
        self.shards = list(range(bus.keys.shards) if shards is None else shards)
        self._settings = bus.settings
        self._precheck = bus.settings.precheck_duplicates if precheck_duplicates is None else precheck_duplicates
        self._keys = bus.keys
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # stream key -> (shard, event type), for every stream this consumer reads
        self._streams = {
            bus.keys.stream(s, t): (s, t) for s in self.shards for t in self.handlers
        }
        # A cluster command touches one slot, so each shard needs its own loop there. On a
        # single Redis a few loops share the shards: while one waits for its commit, another
        # handles its batch, so the process and Redis work at the same time.
        if bus.cluster:
            units = [[s] for s in self.shards]
        else:
            loops = min(bus.settings.read_loops, len(self.shards))
            units = [self.shards[i::loops] for i in range(loops)]
        self._units = [[k for k, (s, _) in self._streams.items() if s in unit] for unit in units]
        self.exclusive = exclusive
        self._headers = {
            s: (
                bus.keys.seen_prefix(s, group), bus.keys.errors(s, group), bus.keys.deadletter(s),
                bus.keys.lease(s, group) if exclusive else "", self.name,
                bus.keys.version(s, group) if exclusive else "",
            )
            for s in self.shards
        }
        # exclusive consumers: shard -> (stop signal, read loop) of the shards leased now
        self._owned: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        # every shard whose lease this member holds and renews: those read (``_owned``), those
        # being taken over, and those being given back (``_leaving``); a take-over or give-back
        # runs as a task of its own (``_moving``), so that the lease upkeep never waits on
        # handling and a long take-over does not let the member's other leases expire
        self._held: set[int] = set()
        self._leaving: set[int] = set()
        self._moving: dict[int, asyncio.Task[None]] = {}
        # On a single Redis an exclusive consumer reads all its shards in one loop (one
        # XREADGROUP, one commit per read), as plain members do: batches stay large when
        # traffic is spread thin over many shards. ``_iteration`` is held for one read and its
        # commit, so a shard taken out of ``_reading`` is done once the lock is free.
        self._merged = exclusive and not bus.cluster
        self._reading: set[int] = set()
        self._iteration = asyncio.Lock()
        self._merged_task: asyncio.Task[None] | None = None
        self._shard_locks: dict[int, asyncio.Lock] = {}
        # loops holding entries back because a handler raised Unavailable; while any does, no
        # loop reads or reclaims anything new (``_resumed`` is set again when none does)
        self._holding = 0
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.healthy = False
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.ensure_group(self.group, self.handlers)
        if self.exclusive:
            self._tasks = [asyncio.create_task(self._lease_loop(), name=f"leases-{self.group}")]
            if self._merged:
                self._merged_task = asyncio.create_task(self._read_loop(), name=f"read-{self.group}")
                self._tasks.append(self._merged_task)
        else:
            self._tasks = [
                asyncio.create_task(self._read_loop(unit), name=f"read-{self.group}-{i}")
                for i, unit in enumerate(self._units)
            ]
        self._tasks.append(asyncio.create_task(self._reclaim_loop(), name=f"reclaim-{self.group}"))
        self._tasks.append(asyncio.create_task(self._lag_loop(), name=f"lag-{self.group}"))
        self.healthy = True
        log.info(
            "consumer started", group=self.group, consumer=self.name, shards=len(self.shards),
            read_loops=len(self._units), types=[str(t) for t in self.handlers],
        )

    def stop(self) -> None:
        """Stop reading; batches in hand are finished, committed and acked."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def paused(self) -> bool:
        """True while a handler's dependency is down (it raised ``Unavailable``): the consumer
        retries the entries in hand and reads nothing new."""
        return self._holding > 0

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
        for key in self._streams:
            with contextlib.suppress(RedisError):
                pending = await self.bus.redis.xpending_range(
                    key, self.group, min="-", max="+", count=1, consumername=self.name
                )
                if not pending:
                    await self.bus.redis.xgroup_delconsumer(key, self.group, self.name)

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self, keys: list[str] | None = None, halt: asyncio.Event | None = None) -> None:
        """Read and process until stopped (or ``halt``): the streams ``keys``, or with ``None``
        every shard this exclusive consumer leases now, read together (single Redis)."""
        fixed = keys
        if fixed is None:
            guard: Any = self._iteration
        elif self.exclusive:
            guard = self._guard(self._streams[fixed[0]][0])
        else:
            guard = contextlib.nullcontext()
        backoff = 0.05
        lane = Lane(self.bus.redis)
        try:
            await self._read_loop_on(lane, fixed, guard, halt)
        finally:
            await lane.close()

    async def _read_loop_on(
        self, lane: Lane, fixed: list[str] | None, guard: Any, halt: asyncio.Event | None
    ) -> None:
        backoff = 0.05
        while not self._stopping.is_set() and not (halt is not None and halt.is_set()):
            if fixed is None and not self._reading:
                await self._sleep(0.05)
                continue
            if self._holding:
                await self._wait_resumed()
                continue
            try:
                async with guard:
                    reading = fixed or [k for k, (s, _) in self._streams.items() if s in self._reading]
                    if reading:
                        await self._read_once(reading, lane)
                backoff = 0.05
            except LeaseLost as exc:
                log.warning("shard lease lost; stopped reading it", group=self.group, shards=exc.shards)
                for shard in exc.shards:
                    self._reading.discard(shard)
                    self._owned.pop(shard, None)  # not ours to give back
                if fixed is not None:
                    return
            except RedisError as exc:
                log.warning("read failed, retrying", group=self.group, error=str(exc))
                await self._sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                log.exception("unexpected error in read loop", group=self.group)
                await self._sleep(1.0)

    async def _read_once(self, keys: list[str], lane: Lane) -> None:
        """One XREADGROUP over ``keys`` and the processing of what it returned."""
        # COUNT is per stream: split the batch over the streams read together, so one commit
        # script never holds Redis for much more than ``batch_size`` entries.
        count = max(1, -(-self._settings.batch_size // len(keys)))
        reply = await lane.execute(
            "XREADGROUP", "GROUP", self.group, self.name, "COUNT", count, "BLOCK", self._settings.block_ms,
            "STREAMS", *keys, *(">" for _ in keys), key=keys[0], keys=keys,
        )
        if not reply:
            return
        streams = self._streams
        entries = []
        # a map under RESP3, a list of [key, entries] pairs under RESP2
        for key, items in reply.items() if isinstance(reply, dict) else reply:
            stream = _s(key)
            shard, event_type = streams[stream]
            for eid, fields in items:
                entry = _Entry(shard, stream, event_type, eid.decode(), _data(fields), 1)
                if fields and len(fields) > 2:
                    entry.target = _target(fields)
                entries.append(entry)
        await self._process(entries, lane)

    def _guard(self, shard: int) -> asyncio.Lock:
        """What an exclusive consumer holds while it handles a batch of ``shard``."""
        if self._merged:
            return self._iteration
        lock = self._shard_locks.get(shard)
        if lock is None:
            lock = self._shard_locks[shard] = asyncio.Lock()
        return lock

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _wait_resumed(self) -> None:
        """Wait while another loop holds entries back (a dependency is down), or until a stop."""
        stop = asyncio.ensure_future(self._stopping.wait())
        resumed = asyncio.ensure_future(self._resumed.wait())
        try:
            await asyncio.wait({stop, resumed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            resumed.cancel()

    # -- processing ----------------------------------------------------------------------------

    async def _process(self, entries: list[_Entry], lane: Lane | None = None) -> None:
        """Decode, filter, handle and commit entries (of one slot on a cluster).

        An exclusive consumer's commit of a shard is refused whole when that shard's state
        changed after it was read (a workflow task committed to it meanwhile): those entries
        are handled again on the fresh state.

        When a handler raises ``Unavailable`` the entries it had are held: their delivery
        counts are put back, the consumer pauses, and they are retried with backoff until
        they commit or the consumer stops."""
        conflicts = 0
        held = False
        backoff = UNAVAILABLE_BACKOFF_S
        cap = min(UNAVAILABLE_BACKOFF_MAX_S, self._settings.reclaim_idle_ms / 2000)
        try:
            while True:
                moved, deferred = await self._process_once(entries, lane)
                if deferred:
                    entries = [e for e in entries if e.shard in moved or id(e) in deferred]
                    if not held:
                        held = True
                        self._hold(+1)
                    await self._touch(entries)
                    log.warning(
                        "dependency unavailable; holding entries, reading nothing new", group=self.group,
                        entries=len(entries), retry_in_s=round(backoff, 3),
                    )
                    await self._sleep(backoff)
                    if self._stopping.is_set():
                        return  # they stay pending, their delivery counts as before
                    backoff = min(backoff * 2, cap)
                    entries = await self._touch(entries)  # still ours, idle again
                    if not entries:
                        return  # another member finished them meanwhile
                    continue
                if held:
                    held = False
                    self._hold(-1)
                    log.info("dependency available again; resuming", group=self.group)
                if not moved:
                    return
                conflicts += 1
                BUS_STATE_CONFLICTS.labels(self.group).inc(len(moved))
                if conflicts >= 100:
                    raise RuntimeError(f"{self.group}: state of shards {sorted(moved)} kept moving; entries stay pending")
                entries = [e for e in entries if e.shard in moved]
        finally:
            if held:
                self._hold(-1)

    def _hold(self, delta: int) -> None:
        self._holding += delta
        BUS_PAUSED.labels(self.group).set(1 if self._holding else 0)
        if self._holding:
            self._resumed.clear()
        else:
            self._resumed.set()

    async def _touch(self, entries: list[_Entry]) -> list[_Entry]:
        """Claim held entries again for this consumer without counting a delivery: their
        delivery count goes back to what it was before this attempt, and their idle time to 0
        (so that no member reclaims them while they are held). Returns those still pending."""
        kept: list[_Entry] = []
        groups: dict[tuple[str, int], list[_Entry]] = {}
        for entry in entries:
            groups.setdefault((entry.stream, entry.deliveries - 1), []).append(entry)
        for (stream, count), group in groups.items():
            try:
                ids: Any = await self.bus.redis.xclaim(
                    stream, self.group, self.name, min_idle_time=0, message_ids=[e.entry_id for e in group],
                    retrycount=count, justid=True,
                )
            except RedisError as exc:
                log.warning("could not keep held entries", group=self.group, error=str(exc))
                kept += group
                continue
            claimed = {_s(i) for i in ids}
            kept += [e for e in group if e.entry_id in claimed]
        return kept

    async def _process_once(self, entries: list[_Entry], lane: Lane | None) -> tuple[set[int], set[int]]:
        """Returns the shards whose state moved (nothing of them committed) and the entries
        (their ``id``) held back because a handler raised ``Unavailable``."""
        started = time.perf_counter()
        out = _Outcome()
        records: dict[int, list[Any]] = {}
        todo: list[tuple[_Entry, Event[Any], list[Any]]] = []
        for entry in entries:
            recs = records.get(entry.shard)
            if recs is None:
                recs = records[entry.shard] = []
            if entry.deliveries > 1:
                recs.append(("X", entry.stream, entry.entry_id))
            if entry.target is not None and entry.target != self.group:
                # requeued from the dead letters of another group: this one had the original
                recs.append(("A", entry.stream, entry.entry_id))
                out.add(entry.event_type, "skipped")
                continue
            if entry.data is None:
                recs.append(self._dead(out, entry, "malformed", "entry has no 'd' field"))
                continue
            try:
                event = decode(entry.data, entry.event_type)
            except DecodeError as exc:
                recs.append(self._dead(out, entry, str(exc.reason), exc.message))
                continue
            if event.route not in self.routes:
                recs.append(("A", entry.stream, entry.entry_id))
                out.add(entry.event_type, "skipped")
                continue
            todo.append((entry, event, recs))

        versions: dict[int, str] = {}
        state_read: StateRead | None = None
        commits: dict[int, Commit] = {}
        if todo:
            fresh, batch_ids = [], set()
            for item in todo:  # the same event twice in one read: the later copies are duplicates
                event_id = item[1].event_id
                if event_id in batch_ids:
                    item[2].append(("A", item[0].stream, item[0].entry_id))
                    out.add(item[0].event_type, "duplicate")
                else:
                    batch_ids.add(event_id)
                    fresh.append(item)
            todo = fresh
            if self._precheck or self.exclusive:
                if self._reads_state(todo):
                    # asked along with the handler's state load: one round trip fewer
                    commits = {id(entry): Commit(self._keys, entry.shard) for entry, _, _ in todo}
                    state_read = StateRead(self, todo, commits, lane)
                else:
                    seen, versions = await self._seen(todo, lane)
                    if self._precheck:
                        fresh = []
                        for item, flag in zip(todo, seen, strict=True):
                            if flag:
                                item[2].append(("A", item[0].stream, item[0].entry_id))
                                out.add(item[0].event_type, "duplicate")
                            else:
                                fresh.append(item)
                        todo = fresh

        foreign: list[Event[Any]] = []
        handlers = self.handlers
        traced = tracing.enabled
        batched: dict[int, list[tuple[_Entry, Event[Any], list[Any]]]] = {}
        # what each handled entry came to: its commit, the exception its handler raised, or
        # None for one its state load found handled before; applied once every handler has
        # run (none, if one found a dependency unavailable)
        results: list[tuple[tuple[_Entry, Event[Any], list[Any]], Commit | Exception | None]] = []
        unavailable = False
        for item in todo:
            entry, event, recs = item
            handler = handlers[entry.event_type]
            if isinstance(handler, Batch):
                batched.setdefault(id(handler), []).append(item)
                continue
            commit = Commit(self._keys, entry.shard)
            try:
                if traced:
                    with consumer_span(event, self.group):
                        await handler(event, commit)
                else:
                    token = current_event.set(event)
                    try:
                        await handler(event, commit)
                    finally:
                        current_event.reset(token)
            except Unavailable:
                unavailable = True
                break
            except Exception as exc:
                results.append((item, exc))
                continue
            results.append((item, commit))

        for items in batched.values() if not unavailable else ():
            items.sort(key=lambda item: _parse_id(item[0].entry_id))  # stream (arrival) order
            batch_handler = handlers[items[0][0].event_type]
            assert isinstance(batch_handler, Batch)
            batch_commits = [commits.get(id(entry)) or Commit(self._keys, entry.shard) for entry, _, _ in items]
            reading = current_state_read.set(state_read) if state_read is not None else None
            try:
                with batch_span(f"{self.group} batch", [event for _, event, _ in items], group=self.group):
                    await batch_handler.fn([(event, commit) for (_, event, _), commit in zip(items, batch_commits)])
                if state_read is not None and not state_read.done:
                    raise RuntimeError(f"{self.group}: a reads_state handler returned without loading its state")
            except Unavailable:
                unavailable = True
                break
            except Exception as exc:
                results += [(item, exc) for item in items]
                continue
            finally:
                if reading is not None:
                    current_state_read.reset(reading)
            for item, commit in zip(items, batch_commits, strict=True):
                if commit.duplicate:
                    results.append((item, None))  # only acknowledged
                    continue
                if isinstance(commit.error, Unavailable):
                    unavailable = True
                results.append((item, commit.error if commit.error is not None else commit))
            if unavailable:
                break

        deferred: set[int] = set()
        if unavailable:
            # a dependency is down: nothing handled in this read commits, nothing counts, and
            # the errors remembered from earlier deliveries stay
            deferred = {id(entry) for entry, _, _ in todo}
            held = {(entry.stream, entry.entry_id) for entry, _, _ in todo}
            for shard, recs in records.items():
                records[shard] = [r for r in recs if not (r[0] == "X" and (r[1], r[2]) in held)]
        else:
            if state_read is not None:
                versions = state_read.versions
            for (entry, event, recs), result in results:
                if result is None:
                    recs.append(("A", entry.stream, entry.entry_id))
                    out.add(entry.event_type, "duplicate")
                elif isinstance(result, Exception):
                    self._failed(out, entry, event, recs, result)
                else:
                    self._succeeded(out, entry, event, recs, result, foreign)

        if foreign:
            await self.bus.publish_many(foreign)
        dups, moved = await self._commit(records, versions, lane)
        if moved or deferred:
            return moved, deferred
        if dups:  # handled, but another copy had committed first
            types = {event.event_id: entry.event_type for entry, event, _ in todo}
            for event_id in dups:
                out.add(types[_s(event_id)], "ok", -1)
                out.add(types[_s(event_id)], "duplicate")
        self.processed += len(entries)
        self._observe(entries, out, time.perf_counter() - started)
        return moved, deferred

    def _succeeded(
        self, out: _Outcome, entry: _Entry, event: Event[Any], recs: list[Any], commit: Commit,
        foreign: list[Event[Any]],
    ) -> None:
        if commit.foreign:
            foreign += commit.foreign
        stream = self._keys.stream
        recs.append((
            "C", entry.stream, entry.entry_id, event.event_id,
            [(stream(entry.shard, o.event_type), _mp_bytes(encode(o))) for o in commit.outputs],
            commit.writes,
        ))
        out.add(entry.event_type, "ok")

    def _failed(self, out: _Outcome, entry: _Entry, event: Event[Any], recs: list[Any], exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PermanentError):
            recs.append(self._dead(out, entry, "rejected_by_handler", error, event.event_id))
            return
        if entry.deliveries >= self._settings.max_deliveries:
            recs.append(self._dead(out, entry, "handler_error", error, event.event_id))
        else:
            recs.append(("F", entry.stream, entry.entry_id, error[:2000]))
            out.add(entry.event_type, "failed")
        log.warning(
            "handler failed", group=self.group, event_type=str(entry.event_type),
            entry_id=entry.entry_id, deliveries=entry.deliveries, error=error,
            correlation_id=event.correlation_id,
        )

    async def _commit(
        self, records: dict[int, list[Any]], versions: dict[int, str], lane: Lane | None = None
    ) -> tuple[list[Any], set[int]]:
        """Returns the event ids another copy had committed first, and the shards whose state
        moved since ``versions`` were read (nothing of those was committed)."""
        batches = [
            (prefix, errors, dlq, recs, lease, owner, version_key if shard in versions else "", versions.get(shard, ""))
            for shard, recs in records.items()
            if recs
            for prefix, errors, dlq, lease, owner, version_key in (self._headers[shard],)
        ]
        if not batches:
            return [], set()
        route = self._keys.deadletter(next(iter(records)))  # any key of the slot routes it
        dups, lost, moved = await self._script(
            lane, self.bus._commit, [route],
            [self.group, self._settings.dedupe_ttl_s * 1000, _pack(batches), self._settings.deadletter_maxlen],
        )
        if lost:
            raise LeaseLost(sorted(s for s in records if self._headers[s][3].encode() in lost))
        return list(dups), {s for s in records if moved and self._headers[s][5].encode() in moved}

    def _dead(self, out: _Outcome, entry: _Entry, reason: str, error: str, event_id: str = "") -> tuple[Any, ...]:
        key = (entry.event_type, reason)
        out.dead[key] = out.dead.get(key, 0) + 1
        log.error(
            "dead-lettered", group=self.group, stream=entry.stream, entry_id=entry.entry_id,
            reason=reason, error=error[:500],
        )
        fields = (
            "stream", entry.stream, "entry_id", entry.entry_id, "group", self.group, "consumer", self.name,
            "reason", reason, "error", error[:4000], "deliveries", entry.deliveries, "event_id", event_id,
            "dead_lettered_at", int(time.time() * 1000), "data", _mp_bytes(entry.data or b""),
        )
        return ("D", entry.stream, entry.entry_id, fields)

    async def _seen(
        self, todo: list[tuple[_Entry, Event[Any], list[Any]]], lane: Lane | None
    ) -> tuple[list[int], dict[int, str]]:
        by_shard: dict[int, list[str]] = {}
        for entry, event, _ in todo:
            by_shard.setdefault(entry.shard, []).append(event.event_id)
        reply: list[Any] = await self._script(
            lane, self.bus._seen, [self._keys.deadletter(next(iter(by_shard)))],
            [_pack([(self._headers[s][0], ids, self._headers[s][5]) for s, ids in by_shard.items()])],
        )
        flags = reply[:len(todo)]
        versions = {s: _s(v) for s, v in zip(by_shard, reply[len(todo):], strict=True) if v}
        # the script answers shard by shard; put the answers back in entry order
        answers = {s: iter(flags[i:i + len(ids)]) for s, ids, i in _offsets(by_shard)}
        return [next(answers[entry.shard]) for entry, _, _ in todo], versions

    def _reads_state(self, todo: list[tuple[_Entry, Event[Any], list[Any]]]) -> bool:
        """Whether every event of ``todo`` goes to one ``Batch(reads_state=True)`` handler."""
        first = self.handlers[todo[0][0].event_type]
        if not (isinstance(first, Batch) and first.reads_state):
            return False
        return all(self.handlers[entry.event_type] is first for entry, _, _ in todo)

    async def _read_state(self, ops: list[tuple[Any, ...]], lane: Lane | None) -> list[Any]:
        """Reads of one slot in one script call (``Bus.read_state``, or through ``lane``)."""
        if lane is None:
            return await self.bus.read_state(ops)
        keys, args = state_read_call(ops)
        result: list[Any] = await lane.script(self.bus._read, keys, args)
        return result

    @staticmethod
    async def _script(lane: Lane | None, script: Any, keys: list[Any], args: list[Any]) -> Any:
        if lane is None:
            return await script(keys=keys, args=args)
        return await lane.script(script, keys, args)

    def _observe(self, entries: list[_Entry], out: _Outcome, seconds: float) -> None:
        group = self.group
        for (event_type, outcome), n in out.counts.items():
            if n:
                BUS_MESSAGES.labels(event_type, group, outcome).inc(n)
        for (event_type, reason), n in out.dead.items():
            BUS_MESSAGES.labels(event_type, group, "dead_lettered").inc(n)
            BUS_DEAD_LETTERED.labels(event_type, group, reason).inc(n)
        BUS_BATCH_SECONDS.labels(group).observe(seconds)
        BUS_BATCH_SIZE.labels(group).observe(len(entries))
        # the first entry read is the oldest of its stream, and close to the batch's oldest
        oldest_ms = int(entries[0].entry_id.partition("-")[0])
        BUS_DELIVERY_LATENCY.labels(group).observe(max(0.0, time.time() - oldest_ms / 1000))

    # -- reclaiming ----------------------------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        interval = self._settings.reclaim_interval_ms / 1000
        while not self._stopping.is_set():
            await self._sleep(interval)
            if self._stopping.is_set():
                break
            if self._holding:
                continue  # a dependency is down: the held entries are retried, nothing new taken
            try:
                await self.reclaim()
            except LeaseLost as exc:
                log.warning("shard lease lost while reclaiming", group=self.group, shards=exc.shards)
            except RedisError as exc:
                log.warning("reclaim failed", group=self.group, error=str(exc))
            except Exception:
                log.exception("unexpected error in reclaim loop", group=self.group)

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``reclaim_idle_ms`` (of dead consumers, or whose
        handler failed) and process them; dead-letter those delivered too often."""
        total = 0
        for stream, (shard, event_type) in self._streams.items():
            if self._stopping.is_set():
                break
            if self.exclusive:
                if shard not in self._owned:
                    continue
                # one batch of a shard at a time: a stage reads the state its last batch wrote
                async with self._guard(shard):
                    total += await self._reclaim_stream(shard, stream, event_type)
                continue
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
        return await self._claim_and_handle(shard, stream, event_type, pending, idle)

    async def _claim_and_handle(
        self, shard: int, stream: str, event_type: EventType, pending: list[Any], min_idle: int
    ) -> int:
        """Claim these pending entries for this consumer and handle them; dead-letter those
        already delivered ``max_deliveries`` times, and those whose data is gone (deleted from
        the stream while pending: an XTRIM or XDEL by hand). Returns how many were claimed.

        XAUTOCLAIM over the listed range names the entries it found deleted (and drops them
        from the pending list) to exactly one caller, so each is dead-lettered once."""
        deliveries = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        reply: Any = await self.bus.redis.xautoclaim(
            stream, self.group, self.name, min_idle_time=min_idle, start_id=next(iter(deliveries)),
            count=len(deliveries),
        )
        claimed: list[Any] = reply[1]
        deleted = [_s(eid) for eid in (reply[2] if len(reply) > 2 else [])]
        limit = self._settings.max_deliveries
        entries: list[_Entry] = []
        exhausted: list[_Entry] = []
        for eid, fields in claimed:
            entry_id = _s(eid)
            fields = fields or {}
            entry = _Entry(shard, stream, event_type, entry_id, fields.get(DATA), deliveries.get(entry_id, 0) + 1)
            if TARGET in fields:
                entry.target = _s(fields[TARGET])
            (exhausted if entry.deliveries > limit else entries).append(entry)
        if claimed:
            BUS_RECLAIMED.labels(event_type, self.group).inc(len(claimed))
        if deleted:
            await self._dead_letter_deleted(shard, stream, event_type, deleted, deliveries)
        if exhausted:
            await self._dead_letter_exhausted(shard, exhausted)
        if entries:
            await self._process(entries)
        return len(claimed) + len(deleted)

    async def _dead_letter_deleted(
        self, shard: int, stream: str, event_type: EventType, entry_ids: list[str], deliveries: dict[str, int]
    ) -> None:
        """Pending entries whose data was deleted from the stream: nothing to handle, and never
        skipped silently; each becomes a dead letter (without data) saying so, and is counted."""
        out = _Outcome()
        entries = [_Entry(shard, stream, event_type, eid, None, deliveries.get(eid, 0)) for eid in entry_ids]
        records: list[Any] = []
        for entry in entries:
            records.append(("X", entry.stream, entry.entry_id))
            records.append(self._dead(
                out, entry, "deleted_while_pending",
                f"entry {entry.entry_id} was deleted from {stream} (trimmed or XDEL) while pending for group "
                f"{self.group}; its data is lost: find the event in the event store",
            ))
        await self._commit({shard: records}, {})
        self._observe(entries, out, 0.0)

    async def _dead_letter_exhausted(self, shard: int, entries: list[_Entry]) -> None:
        errors_key = self._keys.errors(shard, self.group)
        errors = await self.bus.redis.hmget(errors_key, [f"{e.stream}|{e.entry_id}" for e in entries])
        out = _Outcome()
        records: list[Any] = []
        for entry, error in zip(entries, errors, strict=True):
            entry.deliveries -= 1  # this claim is not a delivery to a handler
            last = _s(error) if error else "no handler finished it (consumers stopped or died while handling it)"
            records.append(("X", entry.stream, entry.entry_id))
            records.append(self._dead(out, entry, "max_deliveries", last))
        await self._commit({shard: records}, {})
        self._observe(entries, out, 0.0)

    # -- shard leases (exclusive consumers) -----------------------------------------------

    async def _lease_loop(self) -> None:
        """Hold a fair share of the shards. Every ``lease_renew_ms``: renew the leases held and
        the heartbeat (one script call on a single Redis), learn who is alive and what each
        holds, give back what is above the fair share, take free shards up to it. A member
        whose heartbeat and leases were not renewed for ``lease_ttl_ms`` is dead: the others
        see it gone at their next upkeep and take its shards, each first cleared of the pending
        entries of its previous owner, oldest first, so each shard keeps its order. On a clean
        stop the member finishes the batches in hand, then releases its leases and leaves the
        registry at once, so the others take its shards at their next upkeep."""
        ttl = self._settings.lease_ttl_ms
        every = self._settings.lease_renew_ms / 1000
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                started = loop.time()
                try:
                    await self._balance(ttl)
                except RedisError as exc:
                    log.warning("lease upkeep failed", group=self.group, error=str(exc))
                except Exception:
                    log.exception("unexpected error in lease upkeep", group=self.group)
                await self._sleep(max(0.0, every - (loop.time() - started)))
        finally:
            await self._leave()

    async def _balance(self, ttl: int) -> None:
        held = sorted(self._held)
        kept, live = await self._upkeep(held, ttl)
        for shard, still in zip(held, kept, strict=True):
            if not still:  # expired or taken (this member stalled): not ours to give back
                self._held.discard(shard)
                if shard in self._owned and shard not in self._moving:
                    self._move(shard, self._drop(shard, release=False))
        for shard, (_, task) in list(self._owned.items()):
            if task.done() and task is not self._merged_task and shard not in self._moving:
                self._move(shard, self._give_back(shard))  # its read loop ended (lease lost)
        fair = -(-len(self.shards) // max(1, len(live)))
        changed = False
        staying = self._held - self._leaving
        if len(staying) > fair:
            for shard in sorted((s for s in staying if s not in self._moving), reverse=True)[: len(staying) - fair]:
                self._leaving.add(shard)
                self._move(shard, self._give_back(shard))
            changed = True
        elif len(staying) < fair and not self._stopping.is_set():
            # shards no live member holds: those of the dead, those given back, those never taken
            taken = self._held.union(*(s for m, s in live.items() if m != self.name))
            start = shard_offset(self.name, len(self.shards))
            wanted = [s for s in self.shards[start:] + self.shards[:start] if s not in taken][: fair - len(staying)]
            won = await _gather_bounded([
                self.bus._acquire(keys=[self._keys.lease(s, self.group)], args=[self.name, ttl]) for s in wanted
            ])
            for shard, ok in zip(wanted, won, strict=True):
                if ok:  # taken over together: a dead member's shards all resume at once
                    self._held.add(shard)
                    self._move(shard, self._own(shard))
                    changed = True
        if changed:  # tell the others at once what this member holds now
            await self._upkeep([], ttl)

    def _move(self, shard: int, work: Coroutine[Any, Any, None]) -> None:
        """Run a take-over or give-back of ``shard`` beside the upkeep."""
        async def run() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("shard take-over or give-back failed", group=self.group, shard=shard, error=repr(exc))
                if shard not in self._owned and shard in self._held:  # a failed take-over: give it back
                    self._held.discard(shard)
                    with contextlib.suppress(RedisError):
                        await self.bus._renew(keys=[self._keys.lease(shard, self.group)], args=[self.name, 0])
            finally:
                self._moving.pop(shard, None)

        self._moving[shard] = asyncio.create_task(run(), name=f"move-{self.group}-{shard}")

    async def _give_back(self, shard: int) -> None:
        try:
            await self._drop(shard, release=True)
        finally:
            self._held.discard(shard)
            self._leaving.discard(shard)

    async def _upkeep(self, held: list[int], ttl: int) -> tuple[list[bool], dict[str, set[int]]]:
        """Renew (``ttl`` 0: release) the leases of ``held`` and the heartbeat (0: leave);
        returns whether each lease was still ours, and the live members with their shards.

        On a cluster the leases (one call per shard: each is in its shard's slot) go first, so
        that a dead member's leases are gone by the time its heartbeat has expired."""
        members = self._keys.members(self.group)
        registry = (members, f"{{{members}}}:shards")  # hash-tagged to the registry's slot
        mine = ",".join(map(str, sorted(self._held - self._leaving)))
        leases = [self._keys.lease(s, self.group) for s in held]
        if self.bus.cluster:
            flags = [
                reply[0][0]
                for reply in await _gather_bounded([
                    self.bus._tick(keys=[lease], args=[self.name, ttl, _pack([lease]), "", "", ""]) for lease in leases
                ])
            ]
            _, live = await self.bus._tick(keys=[members], args=[self.name, ttl, _pack([]), *registry, mine])
        else:
            flags, live = await self.bus._tick(keys=[members], args=[self.name, ttl, _pack(leases), *registry, mine])
        alive = {
            _s(live[i]): {int(x) for x in _s(live[i + 1]).split(",") if x} for i in range(0, len(live) - 1, 2)
        }
        return [bool(f) for f in flags], alive

    async def _leave(self) -> None:
        """A clean stop: finish the take-overs and the batches in hand (the leases and heartbeat
        still renewed meanwhile), then give every lease back and leave the registry in one go."""
        ttl = self._settings.lease_ttl_ms
        work = [*self._moving.values(), *(self._drop(s, release=False) for s in list(self._owned))]
        finishing = asyncio.ensure_future(asyncio.gather(*work, return_exceptions=True))
        try:
            while not finishing.done():
                await asyncio.wait([finishing], timeout=self._settings.lease_renew_ms / 1000)
                if not finishing.done():
                    with contextlib.suppress(RedisError):
                        await self._upkeep(sorted(self._held), ttl)
        finally:
            if not finishing.done():  # cancelled: a stop past its drain timeout
                finishing.cancel()
        for shard in list(self._owned):  # taken over while the others finished
            await self._drop(shard, release=False)
        held = sorted(self._held)
        try:
            await self._upkeep(held, 0)
        except RedisError as exc:
            log.warning("leaving the group failed; the leases expire on their own", group=self.group, error=str(exc))
        else:
            log.info("left the group", group=self.group, consumer=self.name, released=held)
        self._held.clear()

    async def _own(self, shard: int) -> None:
        streams = [k for k, (s, _) in self._streams.items() if s == shard]
        await self._take_over(shard, streams)
        if shard not in self._held or self._stopping.is_set():
            return  # lost meanwhile, or stopping: nothing more to read
        halt = asyncio.Event()
        if self._merged_task is not None:
            self._owned[shard] = (halt, self._merged_task)
            self._reading.add(shard)
        else:
            task = asyncio.create_task(self._read_loop(streams, halt), name=f"read-{self.group}-{shard}")
            self._owned[shard] = (halt, task)
        log.info("shard leased", group=self.group, consumer=self.name, shard=shard)

    async def _take_over(self, shard: int, streams: list[str]) -> None:
        """Handle the entries still pending in this shard (delivered to a previous owner, or
        to this consumer before a restart) before reading anything new."""
        redis = self.bus.redis
        for stream in streams:
            event_type = self._streams[stream][1]
            start = "-"
            while True:
                # Page through once: an entry whose handler fails here is retried later by the
                # reclaimer after its idle time, not again and again in this loop.
                pending = await redis.xpending_range(
                    stream, self.group, min=start, max="+", count=self._settings.batch_size
                )
                if not pending:
                    break
                start = "(" + _s(pending[-1]["message_id"])
                await self._claim_and_handle(shard, stream, event_type, pending, 0)
                if len(pending) < self._settings.batch_size:
                    break

    async def _drop(self, shard: int, *, release: bool) -> None:
        """Stop reading a shard (its batch in hand is finished first) and give it back."""
        owned = self._owned.pop(shard, None)
        if owned is None:
            return
        halt, task = owned
        if task is self._merged_task:
            self._reading.discard(shard)
            async with self._iteration:  # the read in hand, if any, is committed
                pass
        else:
            halt.set()
            with contextlib.suppress(Exception):
                await task
        if release:
            with contextlib.suppress(RedisError):
                await self.bus._renew(keys=[self._keys.lease(shard, self.group)], args=[self.name, 0])
        log.info("shard released", group=self.group, consumer=self.name, shard=shard)

    @property
    def owned_shards(self) -> list[int]:
        return sorted(self._owned)

    # -- lag -------------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                lags = await self.bus.group_lag(self.group, self.handlers)
                for (event_type, shard), (lag, pending) in lags.items():
                    if shard in self._headers:
                        BUS_LAG.labels(event_type, self.group, str(shard)).set(lag)
                        BUS_PENDING.labels(event_type, self.group, str(shard)).set(pending)
            except RedisError as exc:
                log.warning("lag check failed", group=self.group, error=str(exc))
            await self._sleep(self._settings.lag_interval_s)


# ---------------------------------------------------------------------------------------------
# helpers


_MAX_CONCURRENT = 32
"""Commands one call fans out at once: a cluster client holds a bounded pool per node."""


_T = TypeVar("_T")


async def _gather_bounded(coros: list[Awaitable[_T]]) -> list[_T]:
    gate = asyncio.Semaphore(_MAX_CONCURRENT)

    async def one(coro: Awaitable[_T]) -> _T:
        try:
            async with gate:
                return await coro
        finally:
            # cancelled before its turn (a stop): close it, or it is "never awaited"
            if isinstance(coro, Coroutine) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()

    return await asyncio.gather(*(one(c) for c in coros))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def shard_offset(name: str, shards: int) -> int:
    """Where a consumer starts looking for free shards: spread, so that members joining
    together do not all race for shard 0."""
    return zlib.crc32(name.encode()) % max(1, shards)


def _data(fields: list[bytes] | None) -> bytes | None:
    """The ``d`` field of a raw entry (``[field, value, ...]``), or None."""
    if fields:
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == DATA:
                return fields[i + 1]
    return None


def _target(fields: list[bytes]) -> str | None:
    """The ``g`` field of a raw entry (a requeued dead letter's group), or None."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == TARGET:
            return _s(fields[i + 1])
    return None


def _offsets(by_shard: dict[int, list[str]]) -> Iterable[tuple[int, list[str], int]]:
    offset = 0
    for shard, ids in by_shard.items():
        yield shard, ids, offset
        offset += len(ids)


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _b(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
