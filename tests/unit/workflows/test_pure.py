"""The workflows' pure decisions: rebalance legs, risk-monitor equity, reconcile corrections."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from services.core.events import Event, EventType, OrderExecuted, OrderRejected
from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.orders import Fill, Order, OrderStatus
from services.venues.base import VenueFill, VenueOrder, VenueOrderStatus
from services.workflows.bridge import terminal_status
from services.workflows.contracts import CHILD_ORDER_PREFIX
from services.workflows.monitor import equity
from services.workflows.rebalance import Leg, plan_legs
from services.workflows.reconcile import corrections

D = Decimal
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
MARKS = {"BTC/USDT": D("60000"), "ETH/USDT": D("3000")}
STEPS = {"BTC/USDT": D("0.0001"), "ETH/USDT": D("0.001")}


def test_plan_legs_moves_to_the_weights_of_equity_sells_first_and_skips_dust() -> None:
    legs = plan_legs({"USDT": D("40000")}, {"BTC/USDT": D("1"), "ETH/USDT": D("0")}, MARKS,
                     {"BTC/USDT": D("0.5"), "ETH/USDT": D("0.25")}, "USDT", STEPS)
    # equity 100,000: BTC to 50,000 (sell 1/6 BTC), ETH to 25,000 (buy 8.333 ETH)
    assert legs == [Leg("BTC/USDT", Side.SELL, D("0.1666")), Leg("ETH/USDT", Side.BUY, D("8.333"))]
    assert plan_legs({"USDT": D("100")}, {}, MARKS, {"BTC/USDT": D("0.01")}, "USDT", STEPS) == []


def test_plan_legs_needs_a_mark_for_every_target() -> None:
    with pytest.raises(ValueError, match="no mark for SOL/USDT"):
        plan_legs({"USDT": D("1000")}, {}, MARKS, {"SOL/USDT": D("0.5")}, "USDT", STEPS)


def test_equity_values_each_balance_at_its_mark_and_ignores_unmarked_assets() -> None:
    value, gross = equity({"USDT": D("-1000"), "BTC": D("0.5"), "ETH": D("-2"), "XYZ": D("9")}, MARKS, "USDT")
    assert value == D("-1000") + D("30000") - D("6000") and gross == D("36000")


def _record(status: OrderStatus, fills: tuple[Fill, ...] = ()) -> Order:
    return Order(
        order_id="o-1", client_order_id="c-1", portfolio_id="p-1", correlation_id="o-1", symbol="BTC/USDT",
        side=Side.BUY, order_type=OrderType.MARKET, quantity=D("0.02"), price=None, time_in_force=TimeInForce.IOC,
        requested_venue=None, created_at=NOW, updated_at=NOW, status=status, fills=fills,
    )


def _venue(status: VenueOrderStatus, *quantities: str) -> VenueOrder:
    fills = tuple(VenueFill(fill_id=f"f{i}", venue_order_id="v-1", quantity=D(q), price=D("60000"), fee=D("1"),
                            fee_asset="USDT", liquidity=Liquidity.TAKER, at=NOW) for i, q in enumerate(quantities))
    filled = sum((f.quantity for f in fills), D(0))
    return VenueOrder(
        venue="sim", venue_order_id="v-1", client_order_id="o-1", symbol="BTC/USDT", side=Side.BUY,
        order_type=OrderType.MARKET, time_in_force=TimeInForce.IOC, quantity=D("0.02"), price=None, status=status,
        filled_quantity=filled, average_price=D("60000") if fills else None, fees=D(len(fills)), fee_asset="USDT",
        fills=fills, created_at=NOW, updated_at=NOW,
    )


def test_corrections_add_the_fills_the_store_lacks_and_expire_the_rest() -> None:
    out = corrections(_record(OrderStatus.CREATED), _venue(VenueOrderStatus.EXPIRED, "0.005", "0.005"))
    assert [e.event_type for e in out] == [EventType.ORDER_EXECUTED] * 2 + [EventType.ORDER_CANCELED]
    assert [e.payload.fill_id for e in out[:2]] == ["o-1:sim:f0", "o-1:sim:f1"]
    assert [e.payload.venue_fill_id for e in out[:2]] == ["f0", "f1"]
    assert out[1].payload.cumulative_quantity == D("0.01") and out[2].payload.canceled_quantity == D("0.01")
    again = corrections(_record(OrderStatus.CREATED), _venue(VenueOrderStatus.EXPIRED, "0.005", "0.005"))
    assert [e.event_id for e in again] == [e.event_id for e in out]  # a second run: the same ids


def test_corrections_skip_fills_already_recorded_and_fail_orders_no_venue_knows() -> None:
    recorded = Fill(fill_id="o-1:sim:f0", quantity=D("0.02"), price=D("60000"), commission=D("1"),
                    commission_asset="USDT", liquidity="taker", venue="sim", at=NOW, venue_fill_id="f0")
    assert corrections(_record(OrderStatus.FILLED, (recorded,)), _venue(VenueOrderStatus.FILLED, "0.02")) == []
    (failed,) = corrections(_record(OrderStatus.ROUTED), None)
    assert failed.event_type is EventType.ORDER_FAILED and failed.payload.reason_code == "NOT_AT_VENUE"
    assert corrections(_record(OrderStatus.CREATED), None) == []  # routing may still send it


def _fill(client_order_id: str, leaves: str) -> Event[Any]:
    return Event.new(OrderExecuted(
        order_id="o1", client_order_id=client_order_id, symbol="BTC/USDT", side=Side.BUY, venue="paper",
        venue_order_id="v1", fill_id="f1", quantity=Decimal("1"), price=Decimal("100"), commission=Decimal("0"),
        commission_asset="USDT", liquidity=Liquidity.TAKER, cumulative_quantity=Decimal("1"),
        leaves_quantity=Decimal(leaves),
    ), portfolio_id="pf")


def test_bridge_tells_hatchet_only_of_rebalance_children_that_ended() -> None:
    child = f"{CHILD_ORDER_PREFIX}run-1-0"
    assert terminal_status(_fill(child, "0")) == "filled"
    assert terminal_status(_fill(child, "0.5")) is None  # partly filled: still open
    rejected = Event.new(OrderRejected(order_id="o2", client_order_id=child, reason_code="LIMIT", reason="x", stage="risk"),
                         portfolio_id="pf")
    assert terminal_status(rejected) == "rejected"
    # any other order, however it ends, is none of Hatchet's business
    assert terminal_status(_fill("client-abc", "0")) is None
    assert terminal_status(Event.new(OrderRejected(order_id="o3", client_order_id="client-abc", reason_code="LIMIT",
                                                   reason="x", stage="risk"), portfolio_id="pf")) is None
