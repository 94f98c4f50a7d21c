"""``ScriptBatcher`` on both topologies: concurrent calls share round trips and each gets its
own reply or error, and a Redis that lost its scripts is handled."""

from __future__ import annotations

import asyncio


from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from services.core.redisconn import AnyRedis, ScriptBatcher

SCRIPT = """
if ARGV[1] == 'boom' then return redis.error_reply('boom ' .. KEYS[1]) end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""


async def test_batcher_when_called_concurrently_gives_each_call_its_own_reply(redis: AnyRedis, namespace: str) -> None:
    batcher = ScriptBatcher(redis, SCRIPT)
    keys = [f"{namespace}:{{{i % 7}}}:n" for i in range(200)]
    replies = await asyncio.gather(*(batcher([k], [1]) for k in keys))
    assert sorted(replies) == sorted([j + 1 for i in range(7) for j in range(len(keys[i::7]))])
    for i in range(7):
        assert int(await redis.get(f"{namespace}:{{{i}}}:n")) == len(keys[i::7])

    results = await asyncio.gather(
        batcher([f"{namespace}:{{1}}:n"], [1]), batcher([f"{namespace}:{{2}}:x"], ["boom"]),
        batcher([f"{namespace}:{{3}}:n"], [1]), return_exceptions=True,
    )
    assert isinstance(results[1], ResponseError) and "boom" in str(results[1])
    assert results[0] == len(keys[1::7]) + 1 and results[2] == len(keys[3::7]) + 1


async def test_batcher_when_redis_forgot_its_scripts_loads_them_again(redis: AnyRedis, namespace: str) -> None:
    batcher = ScriptBatcher(redis, SCRIPT)
    assert await batcher([f"{namespace}:{{1}}:n"], [1]) == 1
    if isinstance(redis, RedisCluster):
        await redis.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.ALL_NODES)
    else:
        await redis.script_flush()
    replies = await asyncio.gather(*(batcher([f"{namespace}:{{1}}:n"], [1]) for _ in range(20)))
    assert sorted(replies) == list(range(2, 22))


