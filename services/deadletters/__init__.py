"""Dead letters, for operators: select them (by stream or event type, group, reason, age),
show one, requeue or purge them. ``python -m services.deadletters`` is the command line.

Requeue puts the original event back on its stream, with its event id, for the group that
dead-lettered it only (field ``g``: the stream's other groups had the original, and ack the
copy without handling it), and removes the dead letter in the same Lua script, in the shard's
slot. So a dead letter is requeued at most once however often requeue runs, and a copy that
reaches the group anyway (its event id is kept) is dropped by the group's dedupe.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from services.core.bus import Bus, DeadLetter

__all__ = ["Filters", "Outcome", "find", "parse_age", "purge", "requeue", "select"]

PAGE = 500

_REQUEUE_LUA = """
-- KEYS[1] a shard's dead-letter stream, KEYS[2] the stream the entry came from (same slot);
-- ARGV[1] the dead letter's id. Returns the new entry id; 0: no such dead letter (already
-- requeued or purged); -1: it holds no event (its data was lost) and stays; -2: it did not
-- come from KEYS[2].
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local fields, f = found[1][2], {}
for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
if f['stream'] ~= KEYS[2] then return -2 end
if not f['data'] or f['data'] == '' then return -1 end
local id = redis.call('XADD', KEYS[2], '*', 'd', f['data'], 'g', f['group'])
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"not an age: {text!r} (e.g. 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Filters:
    """What to select; every given filter must match."""

    stream: str | None = None  # an event type (``order.requested``) or a whole stream key
    group: str | None = None
    reason: str | None = None  # a substring of the reason
    older_than_s: float | None = None
    newer_than_s: float | None = None
    shard: int | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.stream, self.group, self.reason, self.older_than_s,
                                       self.newer_than_s, self.shard))

    def match(self, letter: DeadLetter, now_ms: int) -> bool:
        if self.stream is not None and self.stream not in (letter.stream, letter.stream.rsplit(":", 1)[-1]):
            return False
        if self.group is not None and letter.group != self.group:
            return False
        if self.reason is not None and self.reason not in letter.reason:
            return False
        age = (now_ms - letter.dead_lettered_at) / 1000
        if self.older_than_s is not None and age < self.older_than_s:
            return False
        return self.newer_than_s is None or age <= self.newer_than_s


async def select(bus: Bus, filters: Filters = Filters(), limit: int | None = None) -> AsyncIterator[DeadLetter]:
    """The dead letters ``filters`` match, shard by shard, oldest first in each shard."""
    now_ms = int(time.time() * 1000)
    shards = range(bus.keys.shards) if filters.shard is None else [filters.shard]
    found = 0
    for shard in shards:
        key = bus.keys.deadletter(shard)
        start = "-"
        # an age bound is a range of ids: read only that
        end = "+" if filters.older_than_s is None else str(max(0, now_ms - int(filters.older_than_s * 1000)))
        if filters.newer_than_s is not None:
            start = str(max(0, now_ms - int(filters.newer_than_s * 1000)))
        while True:
            page: Any = await bus.redis.xrange(key, min=start, max=end, count=PAGE)
            for entry_id, fields in page:
                letter = DeadLetter.from_fields(_s(entry_id), fields, shard)
                if filters.match(letter, now_ms):
                    yield letter
                    found += 1
                    if limit is not None and found >= limit:
                        return
            if len(page) < PAGE:
                break
            start = "(" + _s(page[-1][0])


async def find(bus: Bus, ref: str) -> DeadLetter | None:
    """The dead letter named ``<shard>/<id>`` (as listed), or None."""
    shard, entry_id = _split_ref(bus, ref)
    page: Any = await bus.redis.xrange(bus.keys.deadletter(shard), min=entry_id, max=entry_id)
    return DeadLetter.from_fields(_s(page[0][0]), page[0][1], shard) if page else None


def _split_ref(bus: Bus, ref: str) -> tuple[int, str]:
    shard_text, sep, entry_id = ref.partition("/")
    if not sep or not shard_text.isdigit() or not re.fullmatch(r"\d+-\d+", entry_id):
        raise ValueError(f"not a dead letter id: {ref!r} (expected <shard>/<entry id>, as `list` prints)")
    shard = int(shard_text)
    if shard >= bus.keys.shards:
        raise ValueError(f"shard {shard} does not exist (ZVT_BUS_SHARDS={bus.keys.shards})")
    return shard, entry_id


@dataclass
class Outcome:
    done: list[str]  # refs requeued or purged
    gone: list[str]  # refs not found (already requeued or purged)
    kept: list[tuple[str, str]]  # refs left in place, with why


async def requeue(bus: Bus, letters: Iterable[DeadLetter]) -> Outcome:
    """Put each letter's event back on its stream for its group, removing the letter in the
    same script. Idempotent: a letter already requeued (or purged) is reported gone."""
    script = bus.redis.register_script(_REQUEUE_LUA)
    out = Outcome([], [], [])
    for letter in letters:
        if f"{{{letter.shard}}}" not in letter.stream:
            out.kept.append((letter.ref, f"its stream {letter.stream} is not in shard {letter.shard}"))
            continue
        result = await script(keys=[bus.keys.deadletter(letter.shard), letter.stream], args=[letter.id])
        if result == 0:
            out.gone.append(letter.ref)
        elif result == -1:
            out.kept.append((letter.ref, "it holds no event (its data was lost): find it in the event store"))
        elif result == -2:
            out.kept.append((letter.ref, "its stream changed"))
        else:
            out.done.append(letter.ref)
    return out


async def purge(bus: Bus, letters: Iterable[DeadLetter]) -> Outcome:
    """Delete these dead letters."""
    out = Outcome([], [], [])
    for letter in letters:
        deleted = int(await bus.redis.xdel(bus.keys.deadletter(letter.shard), letter.id))
        (out.done if deleted else out.gone).append(letter.ref)
    return out


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
