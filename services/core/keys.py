"""Key layout of the bus: every key of shard k carries the hash tag ``{k}``.

So shard k of every stream, its dead-letter stream, its dedupe marks and the state of every
portfolio in shard k share one Redis Cluster slot, and one Lua script can commit a state
change, the output events, the ack and the dedupe mark atomically.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

from services.core.events import EventType

__all__ = ["Keys", "shard_of"]


def shard_of(partition_key: str, shards: int) -> int:
    """Stable shard of a partition key (a portfolio id): CRC32 modulo the shard count."""
    return zlib.crc32(partition_key.encode()) % shards


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
        """A state key of shard ``shard`` (order records, positions, limits)."""
        return ":".join((f"{self.namespace}:{{{shard}}}", *parts))

    def global_key(self, *parts: str) -> str:
        """A key outside every shard (locks, registries)."""
        return ":".join((self.namespace, "global", *parts))


@lru_cache(maxsize=65_536)
def _shard_cached(partition_key: str, shards: int) -> int:
    return shard_of(partition_key, shards)
