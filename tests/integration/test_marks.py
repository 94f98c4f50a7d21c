"""Marks read through their cache against a real Redis: many concurrent readers of a stale
copy (routing handles a batch's orders at once) cost one read, not one each."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from redis.asyncio import Redis

from services.core.keys import Keys
from services.core.marks import Marks


async def _hgetall_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_marks_when_many_read_a_stale_copy_at_once_refresh_it_once(redis_single_url: str, namespace: str) -> None:
    redis = Redis.from_url(redis_single_url)
    keys = Keys(namespace, 4)
    marks = Marks(redis, keys, refresh_s=60)
    try:
        await redis.hset(marks.key, mapping={"BTC/USDT": "100.5", "ETH/USDT": "bad", "SOL/USDT": "-1"})
        before = await _hgetall_calls(redis)
        copies = await asyncio.gather(*(marks.current() for _ in range(50)))
        after = await _hgetall_calls(redis)
        assert after - before == 1
        assert all(c == {"BTC/USDT": Decimal("100.5")} for c in copies)  # the bad prices are left out
        await redis.hset(marks.key, "BTC/USDT", "101")
        assert await marks.get("BTC/USDT") == Decimal("100.5")  # within refresh_s: the cached copy
    finally:
        await redis.delete(marks.key)
        await redis.aclose()
