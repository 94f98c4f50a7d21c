"""No double spend (issue: money and privileges): funds reserved for an order stay counted
until the portfolio stage has debited them, a fill is applied once whatever arrives twice, a
request risk already decided is never approved again, and a market buy cannot spend more
than its portfolio holds. Each test runs the real services as processes on single Redis and
on Redis Cluster, and attacks the promise: a frozen portfolio service, duplicated fills,
a request redelivered after its dedupe window, market buys that drain the balance."""

from __future__ import annotations

import uuid
from decimal import ROUND_CEILING, Decimal
from typing import Any

from services.core.codec import decode
from services.core.events import Event, EventType, OrderExecuted
from services.core.hotstate import LimitsRecord, PositionRecord, RiskRecord, StateKeys, decode_balances, load
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.trading import Liquidity, Side
from services.trading.orders import OrderStatus
from tests.e2e.conftest import Stack
from tests.integration.conftest import eventually

D = Decimal
LIMITS = LimitsRecord(
    max_notional_per_order=D("10000000"), max_position_per_symbol=D("1000000"), price_band=D("0.05"),
    max_orders_per_window=100_000, window_seconds=1,
)


async def _order(stack: Stack, pid: str, oid: str) -> Any:
    (record,) = await read_orders(stack.bus, [(pid, oid)])
    return record


async def _terminal(stack: Stack, pid: str, oid: str, timeout: float = 20) -> Any:
    holder: list[Any] = []

    async def done() -> bool:
        record = await _order(stack, pid, oid)
        holder[:] = [record]
        return record is not None and record.is_terminal

    await eventually(done, timeout=timeout, interval=0.05)
    return holder[0]


async def _balances(stack: Stack, pid: str) -> dict[str, Decimal]:
    return decode_balances(await stack.redis.hgetall(StateKeys(stack.bus.keys).balances(pid)))


async def _reserved(stack: Stack, pid: str) -> tuple[dict[str, Decimal], int]:
    sk = StateKeys(stack.bus.keys)
    raw = await stack.redis.get(sk.risk(pid))
    record = load(RiskRecord, raw) if raw else RiskRecord()
    return {a: v for a, v in record.reserved.items() if v}, int(await stack.redis.hlen(sk.reservations(pid)))


async def _stream(stack: Stack, event_type: EventType, pid: str) -> list[tuple[bytes, Event[Any]]]:
    key = stack.bus.keys.stream(stack.bus.keys.shard_of(pid), event_type)
    out = []
    for entry_id, fields in await stack.redis.xrange(key):
        event = decode(fields[b"d"], event_type)
        if event.portfolio_id == pid:
            out.append((entry_id, event))
    return out


async def _caught_up(stack: Stack, group: str, event_type: EventType, pid: str) -> None:
    """Wait until ``group`` has read and acknowledged everything on ``pid``'s shard."""
    key = stack.bus.keys.stream(stack.bus.keys.shard_of(pid), event_type)

    async def idle() -> bool:
        for info in await stack.redis.xinfo_groups(key):
            if info["name"].decode() == group:
                return bool(info["pending"] == 0 and info.get("lag") == 0)
        return False

    await eventually(idle, timeout=20)


async def _mark(stack: Stack, symbol: str) -> Decimal:
    marks_key = StateKeys(stack.bus.keys).marks()
    holder: list[Decimal] = []

    async def present() -> bool:
        raw = await stack.redis.hget(marks_key, symbol)
        if raw:
            holder[:] = [D(raw.decode())]
        return bool(raw)

    await eventually(present, timeout=20)
    return holder[0]


