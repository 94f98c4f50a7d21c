"""Key layout of the bus: every key of shard k carries the hash tag ``{k}``.

So shard k of every stream, its dead-letter stream, its dedupe marks and the state of every
portfolio in shard k share one Redis Cluster slot, and one Lua script can commit a state
change, the output events, the ack and the dedupe mark atomically.

A key joins its parts with ``:``, and ids may contain ``:`` (``acme:5`` is a valid portfolio
id). So that no two tuples of parts ever make the same key, ``state`` and ``global_key``
escape every part but the last (``%`` as ``%25``, ``:`` as ``%3A``, see ``key_part``): the
first unescaped ``:`` after a part ends it, and the last part runs to the end of the key.
That reading is unambiguous as long as each kind (the first part) always has the same number
of parts; every key builder keeps to that. Without the escape, portfolio ``acme`` with client
order id ``5:x`` and portfolio ``acme:5`` with ``x`` would share ``coid:acme:5:x``. The last
part is left as it is, so a key with one variable part (``portfolio:<p>``) is the same as
before and tools that read the id back from it (``rsplit(":portfolio:")``) still work.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

from services.core.events import EventType

__all__ = ["Keys", "key_part", "shard_of"]


def shard_of(partition_key: str, shards: int) -> int:
    """Stable shard of a partition key (a portfolio id): CRC32 modulo the shard count."""
    return zlib.crc32(partition_key.encode()) % shards


def key_part(part: str) -> str:
    """``part`` with no ``:`` left in it (``%`` -> ``%25``, ``:`` -> ``%3A``); unchanged when it
    has neither, as every constant part and most ids do."""
    if ":" in part or "%" in part:
        return part.replace("%", "%25").replace(":", "%3A")
    return part


def _join(head: str, parts: tuple[str, ...]) -> str:
    if not parts:
        return head
    *escaped, last = parts
    return ":".join((head, *map(key_part, escaped), last))


class Keys:
    def __init__(self, namespace: str, shards: int) -> None:
        self.namespace = namespace
        self.shards = shards

    def shard_of(self, partition_key: str) -> int:
        return _shard_cached(partition_key, self.shards)

    def tag(self, shard: int) -> str:
        return f"{self.namespace}:{{{shard}}}"

    def stream(self, shard: int, event_type: EventType | str) -> str:
        return f"{self.namespace}:{{{shard}}}:{event_type}"

    def deadletter(self, shard: int) -> str:
        return f"{self.namespace}:{{{shard}}}:deadletter"

    def seen_prefix(self, shard: int, group: str) -> str:
        return f"{self.namespace}:{{{shard}}}:seen:{group}:"

    def errors(self, shard: int, group: str) -> str:
        return f"{self.namespace}:{{{shard}}}:errors:{group}"

    def lease(self, shard: int, group: str) -> str:
        """Who owns shard ``shard`` for ``group`` (exclusive consumers)."""
        return f"{self.namespace}:{{{shard}}}:lease:{group}"

    def version(self, shard: int, group: str) -> str:
        """A counter of the commits to ``group``'s state in shard ``shard``: the stream stage and
        a workflow task that change the same state check it, so neither overwrites the other."""
        return f"{self.namespace}:{{{shard}}}:version:{group}"

    def members(self, group: str) -> str:
        """The live members of ``group`` with their heartbeat expiry (exclusive consumers)."""
        return self.global_key("members", group)

    def state(self, shard: int, *parts: str) -> str:
        """A state key of shard ``shard`` (order records, positions, limits): ``parts`` joined
        by ``:``, every one but the last escaped (module docstring)."""
        return _join(f"{self.namespace}:{{{shard}}}", parts)

    def global_key(self, *parts: str) -> str:
        """A key outside every shard (locks, registries), escaped like ``state``."""
        return _join(f"{self.namespace}:global", parts)


@lru_cache(maxsize=65_536)
def _shard_cached(partition_key: str, shards: int) -> int:
    return shard_of(partition_key, shards)
