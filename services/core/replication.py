"""Writes that must survive a Redis master failover: the write and a ``WAIT`` on one connection.

Redis replicates asynchronously: a master that dies may take with it what it acknowledged
but had not yet sent to its replica (docs/bus.md, "Redis Cluster failover"). Where the
platform makes a promise on the strength of a write (the gateway's ``202`` for an order, the
routing stage's intent written before it calls a venue) it can ask Redis to confirm that
``replicas`` replicas have the write before it goes on: ``WAIT replicas timeout_ms`` blocks
until the master's replication offset of this connection's writes has been acknowledged by
that many replicas, or the timeout passes, and answers how many did.

``WAIT`` is per connection, and on a cluster per node: it must follow the write on the same
connection to the master that owns the key's slot. So the write and its ``WAIT`` go out in one
pipeline: on a single Redis one connection; on a cluster, per master, one pipeline of its
commands and then its ``WAIT`` on one connection of that node (``ClusterNode.execute_pipeline``,
the per-node half of redis-py's cluster pipeline). redis-py's whole cluster pipeline is not
used for this: after a connection error it retries with the commands' ``target_nodes``
dropped, and a keyless ``WAIT`` then goes to the default node, where it could count replicas
for writes it did not follow. Redirections are not followed either: a command answered
``MOVED`` was not run, and a redirected copy would run on another connection than its
``WAIT``; the caller gets the error, and the slot map is patched for the next call.

``replication_barrier`` uses the same ``WAIT`` after a write of its own to make sure that
everything a master had when it was called is on its replicas: the recorder calls it before it
copies a batch to PostgreSQL, so the event store never holds an event that a failover takes
back (a stage would then handle its input again, maybe differently, and replay would not equal
live).

Settings: ``ZVT_BUS_WAIT_REPLICAS`` and ``ZVT_BUS_WAIT_TIMEOUT_MS`` (``BusSettings``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import AskError, ConnectionError, MovedError, NoScriptError, RedisError, TimeoutError

from services.core.keys import Keys
from services.core.redisconn import AnyRedis, ScriptBatcher
from services.core.settings import BusSettings

__all__ = ["NotReplicated", "ReplicaWait", "ReplicatedScriptBatcher", "replication_barrier", "run_replicated"]


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """``WAIT replicas timeout_ms`` after a write."""

    replicas: int
    timeout_ms: int

    @classmethod
    def of(cls, settings: BusSettings) -> ReplicaWait | None:
        """The wait the settings ask for; ``None`` when ``ZVT_BUS_WAIT_REPLICAS`` is 0 (off)."""
        if settings.wait_replicas <= 0:
            return None
        return cls(settings.wait_replicas, settings.wait_timeout_ms)


class NotReplicated(RedisError):
    """The write was made on the master (or may have been), but fewer replicas than required
    confirmed it within the timeout: it could be lost if the master fails now. The outcome is
    known to the master only; repeat the write idempotently."""

    def __init__(self, acked: int | None, wanted: int, detail: str = "") -> None:
        self.acked = acked
        self.wanted = wanted
        got = "an unknown number of" if acked is None else str(acked)
        super().__init__(f"{got} of {wanted} replicas confirmed the write{': ' + detail if detail else ''}")


async def run_replicated(
    redis: AnyRedis, wait: ReplicaWait, commands: Sequence[tuple[Any, Sequence[Any]]]
) -> list[Any]:
    """Run each ``(key, args)`` command (``key`` picks the node on a cluster; every key the
    command touches must be in its slot), then ``WAIT`` on the same connection(s).

    Returns one item per command: its reply, or the exception it met: a Redis error of its
    own (a connection error: its outcome is unknown), or ``NotReplicated`` when it ran but its
    node's ``WAIT`` counted fewer replicas than ``wait.replicas``. Never raises for the
    commands' sake."""
    if not commands:
        return []
    if isinstance(redis, RedisCluster):
        return await _run_on_cluster(redis, wait, commands)
    count = len(commands)
    pipe: Any = redis.pipeline(transaction=False)
    for _, args in commands:
        pipe.execute_command(*args)
    pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
    try:
        replies = list(await pipe.execute(raise_on_error=False))
    except RedisError as exc:  # the round trip failed: each command's outcome is unknown
        return [exc] * count
    return [_judge(reply, replies[count], wait) for reply in replies[:count]]


