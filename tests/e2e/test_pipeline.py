"""The four trading stages as real processes, fed at the bus: orders reach their terminal
status, fills become positions and balances, risk rejects with its codes, cancels work."""

from __future__ import annotations

from decimal import Decimal

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
    from services.core.events import Event, OrderCancelRequested

    await stack.bus.publish(
        Event.new(OrderCancelRequested(order_id=resting, client_order_id=resting), portfolio_id="pf-c", correlation_id=resting)
    )
    (canceled,) = await wait_terminal(stack, [("pf-c", resting)])
    assert canceled.status is OrderStatus.CANCELED and canceled.filled_quantity == 0
