"""``POST /v1/orders?wait=``: wake requests when their order reaches a terminal status.

One reader per process (on Redis Cluster one per shard, since one XREAD may only name keys
of one slot) follows the terminal-status event streams of every shard, only while requests
wait. An event naming a waited order makes its request re-read the order record with a short
backoff (the order service writes the record just after those events); a slow poll of the
record is the safety net for anything missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.exceptions import RedisError

from services.core.events import EventType
from services.core.keys import Keys
from services.core.redisconn import AnyRedis
from services.core.telemetry import get_logger
from services.trading import Order

__all__ = ["TERMINAL_EVENTS", "Waiters"]

log = get_logger("zvt.gateway.waiters")

TERMINAL_EVENTS = (EventType.ORDER_EXECUTED, EventType.ORDER_REJECTED, EventType.ORDER_FAILED, EventType.ORDER_CANCELED)
_RECHECKS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


class _Payload(msgspec.Struct, frozen=True):
    order_id: str = ""


class _Peek(msgspec.Struct):
    payload: _Payload = _Payload()


_peek = msgspec.json.Decoder(_Peek).decode


class Waiters:
    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys,
        *,
        cluster: bool,
        block_ms: int,
        poll_s: float,
        load: Callable[[str], Awaitable[Order | None]],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.block_ms = block_ms
        self.poll_s = poll_s
        self.load = load
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._active = asyncio.Event()
        shards = range(keys.shards)
        groups = [[s] for s in shards] if cluster else [list(shards)]
        self._groups = [[keys.stream(s, t) for s in g for t in TERMINAL_EVENTS] for g in groups]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def wait(self, order_id: str, record_key: str, timeout: float) -> Order | None:
        """The order's record once terminal, or as it is when ``timeout`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = asyncio.Event()
        self._waiting.setdefault(order_id, set()).add(woken)
        self._active.set()
        recheck = len(_RECHECKS)
        try:
            while True:
                record = await self.load(record_key)
                remaining = deadline - loop.time()
                if record is None or record.is_terminal or remaining <= 0:
                    return record
                pause = _RECHECKS[recheck] if recheck < len(_RECHECKS) else self.poll_s
                recheck += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(pause, remaining))
                if woken.is_set():
                    woken.clear()
                    recheck = 0
        finally:
            events = self._waiting.get(order_id)
            if events is not None:
                events.discard(woken)
                if not events:
                    del self._waiting[order_id]

    def _notify(self, order_id: str) -> None:
        for woken in self._waiting.get(order_id, ()):
            woken.set()

    async def run(self, stopped: Callable[[], bool]) -> None:
        """Follow the terminal-status streams for as long as the process runs."""
        await asyncio.gather(*(self._follow(streams, stopped) for streams in self._groups))

    async def _follow(self, streams: list[str], stopped: Callable[[], bool]) -> None:
        positions: dict[Any, Any] = {}
        while not stopped():
            if not self._waiting:
                self._active.clear()
                positions = {}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._active.wait(), 0.5)
                continue
            if not positions:
                # A little before now: events older than the first waiter are covered by its
                # own first read of the record.
                start = f"{int(time.time() * 1000) - 1000}-0"
                positions = dict.fromkeys(streams, start)
            try:
                reply: Any = await self.redis.xread(positions, count=1000, block=self.block_ms)
            except RedisError as exc:
                log.warning("terminal-event read failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for stream, entries in _pairs(reply):
                name = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    positions[name] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    data = fields.get(b"d") if isinstance(fields, dict) else None
                    if data is None:
                        continue
                    try:
                        order_id = _peek(data).payload.order_id
                    except msgspec.DecodeError:
                        continue
                    if order_id in self._waiting:
                        self._notify(order_id)


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]
