"""A consumer loop's own connections (``Lane``) against real Redis, single node and cluster:
whatever is out of the ordinary (a killed connection, a lost script, a command cancelled
half way, a stale slot map) must end as the client's own path would, never in a wrong reply."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from services.core.redisconn import AnyRedis, Lane
from tests.integration.conftest import Target


@pytest.fixture
def key(namespace: str) -> str:
    return f"{namespace}:{{lane}}:k"


async def test_lane_when_its_connection_is_killed_answers_through_the_client_and_reconnects(
    redis: AnyRedis, key: str
) -> None:
    await redis.set(key, "v1")
    lane = Lane(redis)
    try:
        assert await lane.execute("GET", key, key=key) == b"v1"
        # kill every connection but the test client's own, on every node: the lane's too
        nodes: list[object] = redis.get_primaries() if isinstance(redis, RedisCluster) else [None]
        for node in nodes:
            extra = {"target_nodes": node} if node is not None else {}
            await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes", **extra)
        await redis.set(key, "v2")
        assert await lane.execute("GET", key, key=key) == b"v2"  # no error, the fresh value
        assert await lane.execute("GET", key, key=key) == b"v2"  # and a new connection of its own
    finally:
        await lane.close()


async def test_lane_when_the_server_lost_its_scripts_loads_the_script_again(redis: AnyRedis, key: str) -> None:
    script = redis.register_script("return redis.call('INCR', KEYS[1])")
    lane = Lane(redis)
    try:
        assert await lane.script(script, [key], []) == 1
        nodes: list[object] = redis.get_primaries() if isinstance(redis, RedisCluster) else [None]
        for node in nodes:
            extra = {"target_nodes": node} if node is not None else {}
            await redis.execute_command("SCRIPT", "FLUSH", **extra)
        assert await lane.script(script, [key], []) == 2
    finally:
        await lane.close()


async def test_lane_when_a_command_is_cancelled_half_way_never_hands_its_reply_to_the_next(
    redis: AnyRedis, key: str
) -> None:
    """A blocked read cancelled (a consumer stopping) leaves its reply on the way: the next
    command on that connection would read it as its own."""
    other = key + ":other"
    await redis.set(other, "mine")
    lane = Lane(redis)
    try:
        blocked = asyncio.ensure_future(lane.execute("BLPOP", key, 5, key=key))
        await asyncio.sleep(0.2)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        await redis.rpush(key, "for-the-cancelled-read")
        await asyncio.sleep(0.1)
        assert await lane.execute("GET", other, key=other) == b"mine"
    finally:
        await lane.close()


async def test_lane_when_an_error_reply_comes_raises_it_and_the_connection_stays_in_step(
    redis: AnyRedis, key: str
) -> None:
    await redis.set(key, "text")
    lane = Lane(redis)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await lane.execute("LPUSH", key, "x", key=key)
        assert await lane.execute("GET", key, key=key) == b"text"
    finally:
        await lane.close()


async def test_lane_when_the_slot_map_is_stale_follows_the_redirect(cluster_target: Target, namespace: str) -> None:
    """A lane sends a command to the node its client's slot map names; a node that no longer
    serves the slot answers MOVED, and the client's own path follows it and refreshes."""
    from services.core.redisconn import open_redis

    redis = await open_redis(cluster_target.core())
    key = f"{namespace}:{{moved}}:k"
    try:
        await redis.set(key, "here")
        assert isinstance(redis, RedisCluster)
        slot = redis.keyslot(key)
        right = redis.nodes_manager.slots_cache[slot][0]
        wrong = next(n for n in redis.get_primaries() if n.name != right.name)
        redis.nodes_manager.slots_cache[slot] = [wrong]  # as after a slot moved under the client
        lane = Lane(redis)
        try:
            assert await lane.execute("GET", key, key=key) == b"here"
            assert redis.nodes_manager.slots_cache[slot][0].name == right.name  # the map was refreshed
            assert await lane.execute("GET", key, key=key) == b"here"
        finally:
            await lane.close()
    finally:
        await redis.delete(key)
        await redis.aclose()