async def test_reserved_funds_when_portfolio_service_is_frozen_stay_counted_until_debited(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    pid = f"funds-{uuid.uuid4().hex[:6]}"
    await seed_portfolio(stack.bus, pid, {"USDT": D("10000")}, limits=LIMITS)
    await _mark(stack, "BTC/USDT")
    stack.fleet.freeze("portfolio")
    try:
        # A takes about 60% of the balance and fills while nothing debits it yet ...
        (a,) = await inject_orders(stack.bus, [OrderSpec(pid, "BTC/USDT", Side.BUY, D("0.1"))])
        first = await _terminal(stack, pid, a)
        assert first.status is OrderStatus.FILLED, first
        # ... so B, which fits only if A's funds were free, must be refused for balance.
        (b,) = await inject_orders(stack.bus, [OrderSpec(pid, "BTC/USDT", Side.BUY, D("0.1"))])
        second = await _terminal(stack, pid, b)
        assert second.status is OrderStatus.REJECTED, second
        assert second.reject_code == "INSUFFICIENT_BALANCE", second
        assert await _balances(stack, pid) == {"USDT": D("10000")}  # the portfolio stage really was frozen
    finally:
        stack.fleet.thaw("portfolio")

    cost = first.fill_notional + first.commission
    sk = StateKeys(stack.bus.keys)

    async def debited() -> bool:
        return (await _balances(stack, pid)).get("USDT") == D("10000") - cost

    await eventually(debited, timeout=30)
    balances = await _balances(stack, pid)
    assert balances == {"USDT": D("10000") - cost, "BTC": D("0.1")}
    position = load(PositionRecord, await stack.redis.hget(sk.positions(pid), "BTC/USDT"))
    assert position.quantity == D("0.1") and position.fills == len(first.fills)

    async def released() -> bool:
        return await _reserved(stack, pid) == ({}, 0)

    await eventually(released, timeout=20)


async def test_market_buys_when_they_drain_the_balance_never_take_it_below_zero(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    pid = f"drain-{uuid.uuid4().hex[:6]}"
    mark = await _mark(stack, "BTC/USDT")
    # Exactly what two buys of 0.1 BTC cost at the mark with the taker fee, while the venue
    # fills above the mark (at the ask and deeper): both at once must not overdraw it.
    seed = (2 * D("0.1") * mark * D("1.001")).quantize(D("0.01"), rounding=ROUND_CEILING)
    await seed_portfolio(stack.bus, pid, {"USDT": seed}, limits=LIMITS)
    ids = await inject_orders(stack.bus, [OrderSpec(pid, "BTC/USDT", Side.BUY, D("0.1"))] * 2)
    records = [await _terminal(stack, pid, oid) for oid in ids]
    assert OrderStatus.FILLED in {r.status for r in records}, records
    await _caught_up(stack, "portfolio", EventType.ORDER_EXECUTED, pid)
    updates = await _stream(stack, EventType.PORTFOLIO_UPDATED, pid)
    assert updates
    for _, event in updates:
        assert all(v >= 0 for v in event.payload.balances.values()), event.payload.balances
    assert all(v >= 0 for v in (await _balances(stack, pid)).values())


async def test_fill_when_delivered_twice_is_applied_once(stack: Stack) -> None:
    stack.fleet.start(["portfolio"])
    pid = f"twice-{uuid.uuid4().hex[:6]}"
    await seed_portfolio(stack.bus, pid, {"USDT": D("10000")}, limits=LIMITS)
    fill = OrderExecuted(
        order_id="0190e3c4-0000-7000-8000-000000000001", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY,
        venue="paper", venue_order_id="v-1", fill_id="paper-1", quantity=D("0.01"), price=D("60000"),
        commission=D("0.6"), commission_asset="USDT", liquidity=Liquidity.TAKER,
        cumulative_quantity=D("0.01"), leaves_quantity=D("0"),
    )
    first = Event.new(fill, portfolio_id=pid, correlation_id=fill.order_id)
    await stack.bus.publish(first)
    await _caught_up(stack, "portfolio", EventType.ORDER_EXECUTED, pid)
    # the same fill again: under a new event id (a second reporter), and under the same id
    # after its dedupe mark is gone (redelivered past the window)
    await stack.bus.publish(Event.new(fill, portfolio_id=pid, correlation_id=fill.order_id))
    shard = stack.bus.keys.shard_of(pid)
    await stack.redis.delete(stack.bus.keys.seen_prefix(shard, "portfolio") + first.event_id)
    await stack.bus.publish(first)
    await _caught_up(stack, "portfolio", EventType.ORDER_EXECUTED, pid)
    assert await _balances(stack, pid) == {"USDT": D("10000") - D("600") - D("0.6"), "BTC": D("0.01")}
    updates = await _stream(stack, EventType.POSITION_UPDATED, pid)
    assert len({e.event_id for _, e in updates}) == 1, updates


async def test_request_when_redelivered_after_its_order_finished_is_not_approved_again(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    pid = f"again-{uuid.uuid4().hex[:6]}"
    await seed_portfolio(stack.bus, pid, {"USDT": D("10000")}, limits=LIMITS)
    await _mark(stack, "BTC/USDT")
    (oid,) = await inject_orders(stack.bus, [OrderSpec(pid, "BTC/USDT", Side.BUY, D("0.01"))])
    assert (await _terminal(stack, pid, oid)).status is OrderStatus.FILLED

    async def released() -> bool:
        return await _reserved(stack, pid) == ({}, 0)

    await eventually(released, timeout=20)
    # the request again, past its dedupe window (the marks are gone)
    ((_, requested),) = await _stream(stack, EventType.ORDER_REQUESTED, pid)
    shard = stack.bus.keys.shard_of(pid)
    await stack.redis.delete(stack.bus.keys.seen_prefix(shard, "risk") + requested.event_id)
    await stack.bus.publish(requested)
    await _caught_up(stack, "risk", EventType.ORDER_REQUESTED, pid)
    validated = await _stream(stack, EventType.ORDER_VALIDATED, pid)
    assert len(validated) == 1, validated
    assert await _reserved(stack, pid) == ({}, 0)
