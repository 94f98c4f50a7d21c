"""The local price feed: a seeded random walk of each symbol's mark, written to the marks
hash (``services.core.marks``) by one process at a time (a Redis lock elects it).

A mark that is already there is where the walk continues from, so restarts and fail-overs
keep the prices continuous; ``volatility`` 0 keeps every mark where it is (tests set marks
themselves).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any
from decimal import ROUND_HALF_EVEN, Decimal

from redis.exceptions import RedisError

from services.core.keys import Keys
from services.core.marks import Marks
from services.core.redisconn import AnyRedis
from services.core.telemetry import get_logger
from services.trading.money import money_context

__all__ = ["PriceFeed"]

log = get_logger("zvt.feed")


class PriceFeed:
    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys,
        start: Mapping[str, Decimal],
        steps: Mapping[str, Decimal],
        *,
        volatility: Decimal,
        seed: int,
        owner: str,
    ) -> None:
        self.redis = redis
        self.key = Marks(redis, keys).key
        self.lock = keys.global_key("price-feed-lock")
        self.start = dict(start)
        self.steps = dict(steps)
        self.volatility = volatility
        self.rng = random.Random(seed)
        self.owner = owner

    async def seed_marks(self) -> None:
        """Put a starting mark for every symbol that has none."""
        r = self.redis
        for symbol, price in self.start.items():
            await r.hsetnx(self.key, symbol, str(price))

    async def step(self, interval_s: float) -> bool:
        """Move every mark once, if this process holds the feed; True if it did."""
        r = self.redis
        try:
            held = await r.set(self.lock, self.owner, nx=True, px=int(interval_s * 3000))
            if not held:
                if await r.get(self.lock) != self.owner.encode():
                    return False
                await r.pexpire(self.lock, int(interval_s * 3000))
            current = await r.hgetall(self.key)
            moved: dict[Any, Any] = {}
            for symbol, start in self.start.items():
                raw = current.get(symbol.encode())
                mid = Decimal(raw.decode() if isinstance(raw, bytes) else raw) if raw else start
                move = Decimal(self.rng.randint(-1000, 1000)) / 1000 * self.volatility
                with money_context():
                    price = (mid * (1 + move)).quantize(self.steps[symbol], rounding=ROUND_HALF_EVEN)
                if price > 0 and price != mid:
                    moved[symbol] = str(price)
            if moved:
                await r.hset(self.key, mapping=moved)
            return True
        except RedisError as exc:
            log.warning("price feed step failed", error=str(exc))
            return False
