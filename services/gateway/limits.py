"""Per-key abuse limits on order submission.

- ``OrderRate``: at most ``ZVT_GATEWAY_KEY_ORDER_RATE`` orders per key per fixed window of
  ``ZVT_GATEWAY_KEY_ORDER_WINDOW_S`` seconds, counted in Redis (``<ns>:global:orate:<key id>:
  <window number>``, one ``INCR`` with its expiry set by a small script: one round trip per
  order, batched with concurrent ones), so the limit holds over every gateway replica. Windows
  start at multiples of the window length since the epoch; like any fixed window it lets up to
  twice the rate through across one window edge.
- ``WaitCap``: at most ``ZVT_GATEWAY_KEY_MAX_WAITS`` open ``?wait=`` requests per key, counted
  in this process only (N replicas allow N times as many).

Both answer 429 problem+json with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from services.core.keys import Keys
from services.core.redisconn import AnyRedis, ScriptBatcher
from services.gateway.problems import Problem

__all__ = ["OrderRate", "WaitCap"]

_RATE_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class OrderRate:
    def __init__(self, redis: AnyRedis, keys: Keys, limit: int, window_s: int) -> None:
        self.keys = keys
        self.limit = limit
        self.window_s = window_s
        self._count = ScriptBatcher(redis, _RATE_LUA) if limit > 0 else None
        self._expiry = str(window_s + 1)

    async def check(self, key_id: str) -> None:
        """Count one order of ``key_id``; 429 ``rate_limited`` when over the limit."""
        if self._count is None:
            return
        now = time.time()
        window = int(now // self.window_s)
        counted: Any = await self._count([self.keys.global_key("orate", key_id, str(window))], [self._expiry])
        if int(counted) > self.limit:
            retry = max(1, math.ceil((window + 1) * self.window_s - now))
            raise Problem(
                429, "rate_limited",
                f"this API key may submit {self.limit} orders per {self.window_s} s; retry later",
                headers={"Retry-After": str(retry)},
            )


class WaitCap:
    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after = str(retry_after_s)
        self._open: dict[str, int] = {}

    def take(self, key_id: str) -> None:
        """One more open wait of ``key_id``, or 429 ``too_many_waits``; pair with ``give_back``."""
        count = self._open.get(key_id, 0)
        if count >= self.limit:
            raise Problem(
                429, "too_many_waits",
                f"this API key already has {self.limit} requests waiting for their orders; "
                "retry later or submit without `wait`",
                headers={"Retry-After": self.retry_after},
            )
        self._open[key_id] = count + 1

    def give_back(self, key_id: str) -> None:
        count = self._open.get(key_id, 0) - 1
        if count > 0:
            self._open[key_id] = count
        else:
            self._open.pop(key_id, None)

    def open(self, key_id: str) -> int:
        return self._open.get(key_id, 0)
