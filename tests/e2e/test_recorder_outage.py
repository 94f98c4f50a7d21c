"""A PostgreSQL outage of any length loses nothing (issue 12).

The fleet (risk, order, routing, portfolio, recorder) runs on single Redis with a tiny
delivery budget (``ZVT_BUS_MAX_DELIVERIES=2``, reclaim after 0.5 s) while orders flow, and the
recorder's PostgreSQL goes away for several times that budget: stopped at once (``pg_ctl stop
-m immediate``, every connection dropped) or frozen (SIGSTOP: connections open, nothing
answers). Meanwhile the recorder's ``/readyz`` says the event store is down. Once PostgreSQL is
back, every event on the bus is in the store exactly once, no dead-letter stream holds
anything, and ``python -m services.replay`` exits 0.

The PostgreSQL taken away is a private, throwaway one (``devstack.stack.ThrowawayPostgres``),
never the shared instance that Hatchet and other tests use.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from devstack.fleet import Fleet
from devstack.stack import ThrowawayPostgres
from services.core.bus import Bus
from services.core.codec import decode
from services.core.events import EventType
from services.core.hotstate import LimitsRecord
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.core.redisconn import open_redis
from services.core.settings import BusSettings
from services.trading import Side
from tests.e2e.conftest import ROOT, SHARDS, stack_env
from tests.integration.conftest import Target, delete_namespace, eventually

D = Decimal
STAGES = ["risk", "order", "routing", "portfolio", "recorder"]
PORTFOLIOS = [f"outage-{i}" for i in range(6)]
LIMITS = LimitsRecord(
    max_notional_per_order=D("100000"), max_position_per_symbol=D("1000000"), price_band=D("0.05"),
    max_orders_per_window=100_000, window_seconds=1,
)
RATE = 60  # orders per second
BEFORE_S, OUTAGE_S, AFTER_S = 1.5, 8.0, 1.5
# the budget: 2 deliveries, a failed entry is reclaimed after 0.5 s; the recorder gives up on
# PostgreSQL after 0.5 s (pool) / 1 s (write): an outage of 8 s is many budgets long
BUDGET = {
    "ZVT_BUS_MAX_DELIVERIES": "2",
    "ZVT_BUS_RECLAIM_IDLE_MS": "500",
    "ZVT_BUS_RECLAIM_INTERVAL_MS": "200",
    "ZVT_RECORDER_CONNECT_TIMEOUT_S": "2",
    "ZVT_RECORDER_POOL_TIMEOUT_S": "0.5",
    "ZVT_RECORDER_WRITE_TIMEOUT_S": "1",
    "ZVT_RECORDER_HEALTH_INTERVAL_S": "0.25",
}


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[ThrowawayPostgres]:
    """One throwaway PostgreSQL for the module's tests (each records under its own namespace)."""
    pg = ThrowawayPostgres.create()
    try:
        yield pg
    finally:
        pg.remove()


def spec(rng: random.Random, n: int) -> OrderSpec:
    symbol = rng.choice(["BTC/USDT", "ETH/USDT", "SOL/USDT"])
    qty = {"BTC/USDT": D("0.001"), "ETH/USDT": D("0.01"), "SOL/USDT": D("0.1")}[symbol] * rng.randint(1, 5)
    side = Side.BUY if rng.random() < 0.6 else Side.SELL
    return OrderSpec(PORTFOLIOS[n % len(PORTFOLIOS)], symbol, side, qty)


async def readiness(client: httpx.AsyncClient, port: int) -> tuple[int, dict[str, bool]]:
    try:
        response = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json().get("checks", {})


