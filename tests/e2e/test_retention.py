"""Trimming never drops what a group has not read (issue 12): with a one-second retention and
a fast trim, the portfolio service is frozen (SIGSTOP) for several times the retention while
orders flow through risk, order and routing and the recorder keeps up. Once thawed, every
fill is applied: positions equal fills, nothing was trimmed from under the portfolio group,
nothing was dead-lettered, and the streams are trimmed again once it has caught up."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from decimal import Decimal

from services.core.events import EventType
from services.core.hotstate import LimitsRecord, PositionRecord, StateKeys, load
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.trading import Side
from tests.e2e.conftest import SHARDS, Stack
from tests.integration.conftest import eventually

D = Decimal
LIMITS = LimitsRecord(
    max_notional_per_order=D("10000000"), max_position_per_symbol=D("1000000"), price_band=D("0.05"),
    max_orders_per_window=100_000, window_seconds=1,
)
FAST_TRIM = {"ZVT_BUS_RETENTION_S": "1", "ZVT_BUS_TRIM_INTERVAL_S": "0.2"}


async def _executed_left(stack: Stack) -> int:
    keys = stack.bus.keys
    return sum([int(await stack.redis.xlen(keys.stream(s, EventType.ORDER_EXECUTED))) for s in range(SHARDS)])


async def test_fills_when_portfolio_is_frozen_longer_than_the_retention_are_all_applied(stack: Stack) -> None:
    fleet = stack.fleet
    fleet.start(["risk", "order", "routing", "portfolio", "recorder"], env=FAST_TRIM)
    portfolios = [f"ret-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
    for pid in portfolios:
        await seed_portfolio(stack.bus, pid, {"USDT": D("100000000"), "BTC": D("1000")}, limits=LIMITS)
    sk = StateKeys(stack.bus.keys)

    async def marked() -> bool:
        return bool(await stack.redis.hget(sk.marks(), "BTC/USDT"))

    await eventually(marked, timeout=20)

    fleet.freeze("portfolio")
    try:
        injected: list[tuple[str, str]] = []
        for round_ in range(4):  # orders keep flowing across the freeze, several retentions long
            specs = [OrderSpec(pid, "BTC/USDT", Side.BUY if (round_ + i) % 3 else Side.SELL, D("0.01") * (i + 1))
                     for i, pid in enumerate(portfolios)]
            ids = await inject_orders(stack.bus, specs)
            injected += [(s.portfolio_id, oid) for s, oid in zip(specs, ids, strict=True)]
            await asyncio.sleep(0.75)

        async def all_filled() -> bool:
            return all(r is not None and r.is_terminal for r in await read_orders(stack.bus, injected))

        await eventually(all_filled, timeout=20)
        await asyncio.sleep(1.5)  # the oldest fills are now well past the retention, the recorder has them all
        # portfolio really was frozen: no fill applied yet
        assert [await stack.redis.hlen(sk.positions(pid)) for pid in portfolios] == [0] * len(portfolios)
    finally:
        fleet.thaw("portfolio")

    records = [r for r in await read_orders(stack.bus, injected) if r is not None]
    assert len(records) == len(injected) and all(str(r.status) == "filled" for r in records), records[:3]
    expected: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in records:
        for f in r.fills:
            expected[(r.portfolio_id, r.symbol)] += f.quantity if r.side is Side.BUY else -f.quantity

    async def live() -> dict[tuple[str, str], Decimal]:
        out: dict[tuple[str, str], Decimal] = {}
        for pid in portfolios:
            for symbol, raw in (await stack.redis.hgetall(sk.positions(pid))).items():
                out[(pid, symbol.decode())] = load(PositionRecord, raw).quantity
        return out

    async def applied() -> bool:
        return {k: v for k, v in (await live()).items() if v} == {k: v for k, v in expected.items() if v}

    try:
        await eventually(applied, timeout=20)
    except AssertionError:
        raise AssertionError(f"positions {await live()} != fills {dict(expected)}") from None
    assert await stack.bus.dead_letters() == []

    # once every group has caught up, trimming goes on: nothing is kept forever
    async def trimmed() -> bool:
        return await _executed_left(stack) == 0

    await eventually(trimmed, timeout=20)
