"""A process whose Redis connections are all in use waits for one to come back, up to
``ZVT_REDIS_POOL_TIMEOUT_S``, instead of failing at once ("too many connections"): on a single
node (redis-py's blocking pool) and on a cluster, whose nodes' pools cannot wait (the client's
connection gate). Blocking commands hold every connection; the next ones queue behind them."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.exceptions import ConnectionError

from services.core import redisconn
from tests.integration.conftest import Target

LIMIT = 2


@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redisconn, "MAX_CONNECTIONS", LIMIT)


def _keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex  # one hash tag: on a cluster every command goes to the same node
    return [f"pool-test:{{{tag}}}:{i}" for i in range(n)]


async def test_commands_beyond_the_pool_wait_for_a_connection(target: Target, small_pool: None) -> None:
    redis = await redisconn.open_redis(target.core(redis_pool_timeout_s=10))
    try:
        started = time.monotonic()
        # three times the pool, each holding its connection for 0.3 s: three waves
        answers = await asyncio.gather(*(redis.blpop([key], timeout=0.3) for key in _keys(3 * LIMIT)))
        elapsed = time.monotonic() - started
    finally:
        await redis.aclose()
    assert answers == [None] * (3 * LIMIT)
    assert elapsed >= 0.85, f"{3 * LIMIT} blocking commands on {LIMIT} connections took {elapsed:.2f} s"


async def test_a_command_that_waits_past_the_pool_timeout_fails_with_a_connection_error(
    target: Target, small_pool: None,
) -> None:
    redis = await redisconn.open_redis(target.core(redis_pool_timeout_s=0.2))
    try:
        holders = [asyncio.ensure_future(redis.blpop([key], timeout=1.5)) for key in _keys(LIMIT)]
        await asyncio.sleep(0.1)  # both connections taken
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await redis.get(_keys(1)[0])
        waited = time.monotonic() - started
        assert await asyncio.gather(*holders) == [None] * LIMIT  # the holders were not disturbed
        # and once they are done, the pool serves again
        assert await redis.get(_keys(1)[0]) is None
    finally:
        await redis.aclose()
    assert 0.15 <= waited < 1.2, f"failed after {waited:.2f} s, not at the 0.2 s pool timeout"