@pytest.mark.parametrize("fault", ["down", "frozen"])
async def test_recorder_when_postgres_is_away_longer_than_the_delivery_budget_loses_nothing(
    fault: str, redis_single_url: str, private_postgres: ThrowawayPostgres, tmp_path: Path,
) -> None:
    pg = private_postgres
    pg.thaw()
    pg.start()
    target = Target("single", redis_single_url)
    namespace = f"e{uuid.uuid4().hex[:10]}"
    env = stack_env(target, namespace, pg.dsn, **BUDGET)
    fleet = Fleet(env, log_dir=tmp_path / "logs")
    redis = await open_redis(target.core())
    bus = Bus(redis, BusSettings(namespace=namespace, shards=SHARDS))
    http = httpx.AsyncClient()
    try:
        fleet.start(STAGES)
        recorder = fleet.live("recorder")[0]
        assert recorder.http_port is not None
        for pid in PORTFOLIOS:
            await seed_portfolio(
                bus, pid, {"USDT": D("100000000"), "BTC": D("1000"), "ETH": D("10000"), "SOL": D("100000")},
                limits=LIMITS,
            )
        rng = random.Random(12)
        injected: list[tuple[str, str]] = []

        async def produce(seconds: float) -> None:
            end = time.monotonic() + seconds
            n = len(injected)
            while time.monotonic() < end:
                chunk = [spec(rng, n + i) for i in range(6)]
                n += len(chunk)
                ids = await inject_orders(bus, chunk)
                injected.extend((s.portfolio_id, oid) for s, oid in zip(chunk, ids, strict=True))
                await asyncio.sleep(len(chunk) / RATE)

        await produce(BEFORE_S)
        if fault == "down":
            await asyncio.to_thread(pg.stop, "immediate")
        else:
            await asyncio.to_thread(pg.freeze)
        seen_down: dict[str, bool] = {}
        outage = asyncio.create_task(produce(OUTAGE_S))
        try:
            while not outage.done():
                status, checks = await readiness(http, recorder.http_port)
                if status == 503 and checks.get("event_store") is False:
                    seen_down = checks
                await asyncio.sleep(0.2)
            await outage
        finally:
            if fault == "down":
                await asyncio.to_thread(pg.start)
            else:
                pg.thaw()
        await produce(AFTER_S)

        # every order reaches a terminal status, and the recorder catches up with the bus
        async def all_terminal() -> bool:
            return all(r is not None and r.is_terminal for r in await read_orders(bus, injected))

        await eventually(all_terminal, timeout=60, interval=0.25)

        async def caught_up() -> bool:
            return await bus.backlog("recorder", list(EventType)) == 0

        await eventually(caught_up, timeout=60, interval=0.25)
        assert recorder.alive, "the recorder exited during the outage"
        assert "dependency unavailable; holding entries" in recorder.log.read_text(errors="replace")

        # nothing dead-lettered, by any stage
        dead = await bus.dead_letters()
        assert not dead, f"{len(dead)} dead letters, e.g. {[(d.group, d.reason, d.error[:200]) for d in dead[:3]]}"

        # every event on the bus is in the store, exactly once
        on_bus: set[str] = set()
        for event_type in EventType:
            for shard in range(SHARDS):
                for _, fields in await redis.xrange(bus.keys.stream(shard, event_type)):
                    on_bus.add(str(decode(fields[b"d"], event_type).event_id))
        async with await psycopg.AsyncConnection.connect(pg.dsn) as conn:
            cur = await conn.execute("SELECT event_id::text FROM zvt_events WHERE namespace = %s", (namespace,))
            stored = [row[0] for row in await cur.fetchall()]
        assert len(stored) == len(set(stored))
        missing = on_bus - set(stored)
        assert not missing, f"{len(missing)} of {len(on_bus)} events on the bus are not in the store"
        assert set(stored) == on_bus

        # replay of the store equals live
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.replay", "--wait", "30"],
            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        # /readyz said the event store was down while it was, and says it is up again
        assert seen_down, "recorder /readyz never reported the event store down during the outage"

        async def ready_again() -> bool:
            status, checks = await readiness(http, recorder.http_port or 0)
            return status == 200 and checks.get("event_store") is True

        await eventually(ready_again, timeout=10, interval=0.2)
    finally:
        pg.thaw()
        await http.aclose()
        fleet.stop()
        await delete_namespace(redis, namespace)
        await redis.aclose()
