"""``python -m services.replay``: rebuild every portfolio's positions from the event store
and compare them with the live positions in Redis.

Prints each difference and exits 1 if there is any, 0 when replay equals live. It first waits
(``--wait`` seconds at most) for the recorder to have persisted everything on the bus, so
that the store and Redis describe the same moment; run it when orders are not flowing, or
accept that fills in flight show up as differences. Reads the same settings as the services
(``ZVT_REDIS_URL``, ``ZVT_BUS_NAMESPACE``, ``ZVT_BUS_SHARDS``, ``ZVT_RECORDER_POSTGRES_DSN``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from services.core.bus import Bus
from services.core.events import EventType, OrderExecuted, PositionUpdated
from services.core.hotstate import PositionRecord, load
from services.core.redisconn import AnyRedis, open_redis, scan_keys
from services.core.settings import BusSettings, CoreSettings, SettingsError
from services.core.settings import load as load_settings
from services.recorder.settings import RecorderSettings
from services.recorder.store import EventStore
from services.replay.ledger import compare, rebuild

__all__ = ["live_positions", "replay", "main"]

PAGE = 50_000


async def live_positions(redis: AnyRedis, bus: Bus) -> dict[tuple[str, str], PositionRecord]:
    """Every position of the namespace, from the ``positions:<portfolio>`` hashes."""
    pattern = f"{bus.keys.namespace}:{{*}}:positions:*"
    out: dict[tuple[str, str], PositionRecord] = {}
    async for name in scan_keys(redis, pattern):
        pid = name.split(":positions:", 1)[1]
        for symbol, raw in (await redis.hgetall(name)).items():
            sym = symbol.decode() if isinstance(symbol, bytes) else symbol
            out[(pid, sym)] = load(PositionRecord, raw if isinstance(raw, bytes) else raw.encode())
    return out


async def replay(store: EventStore, redis: AnyRedis, bus: Bus) -> tuple[list[str], dict[str, int]]:
    """The differences between replayed and live positions, and what was compared."""
    fills: list[tuple[str, OrderExecuted]] = []
    updates: list[tuple[str, PositionUpdated]] = []
    after = 0
    types = [str(EventType.ORDER_EXECUTED), str(EventType.POSITION_UPDATED)]
    while True:
        page = await store.events_of_types(types, after_seq=after, limit=PAGE)
        for stored in page:
            event = stored.event
            if isinstance(event.payload, OrderExecuted):
                fills.append((event.portfolio_id, event.payload))
            elif isinstance(event.payload, PositionUpdated):
                updates.append((event.portfolio_id, event.payload))
        if len(page) < PAGE:
            break
        after = page[-1].seq
    rebuilt = rebuild(fills, updates)
    live = await live_positions(redis, bus)
    diffs = rebuilt.problems + compare(rebuilt.positions, live)
    counts = {
        "portfolios": len({pid for pid, _ in rebuilt.positions.keys() | live.keys()}),
        "positions": len(rebuilt.positions.keys() | live.keys()),
        "fills": rebuilt.fills,
    }
    return diffs, counts


async def wait_recorded(bus: Bus, timeout: float) -> bool:
    """Whether the recorder has persisted everything on the bus (waiting up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if await bus.backlog("recorder", list(EventType)) == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> int:
    core = load_settings(CoreSettings)
    bus_settings = load_settings(BusSettings)
    recorder = load_settings(RecorderSettings)
    redis = await open_redis(core)
    store = await EventStore.open(recorder.postgres_dsn, namespace=bus_settings.namespace)
    try:
        bus = Bus(redis, bus_settings)
        if not await wait_recorded(bus, args.wait):
            print(f"replay: the recorder is still behind after {args.wait}s; comparing anyway", file=sys.stderr)
        diffs, counts = await replay(store, redis, bus)
    finally:
        await store.close()
        await redis.aclose()
    for line in diffs:
        print(f"DIFF {line}")
    summary = f"{counts['portfolios']} portfolios, {counts['positions']} positions, {counts['fills']} fills"
    if diffs:
        print(f"replay differs from live: {len(diffs)} differences ({summary})")
        return 1
    print(f"replay equals live: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.replay", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the recorder to catch up")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except SettingsError as exc:
        print(exc.line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
