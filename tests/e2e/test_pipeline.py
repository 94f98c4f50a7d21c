"""The four trading stages as real processes, fed at the bus: orders reach their terminal
status, fills become positions and balances, risk rejects with its codes, cancels work."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from services.core.events import Event, OrderCancelRequested
from services.core.hotstate import DEFAULT_LIMITS, PositionRecord, StateKeys, decode_balances, load
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.trading import OrderType, Side, TimeInForce, TradingState
from services.trading.orders import OrderStatus
from tests.e2e.conftest import Stack
from tests.integration.conftest import eventually

D = Decimal


async def wait_terminal(stack: Stack, refs: list[tuple[str, str]], timeout: float = 30.0) -> list:  # type: ignore[type-arg]
    records: list = []  # type: ignore[type-arg]

    async def done() -> bool:
        nonlocal records
        records = await read_orders(stack.bus, refs)
        return all(r is not None and r.is_terminal for r in records)

    await eventually(done, timeout=timeout)
    return records


async def test_orders_when_flowing_through_the_stages_fill_and_move_positions(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    await seed_portfolio(stack.bus, "pf-a", {"USDT": D("1000000")})
    await seed_portfolio(stack.bus, "pf-b", {"USDT": D("1000000"), "ETH": D("10")})
    specs = [
        OrderSpec("pf-a", "BTC/USDT", Side.BUY, D("0.01")),
        OrderSpec("pf-a", "BTC/USDT", Side.BUY, D("0.02"), OrderType.LIMIT, D("61000")),
        OrderSpec("pf-b", "ETH/USDT", Side.SELL, D("1.5")),
        OrderSpec("pf-b", "DOGE/USDT", Side.BUY, D("1")),
    ]
    ids = await inject_orders(stack.bus, specs)
    records = await wait_terminal(stack, [(s.portfolio_id, i) for s, i in zip(specs, ids, strict=True)])
    assert [r.status for r in records] == [OrderStatus.FILLED, OrderStatus.FILLED, OrderStatus.FILLED, OrderStatus.REJECTED]
    assert records[3].reject_code == "UNKNOWN_SYMBOL"
    assert records[0].venue == "paper" and records[0].fills and records[0].commission > 0
    sk = StateKeys(stack.bus.keys)
    positions: dict[str, PositionRecord] = {}

    async def applied() -> bool:
        # the order stage marks an order filled and the portfolio stage applies its fills, each
        # in its own group: a record can be filled a moment before the position moves
        nonlocal positions
        positions = {
            k.decode(): load(PositionRecord, v) for k, v in (await stack.redis.hgetall(sk.positions("pf-a"))).items()
        }
        sold = decode_balances(await stack.redis.hgetall(sk.balances("pf-b"))).get("ETH") == D("8.5")
        return "BTC/USDT" in positions and positions["BTC/USDT"].quantity == D("0.03") and sold

    await eventually(applied, timeout=20)
    assert positions["BTC/USDT"].quantity == D("0.03")
    assert positions["BTC/USDT"].fills == len(records[0].fills) + len(records[1].fills)
    balances = decode_balances(await stack.redis.hgetall(sk.balances("pf-b")))
    assert balances["ETH"] == D("8.5")
    sold = sum((f.quantity * f.price - f.commission for f in records[2].fills), D(0))
    assert balances["USDT"] == D("1000000") + sold


async def test_risk_when_rules_fail_rejects_with_their_codes(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    limits = DEFAULT_LIMITS.__class__(
        max_notional_per_order=D("10000"), max_position_per_symbol=D("1"), price_band=D("0.05"),
        max_orders_per_window=1000, window_seconds=1,
    )
    await seed_portfolio(stack.bus, "pf-r", {"USDT": D("5000")}, limits=limits)
    await seed_portfolio(stack.bus, "pf-h", {"USDT": D("5000")}, trading_state=TradingState.HALTED)
    await seed_portfolio(stack.bus, "pf-d", {"USDT": D("5000")}, trading_state=TradingState.REDUCING)
    cases = {
        "MAX_NOTIONAL": OrderSpec("pf-r", "BTC/USDT", Side.BUY, D("0.5")),
        "PRICE_BAND": OrderSpec("pf-r", "BTC/USDT", Side.BUY, D("0.01"), OrderType.LIMIT, D("70000")),
        "PRECISION": OrderSpec("pf-r", "BTC/USDT", Side.BUY, D("0.000015")),
        "INSUFFICIENT_BALANCE": OrderSpec("pf-r", "BTC/USDT", Side.BUY, D("0.1")),
        "MAX_POSITION": OrderSpec("pf-r", "SOL/USDT", Side.BUY, D("2")),
        "MIN_NOTIONAL": OrderSpec("pf-r", "SOL/USDT", Side.BUY, D("0.01")),
        "INVALID_PRICE": OrderSpec("pf-r", "SOL/USDT", Side.BUY, D("0.1"), OrderType.LIMIT, D("-1")),
        "TRADING_HALTED": OrderSpec("pf-h", "SOL/USDT", Side.BUY, D("0.1")),
        "REDUCE_ONLY": OrderSpec("pf-d", "SOL/USDT", Side.BUY, D("0.1")),
    }
    specs = list(cases.values())
    ids = await inject_orders(stack.bus, specs)
    records = await wait_terminal(stack, [(s.portfolio_id, i) for s, i in zip(specs, ids, strict=True)])
    assert {code: r.reject_code for code, r in zip(cases, records, strict=True)} == {c: c for c in cases}
    assert all(r.status is OrderStatus.REJECTED for r in records)


async def test_cancel_when_limit_rests_cancels_it_and_ioc_remainder_expires(stack: Stack) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    await seed_portfolio(stack.bus, "pf-c", {"USDT": D("1000000")})
    resting, ioc = await inject_orders(
        stack.bus,
        [
            OrderSpec("pf-c", "BTC/USDT", Side.BUY, D("0.01"), OrderType.LIMIT, D("59000")),
            OrderSpec("pf-c", "BTC/USDT", Side.BUY, D("0.01"), OrderType.LIMIT, D("59000"), TimeInForce.IOC),
        ],
    )
    (expired,) = await wait_terminal(stack, [("pf-c", ioc)])
    assert expired.status is OrderStatus.EXPIRED and expired.filled_quantity == 0

    async def routed() -> bool:
        (r,) = await read_orders(stack.bus, [("pf-c", resting)])
        return r is not None and r.status is OrderStatus.ROUTED

    await eventually(routed)
    await stack.bus.publish(
        Event.new(OrderCancelRequested(order_id=resting, client_order_id=resting), portfolio_id="pf-c", correlation_id=resting)
    )
    (canceled,) = await wait_terminal(stack, [("pf-c", resting)])
    assert canceled.status is OrderStatus.CANCELED and canceled.filled_quantity == 0


async def _set_mark(stack: Stack, symbol: str, price: str) -> None:
    from services.core.marks import Marks

    await stack.redis.hset(Marks(stack.redis, stack.bus.keys).key, symbol, price)


async def test_resting_limit_when_the_market_moves_through_it_fills_later_over_several_fills(stack: Stack) -> None:
    """A GTC limit rests at the venue; each time the market comes to its price it takes what
    the venue's best level offers, as maker at its price, until it is filled. Every later fill
    reaches the order once, the position and the balances follow, risk releases the funds."""
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    await seed_portfolio(stack.bus, "pf-rest", {"USDT": D("1000000")})
    await _set_mark(stack, "BTC/USDT", "60000")
    (oid,) = await inject_orders(stack.bus, [OrderSpec("pf-rest", "BTC/USDT", Side.BUY, D("2"), OrderType.LIMIT, D("59000"))])

    async def status_is(*wanted: OrderStatus) -> bool:
        (r,) = await read_orders(stack.bus, [("pf-rest", oid)])
        return r is not None and r.status in wanted

    await eventually(lambda: status_is(OrderStatus.ROUTED))
    fills_seen = []
    for _ in range(6):  # the best ask near 59,000 holds about 0.85 BTC: three moves fill 2 BTC
        await _set_mark(stack, "BTC/USDT", "58900")  # the ask comes to 59,000 and below
        before = len(fills_seen)

        async def filled_more() -> bool:
            nonlocal fills_seen
            (r,) = await read_orders(stack.bus, [("pf-rest", oid)])
            fills_seen = list(r.fills)
            return len(fills_seen) > before

        await eventually(filled_more, timeout=15)
        if await status_is(OrderStatus.FILLED):
            break
        assert await status_is(OrderStatus.PARTIALLY_FILLED)
        await _set_mark(stack, "BTC/USDT", "59500")  # away again: nothing fills
        await asyncio.sleep(0.8)
    (record,) = await wait_terminal(stack, [("pf-rest", oid)])
    assert record.status is OrderStatus.FILLED and record.filled_quantity == D("2")
    assert len(record.fills) >= 3, record.fills
    assert {f.price for f in record.fills} == {D("59000")} and {f.liquidity for f in record.fills} == {"maker"}
    assert len({f.fill_id for f in record.fills}) == len(record.fills)
    assert all(f.venue_fill_id and f.fill_id.endswith(f.venue_fill_id) for f in record.fills)
    sk = StateKeys(stack.bus.keys)
    cost = sum((f.quantity * f.price + f.commission for f in record.fills), D(0))

    async def settled() -> bool:
        raw = await stack.redis.hget(sk.positions("pf-rest"), "BTC/USDT")
        balances = decode_balances(await stack.redis.hgetall(sk.balances("pf-rest")))
        held = await stack.redis.hlen(sk.reservations("pf-rest"))
        resting = await stack.redis.hexists(sk.resting("pf-rest"), oid)
        return (raw is not None and load(PositionRecord, raw).quantity == D("2")
                and balances.get("USDT") == D("1000000") - cost and held == 0 and not resting)

    await eventually(settled, timeout=20)
    position = load(PositionRecord, await stack.redis.hget(sk.positions("pf-rest"), "BTC/USDT"))
    assert position.fills == len(record.fills)


async def test_resting_limit_when_canceled_after_a_partial_fill_keeps_the_fill_and_cancels_the_rest(
    stack: Stack,
) -> None:
    stack.fleet.start(["risk", "order", "routing", "portfolio"])
    await seed_portfolio(stack.bus, "pf-part", {"USDT": D("1000000")})
    await _set_mark(stack, "BTC/USDT", "60000")
    (oid,) = await inject_orders(stack.bus, [OrderSpec("pf-part", "BTC/USDT", Side.BUY, D("2"), OrderType.LIMIT, D("59000"))])

    async def status_is(*wanted: OrderStatus) -> bool:
        (r,) = await read_orders(stack.bus, [("pf-part", oid)])
        return r is not None and r.status in wanted

    await eventually(lambda: status_is(OrderStatus.ROUTED))
    await _set_mark(stack, "BTC/USDT", "58900")
    await eventually(lambda: status_is(OrderStatus.PARTIALLY_FILLED), timeout=15)
    await _set_mark(stack, "BTC/USDT", "59500")
    await asyncio.sleep(0.8)  # routing has seen the mark leave: nothing more fills
    await stack.bus.publish(
        Event.new(OrderCancelRequested(order_id=oid, client_order_id=oid), portfolio_id="pf-part", correlation_id=oid)
    )
    (record,) = await wait_terminal(stack, [("pf-part", oid)])
    assert record.status is OrderStatus.CANCELED
    assert D(0) < record.filled_quantity < D("2") and len(record.fills) == 1
    # the venue order is canceled too: the market coming back fills nothing more
    await _set_mark(stack, "BTC/USDT", "58900")
    await asyncio.sleep(1.5)
    (after,) = await read_orders(stack.bus, [("pf-part", oid)])
    assert after.fills == record.fills and after.status is OrderStatus.CANCELED
    sk = StateKeys(stack.bus.keys)

    async def settled() -> bool:
        raw = await stack.redis.hget(sk.positions("pf-part"), "BTC/USDT")
        held = await stack.redis.hlen(sk.reservations("pf-part"))
        resting = await stack.redis.hexists(sk.resting("pf-part"), oid)
        return raw is not None and load(PositionRecord, raw).quantity == record.filled_quantity and held == 0 and not resting

    await eventually(settled, timeout=20)
