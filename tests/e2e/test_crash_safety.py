"""Crash safety (ARCHITECTURE section 11, invariants 1-3 and 5): while thousands of orders flow,
kill -9 each service in turn and then a random one every few seconds, restart it, and check
the books: every order reached exactly one terminal status, fills equal position changes,
no fill was counted twice, and replaying the event store gives the live positions."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from typing import Any

from services.core.codec import decode
from services.core.events import Event, EventType
from services.core.hotstate import PositionRecord, StateKeys, load
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.core.hotstate import LimitsRecord
from services.trading import OrderType, Side
from tests.e2e.conftest import ROOT, SHARDS, Stack
from tests.integration.conftest import eventually

D = Decimal
ORDERS = 2_000
RATE = 160  # orders per second
STAGES = ["risk", "order", "routing", "portfolio", "recorder"]
PORTFOLIOS = [f"crash-{i}" for i in range(24)]
LIMITS = LimitsRecord(
    max_notional_per_order=D("100000"), max_position_per_symbol=D("1000000"), price_band=D("0.05"),
    max_orders_per_window=100_000, window_seconds=1,
)
TERMINAL_EVENTS = (EventType.ORDER_REJECTED, EventType.ORDER_FAILED, EventType.ORDER_CANCELED, EventType.ORDER_EXECUTED)


def spec(rng: random.Random, n: int) -> OrderSpec:
    pid = PORTFOLIOS[n % len(PORTFOLIOS)]
    roll = rng.random()
    symbol = rng.choice(["BTC/USDT", "ETH/USDT", "SOL/USDT"])
    qty = {"BTC/USDT": D("0.001"), "ETH/USDT": D("0.01"), "SOL/USDT": D("0.1")}[symbol] * rng.randint(1, 5)
    side = Side.BUY if rng.random() < 0.6 else Side.SELL
    if roll < 0.05:
        return OrderSpec(pid, "XYZ/USDT", side, D("1"))  # rejected: unknown symbol
    if roll < 0.35:
        price = {"BTC/USDT": D("60000"), "ETH/USDT": D("3000"), "SOL/USDT": D("150")}[symbol]
        price = price * (D("1.01") if side is Side.BUY else D("0.99"))
        return OrderSpec(pid, symbol, side, qty, OrderType.LIMIT, price.quantize(D("0.01")))
    return OrderSpec(pid, symbol, side, qty)


async def terminal_and_fill_events(stack: Stack) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The distinct terminal event ids of each order (a fill ends an order when nothing is
    left), and the distinct event ids of each fill id, from the streams."""
    terminal: dict[str, set[str]] = defaultdict(set)
    fills: dict[str, set[str]] = defaultdict(set)
    for event_type in TERMINAL_EVENTS:
        for event in await stream_events(stack, event_type):
            p = event.payload
            if event_type is EventType.ORDER_EXECUTED:
                fills[p.fill_id].add(event.event_id)
                if p.leaves_quantity > 0:
                    continue
            terminal[p.order_id].add(event.event_id)
    return terminal, fills


async def stream_events(stack: Stack, event_type: EventType) -> list[Event[Any]]:
    events = []
    for shard in range(SHARDS):
        for _, fields in await stack.redis.xrange(stack.bus.keys.stream(shard, event_type)):
            events.append(decode(fields[b"d"], event_type))
    return events


async def test_books_when_services_are_killed_under_load_balance(stack: Stack) -> None:
    fleet = stack.fleet
    fleet.start(STAGES)
    for pid in PORTFOLIOS:
        await seed_portfolio(
            stack.bus, pid, {"USDT": D("100000000"), "BTC": D("1000"), "ETH": D("10000"), "SOL": D("100000")},
            limits=LIMITS,
        )
    rng = random.Random(7)
    injected: list[tuple[str, str]] = []
    specs: dict[str, OrderSpec] = {}

    async def produce() -> None:
        batch = 8
        for start in range(0, ORDERS, batch):
            chunk = [spec(rng, n) for n in range(start, min(ORDERS, start + batch))]
            ids = await inject_orders(stack.bus, chunk)
            for s, oid in zip(chunk, ids, strict=True):
                injected.append((s.portfolio_id, oid))
                specs[oid] = s
            await asyncio.sleep(batch / RATE)

    killed: list[str] = []

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        for name in STAGES:  # each service in turn
            await asyncio.to_thread(fleet.restart, name)
            killed.append(name)
            await asyncio.sleep(1.0)
        while not producer.done():  # then a random one every few seconds
            name = rng.choice(STAGES)
            await asyncio.to_thread(fleet.restart, name)
            killed.append(name)
            await asyncio.sleep(rng.uniform(1.5, 3.0))

    producer = asyncio.create_task(produce())
    await asyncio.gather(producer, chaos())
    assert len(injected) == ORDERS and set(STAGES) <= set(killed)

    # 1. every order reaches a terminal status
    records: list[Any] = []

    async def all_terminal() -> bool:
        nonlocal records
        records = await read_orders(stack.bus, injected)
        return all(r is not None and r.is_terminal for r in records)

    try:
        await eventually(all_terminal, timeout=120, interval=0.5)
    except AssertionError:
        stuck = [(r.order_id, r.status) if r else None for r in records if r is None or not r.is_terminal]
        raise AssertionError(f"{len(stuck)} orders not terminal, e.g. {stuck[:5]}") from None

    # ... exactly one: one distinct terminal event per order (copies share an event id)
    terminal, fills_by_id = await terminal_and_fill_events(stack)
    many = {oid: ids for oid, ids in terminal.items() if len(ids) != 1}
    assert not many, f"orders with more than one terminal event: {list(many.items())[:5]}"
    assert set(terminal) == {oid for _, oid in injected}

    # 2. no fill counted twice: one event per fill id, each fill once in its order's record
    assert all(len(ids) == 1 for ids in fills_by_id.values())
    recorded_fills = [f.fill_id for r in records for f in r.fills]
    assert len(recorded_fills) == len(set(recorded_fills)) == len(fills_by_id)

    # ... and fills equal position changes
    expected: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in records:
        for f in r.fills:
            expected[(r.portfolio_id, r.symbol)] += f.quantity if r.side is Side.BUY else -f.quantity
    sk = StateKeys(stack.bus.keys)
    live: dict[tuple[str, str], Decimal] = {}
    for pid in PORTFOLIOS:
        for symbol, raw in (await stack.redis.hgetall(sk.positions(pid))).items():
            live[(pid, symbol.decode())] = load(PositionRecord, raw).quantity
    assert {k: v for k, v in expected.items() if v} == {k: v for k, v in live.items() if v}
    statuses = {str(r.status) for r in records}
    assert {"filled", "rejected"} <= statuses

    # 3. replay of the event store equals live
    env = {**os.environ, **stack.env}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.replay", "--wait", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "replay equals live" in result.stdout
