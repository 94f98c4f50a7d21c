"""The instrument catalogue in Redis: one key ``<ns>:global:catalogue`` (a JSON document,
``services.trading.catalogue.Catalogue``), read through a cache.

Routing builds it from its venues' markets (``combine_markets``) and writes it at start; the
process that runs the market feed writes it again every ``ZVT_ROUTING_CATALOGUE_INTERVAL_S``,
so a market a venue adds or changes reaches risk. The workflows worker, which holds venues
too, writes its own only where there is none yet. It has no expiry: when routing is down the
last catalogue still holds (risk keeps checking orders against the venues' last known terms).

Risk (steps, minimums, the worst taker fee), rebalance (quantity steps) and whoever else needs
an instrument read it through ``Instruments``, which refreshes its copy every ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from redis.exceptions import RedisError

from services.core.hotstate import StateKeys
from services.core.keys import Keys
from services.core.telemetry import get_logger
from services.trading.catalogue import Catalogue

__all__ = ["Instruments", "decode_catalogue", "encode_catalogue", "publish_catalogue"]

log = get_logger("zvt.catalogue")

_DECODER = msgspec.json.Decoder(Catalogue)


def encode_catalogue(catalogue: Catalogue) -> bytes:
    return msgspec.json.encode(catalogue)


def decode_catalogue(raw: bytes) -> Catalogue:
    return _DECODER.decode(raw)


async def publish_catalogue(redis: Any, keys: Keys, catalogue: Catalogue, *, only_if_absent: bool = False) -> bool:
    """Write the catalogue (with ``only_if_absent``, only where there is none); whether it did."""
    return bool(await redis.set(StateKeys(keys).catalogue(), encode_catalogue(catalogue), nx=only_if_absent))


class Instruments:
    """The catalogue as this process last read it, at most ``refresh_s`` old (the previous
    copy if Redis fails or the document does not decode); ``None`` until one is published."""

    def __init__(self, redis: Any, keys: Keys, *, refresh_s: float = 5.0) -> None:
        self.redis = redis
        self.key = StateKeys(keys).catalogue()
        self.refresh_s = refresh_s
        self._catalogue: Catalogue | None = None
        self._raw: bytes | None = None
        self._loaded_at = float("-inf")
        self._refreshing = asyncio.Lock()

    async def current(self) -> Catalogue | None:
        if time.monotonic() - self._loaded_at >= self.refresh_s or self._catalogue is None:
            async with self._refreshing:
                if time.monotonic() - self._loaded_at >= self.refresh_s or self._catalogue is None:
                    await self._load()
        return self._catalogue

    async def _load(self) -> None:
        now = time.monotonic()
        try:
            raw = await self.redis.get(self.key)
        except RedisError as exc:
            log.warning("instrument catalogue not refreshed", error=str(exc))
            return
        self._loaded_at = now
        if raw is None or raw == self._raw:
            return
        try:
            self._catalogue = decode_catalogue(raw)
        except (msgspec.DecodeError, ValueError) as exc:
            log.error("instrument catalogue does not decode; keeping the last one", error=str(exc))
            return
        self._raw = raw
