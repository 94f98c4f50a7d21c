"""One way to open Redis for every process: a single node or a cluster, same API."""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

from services.core.settings import CoreSettings

__all__ = ["AnyRedis", "connect", "open_redis"]

AnyRedis: TypeAlias = Redis | RedisCluster


def connect(settings: CoreSettings) -> AnyRedis:
    """A client for ``settings.redis_url``; the caller closes it with ``aclose()``."""
    retry = Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=3, supported_errors=(ConnectionError, TimeoutError))
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=retry,
            health_check_interval=0,
        )
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=retry,
        max_connections=512,
    )


async def open_redis(settings: CoreSettings) -> AnyRedis:
    """``connect``, and for a cluster also load the slot map before the first command.

    redis-py's async cluster client loads it lazily on first use, and concurrent first
    commands on a fresh client can race that load (failing with a connection error).
    """
    client = connect(settings)
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client
