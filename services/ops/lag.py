"""Consumer-group lag, read from the fleet's Redis with the services' own settings
(``ZVT_REDIS_*``, ``ZVT_BUS_NAMESPACE``, ``ZVT_BUS_SHARDS``).

A group's lag is summed over every shard of every event type of the catalog: entries not yet
delivered to it (``lag``) and delivered but not acknowledged (``pending``). A stream the group
does not read counts 0, so no list of who reads what is needed here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from redis.exceptions import RedisError

from services.core.bus import Bus
from services.core.events import EventType
from services.core.redisconn import open_redis
from services.core.settings import BusSettings, CoreSettings, SettingsError, load

__all__ = ["GroupLag", "read_lag"]


@dataclass(frozen=True)
class GroupLag:
    lag: int
    pending: int


async def _read(groups: list[str]) -> dict[str, GroupLag]:
    core = load(CoreSettings, service="ops")
    bus_settings = load(BusSettings)
    redis = await open_redis(core)
    try:
        bus = Bus(redis, bus_settings)
        out: dict[str, GroupLag] = {}
        for group in groups:
            per_shard = await bus.group_lag(group, list(EventType))
            out[group] = GroupLag(sum(lag for lag, _ in per_shard.values()),
                                  sum(pending for _, pending in per_shard.values()))
        return out
    finally:
        await redis.aclose()


def read_lag(groups: Iterable[str], timeout_s: float = 15.0) -> dict[str, GroupLag] | str:
    """Lag per group, or why it could not be read (one line)."""
    wanted = sorted(set(groups))
    if not wanted:
        return {}
    try:
        return asyncio.run(asyncio.wait_for(_read(wanted), timeout_s))
    except SettingsError as exc:
        return exc.line
    except (RedisError, OSError) as exc:
        return f"Redis: {exc}"
    except TimeoutError:
        return f"Redis did not answer within {timeout_s:g} s"
