"""Mark prices: one Redis hash ``<ns>:global:marks`` (symbol -> price), read through a cache.

The market feed writes it from the venues' prices (``services.routing.market``; the
``market_data.process`` workflow from the snapshots it is given); risk reads it for price
bands and notionals, the gateway for unrealized PnL. Readers refresh their copy every ``refresh_s`` seconds, so a mark is at most that old.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from redis.exceptions import RedisError

from services.core.keys import Keys
from services.core.telemetry import get_logger

__all__ = ["Marks", "parse_marks"]

log = get_logger("zvt.marks")


class Marks:
    def __init__(self, redis: Any, keys: Keys, *, refresh_s: float = 0.1) -> None:
        self.redis = redis
        self.key = keys.global_key("marks")
        self.refresh_s = refresh_s
        self._marks: dict[str, Decimal] = {}
        self._loaded_at = float("-inf")
        self._refreshing = asyncio.Lock()

    async def current(self) -> dict[str, Decimal]:
        """Every mark, at most ``refresh_s`` old (the previous copy if Redis fails).

        One refresh at a time: callers that find the copy stale while a refresh is on its way
        wait for that one (routing handles a batch's orders concurrently; each used to send
        its own ``HGETALL``, about 2.5 per order at full load)."""
        if time.monotonic() - self._loaded_at >= self.refresh_s:
            async with self._refreshing:
                now = time.monotonic()
                if now - self._loaded_at >= self.refresh_s:
                    try:
                        raw = await self.redis.hgetall(self.key)
                    except RedisError as exc:
                        log.warning("marks not refreshed", error=str(exc))
                        self._loaded_at = now - self.refresh_s / 2  # the waiters use the old copy
                    else:
                        self._marks = parse_marks(raw)
                        self._loaded_at = now
        return self._marks

    async def get(self, symbol: str) -> Decimal | None:
        return (await self.current()).get(symbol)


def parse_marks(raw: dict[Any, Any]) -> dict[str, Decimal]:
    """The marks hash as read (``HGETALL``), less what is not a positive price."""
    out: dict[str, Decimal] = {}
    for k, v in raw.items():
        symbol = k.decode() if isinstance(k, bytes) else str(k)
        try:
            price = Decimal(v.decode() if isinstance(v, bytes) else str(v))
        except InvalidOperation:
            continue
        if price.is_finite() and price > 0:
            out[symbol] = price
    return out