async def _run_on_cluster(
    redis: RedisCluster, wait: ReplicaWait, commands: Sequence[tuple[Any, Sequence[Any]]]
) -> list[Any]:
    """One pipeline per master, sent on one connection of that node (``ClusterNode.execute_pipeline``,
    what redis-py's cluster pipeline does per node, without its redirections and its retry,
    which would send a ``WAIT`` whose ``target_nodes`` it dropped to the default node)."""
    out: list[Any] = [None] * len(commands)
    groups: dict[str, tuple[Any, list[int], list[PipelineCommand]]] = {}
    try:
        await redis.initialize()  # a no-op unless a connection error asked for a new slot map
        for i, (key, args) in enumerate(commands):
            node = redis.nodes_manager.get_node_from_slot(redis.keyslot(key))
            group = groups.setdefault(node.name, (node, [], []))
            group[1].append(i)
            group[2].append(PipelineCommand(len(group[2]), *args))
    except Exception as exc:  # no slot map to route by: nothing was sent
        failed = exc if isinstance(exc, RedisError) else NotReplicated(None, wait.replicas, f"{type(exc).__name__}: {exc}")
        return [failed] * len(commands)
    for node, _, cmds in groups.values():
        cmds.append(PipelineCommand(len(cmds), "WAIT", wait.replicas, wait.timeout_ms))
    sent = await asyncio.gather(
        *(node.execute_pipeline(cmds) for node, _, cmds in groups.values()), return_exceptions=True
    )
    for (node, indexes, cmds), error in zip(groups.values(), sent, strict=True):
        if isinstance(error, BaseException):  # the round trip failed: outcomes unknown
            if isinstance(error, (ConnectionError, TimeoutError, OSError)):
                redis._initialize = True  # reload the slot map before the next command
            failed = error if isinstance(error, RedisError) else ConnectionError(f"{type(error).__name__}: {error}")
            for i in indexes:
                out[i] = failed
            continue
        acked = cmds[-1].result
        if any(isinstance(cmd.result, (ConnectionError, TimeoutError)) for cmd in cmds):
            redis._initialize = True
        for i, cmd in zip(indexes, cmds, strict=False):
            reply = cmd.result
            if isinstance(reply, (MovedError, AskError)):
                # Not run: the slot moved (a failover, a reshard). Patch the slot map for the
                # next call, as redis-py's own redirection does; this call fails (a
                # redirected copy would run on another connection than its WAIT).
                try:
                    await redis.nodes_manager.move_slot(reply)
                except Exception:
                    redis._initialize = True
            out[i] = _judge(reply, acked, wait)
    return out


def _judge(reply: Any, acked: Any, wait: ReplicaWait) -> Any:
    """A command's reply, or why it cannot be trusted to survive a failover."""
    if isinstance(reply, Exception):
        return reply
    if isinstance(acked, Exception):
        failed = NotReplicated(None, wait.replicas, str(acked))
        failed.__cause__ = acked
        return failed
    if int(acked) < wait.replicas:
        return NotReplicated(int(acked), wait.replicas)
    return reply


BARRIER_TTL_MS = 60_000


async def replication_barrier(redis: AnyRedis, wait: ReplicaWait, keys: Keys, shards: Iterable[int]) -> None:
    """Return once ``wait.replicas`` replicas have everything the masters of ``shards`` had
    written when it was called; else raise ``NotReplicated``.

    A replica applies its master's writes in order, so a ``WAIT`` after a write of our own in
    a shard's slot (``<ns>:{k}:replication-barrier``, expiring) covers every earlier write on
    that master: the entries a consumer read, the state a handler saw. For an effect outside
    Redis (a row in PostgreSQL, a venue call) that must not be made on the strength of what a
    failover could still take back."""
    commands = [
        (key, ("SET", key, "1", "PX", BARRIER_TTL_MS))
        for key in (keys.state(shard, "replication-barrier") for shard in sorted(set(shards)))
    ]
    for reply in await run_replicated(redis, wait, commands):
        if isinstance(reply, Exception):
            raise reply


class ReplicatedScriptBatcher(ScriptBatcher):
    """A ``ScriptBatcher`` whose every round trip ends with ``WAIT`` (``run_replicated``): a
    call's reply is given only once ``wait.replicas`` replicas have its effects; otherwise the
    call gets ``NotReplicated`` (its effects may or may not be on the master). The first key of
    each call picks its node on a cluster. A script that returns without writing gets the same
    guarantee only for writes made on that connection before; a script whose answer depends on
    earlier writes should write something (a no-op ``PEXPIRE``) so that its ``WAIT`` covers
    them."""

    def __init__(self, redis: AnyRedis, source: str, wait: ReplicaWait, *, max_batch: int = 256) -> None:
        super().__init__(redis, source, max_batch=max_batch)
        self.wait = wait

    async def _send(self, batch: list[tuple[list[Any], list[Any], Any]]) -> list[Any]:
        sha = self.script.sha
        replies = await run_replicated(
            self.redis, self.wait, [(keys[0], ("EVALSHA", sha, len(keys), *keys, *args)) for keys, args, _ in batch]
        )
        missing = [i for i, reply in enumerate(replies) if _no_script(reply)]
        if missing:  # a restarted or failed-over Redis: load the script, send those again
            try:
                await self.script.registered_client.script_load(self.script.script)
            except Exception as exc:
                for i in missing:
                    replies[i] = exc
                return replies
            again = await run_replicated(
                self.redis, self.wait,
                [(batch[i][0][0], ("EVALSHA", sha, len(batch[i][0]), *batch[i][0], *batch[i][1])) for i in missing],
            )
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies


def _no_script(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)
