"""Per-account request budgets and circuit breakers shared by every process, in Redis.

``AccountLimiter`` is a token bucket (one Lua script, so concurrent processes never
overspend): ``rate`` tokens a second up to ``burst``; a call that finds the bucket empty
waits for the next token. ``AccountBreaker`` is open while its key lives: a 418 or 429
opens it for the venue's ``Retry-After`` (or the cool-down), ``failures`` unreachable calls
in a row open it for the cool-down. Both are per (venue, account), keyed under
``<namespace>:global:venue:<venue>:<account>:...``, so every routing replica sees the same
state. Without Redis (``redis=None``) they keep the same state in process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.core.keys import Keys

__all__ = ["AccountBreaker", "AccountLimiter"]

# KEYS[1] bucket hash; ARGV: rate/s, burst, cost, now (ms). Returns the ms to wait (0: taken).
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1]) local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
if now > at then tokens = math.min(burst, tokens + (now - at) * rate / 1000) end
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = math.ceil((cost - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(math.max(now, at)))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class AccountLimiter:
    def __init__(self, redis: Any | None, keys: Keys | None, venue: str, account: str, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst = rate, burst
        self._redis = redis
        self._key = keys.global_key("venue", venue, account, "bucket") if keys is not None else ""
        self._script = redis.register_script(_TOKEN_BUCKET) if redis is not None else None
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.waited_s = 0.0
        """Total time spent waiting for tokens (a metric for tests and benchmarks)."""

    async def acquire(self, cost: int = 1) -> None:
        while True:
            wait_ms = await self._take(cost)
            if wait_ms <= 0:
                return
            self.waited_s += wait_ms / 1000
            await asyncio.sleep(wait_ms / 1000)

    async def _take(self, cost: int) -> int:
        if self._script is not None:
            return int(await self._script(keys=[self._key], args=[self.rate, self.burst, cost, int(time.time() * 1000)]))
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0
        return int((cost - self._tokens) * 1000 / self.rate) + 1


class AccountBreaker:
    def __init__(
        self, redis: Any | None, keys: Keys | None, venue: str, account: str, *, failures: int, cooldown_s: float
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be at least 1 and cooldown_s positive")
        self.failures, self.cooldown_s = failures, cooldown_s
        self._redis = redis
        self._open_key = keys.global_key("venue", venue, account, "breaker") if keys is not None else ""
        self._count_key = keys.global_key("venue", venue, account, "failures") if keys is not None else ""
        self._open_until = 0.0
        self._count = 0
        self._cached: tuple[float, bool] = (0.0, False)
        self._counted = False

    async def is_open(self, *, max_age_s: float = 0.05) -> bool:
        """Whether calls should skip this account now. Redis is asked at most every
        ``max_age_s`` (routing asks per order)."""
        if self._redis is None:
            return time.monotonic() < self._open_until
        now = time.monotonic()
        at, value = self._cached
        if now - at < max_age_s:
            return value
        value = bool(await self._redis.exists(self._open_key))
        self._cached = (now, value)
        return value

    async def trip(self, seconds: float | None = None) -> None:
        """Open now, for ``seconds`` (default: the cool-down)."""
        span = self.cooldown_s if seconds is None else max(seconds, 0.001)
        if self._redis is None:
            self._open_until = time.monotonic() + span
        else:
            await self._redis.set(self._open_key, b"1", px=int(span * 1000))
            self._cached = (time.monotonic(), True)

    async def failure(self) -> None:
        """An unreachable call: ``failures`` in a row open the breaker."""
        self._counted = True
        if self._redis is None:
            self._count += 1
            count = self._count
        else:
            count = int(await self._redis.incr(self._count_key))
            await self._redis.pexpire(self._count_key, int(self.cooldown_s * 1000) * 4)
        if count >= self.failures:
            await self.trip()
            await self.success()

    async def success(self) -> None:
        if not self._counted:
            return  # no failure counted by this process: nothing to reset (no round trip)
        self._counted = False
        self._count = 0
        if self._redis is not None:
            await self._redis.delete(self._count_key)

    async def reset(self) -> None:
        self._open_until = 0.0
        self._cached = (0.0, False)
        if self._redis is not None:
            await self._redis.delete(self._open_key)  # one key a call: no cross-slot command
            await self._redis.delete(self._count_key)
