"""``orders.reconcile``'s pure decisions: venue fills matched on the venue's own fill id, never
counted twice; an order resting with routing, or at an in-process venue, never taken for lost."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

import msgspec

from services.core.events import EventType, OrderExecuted
from services.core.hotstate import RestingOrder
from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.orders import Fill, Order, OrderStatus
from services.venues.base import Venue, VenueFill, VenueOrder, VenueOrderStatus, platform_fill_id
from services.venues.ccxt import CcxtVenue, CcxtVenueConfig, close_shared_clients
from services.venues.paper import PaperVenue
from services.workflows.reconcile import corrections, venues_to_ask

D = Decimal
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
QTY = D("0.02")


def fill_at_venue(venue_fill_id: str, quantity: str, *, aggregate: bool = False) -> VenueFill:
    return VenueFill(fill_id=venue_fill_id, venue_order_id="v-1", quantity=D(quantity), price=D("60000"),
                     fee=D(quantity) * 60, fee_asset="USDT", liquidity=Liquidity.TAKER, at=NOW, aggregate=aggregate)


def at_venue(status: VenueOrderStatus, *fills: VenueFill) -> VenueOrder:
    filled = sum((f.quantity for f in fills), D(0))
    return VenueOrder(
        venue="sim", venue_order_id="v-1", client_order_id="o-1", symbol="BTC/USDT", side=Side.BUY,
        order_type=OrderType.LIMIT, time_in_force=TimeInForce.IOC, quantity=QTY, price=D("60000"), status=status,
        filled_quantity=filled, average_price=D("60000") if fills else None, fees=sum((f.fee for f in fills), D(0)),
        fee_asset="USDT", fills=fills, created_at=NOW, updated_at=NOW,
    )


def stored(fill_id: str, quantity: str, venue_fill_id: str | None) -> Fill:
    return Fill(fill_id=fill_id, quantity=D(quantity), price=D("60000"), commission=D(quantity) * 60,
                commission_asset="USDT", liquidity="taker", venue="sim", at=NOW, venue_fill_id=venue_fill_id)


def routed(fill: VenueFill) -> Fill:
    """A venue fill as routing reports it and the order stage stores it."""
    return stored(platform_fill_id("o-1", "sim", fill.fill_id), str(fill.quantity), fill.fill_id)


def record(status: OrderStatus, *fills: Fill, venue: str | None = "sim") -> Order:
    filled = sum((f.quantity for f in fills), D(0))
    return Order(
        order_id="o-1", client_order_id="c-1", portfolio_id="p-1", correlation_id="o-1", symbol="BTC/USDT",
        side=Side.BUY, order_type=OrderType.LIMIT, quantity=QTY, price=D("60000"), time_in_force=TimeInForce.GTC,
        requested_venue=None, created_at=NOW, updated_at=NOW, status=status, fills=fills, venue=venue,
        filled_quantity=filled,
    )


def applied(r: Order, event_payload: OrderExecuted) -> Order:
    """The record after the order stage took a correction (just what matching looks at)."""
    p = event_payload
    fill = stored(p.fill_id, str(p.quantity), p.venue_fill_id)
    return msgspec.structs.replace(r, fills=(*r.fills, fill), filled_quantity=r.filled_quantity + p.quantity,
                                   status=OrderStatus.PARTIALLY_FILLED)


RESTING = RestingOrder(order_id="o-1", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY, price=D("60000"),
                       quantity=QTY, filled_quantity=D("0.005"), venue="sim", venue_order_id="v-1", fills=1, since=NOW)


def test_a_partially_filled_order_resting_with_routing_gets_no_correction() -> None:
    f0 = fill_at_venue("sim-7", "0.005")
    # the venue finished the IOC leg; routing holds the rest
    assert corrections(record(OrderStatus.PARTIALLY_FILLED, routed(f0)), at_venue(VenueOrderStatus.EXPIRED, f0),
                       resting=RESTING) == []


def test_a_fill_the_store_missed_gives_exactly_one_correction_and_a_second_run_none() -> None:
    f0, f1 = fill_at_venue("sim-7", "0.005"), fill_at_venue("sim-8", "0.005")
    venue = at_venue(VenueOrderStatus.EXPIRED, f0, f1)
    before = record(OrderStatus.PARTIALLY_FILLED, routed(f0))
    (missed,) = corrections(before, venue, resting=RESTING)
    assert missed.event_type is EventType.ORDER_EXECUTED
    # named as routing names that venue fill: whoever reports it second is dropped
    assert missed.payload.fill_id == routed(f1).fill_id == "o-1:sim:sim-8"
    assert missed.payload.venue_fill_id == "sim-8" and missed.payload.cumulative_quantity == D("0.01")
    assert [e.event_id for e in corrections(before, venue, resting=RESTING)] == [missed.event_id]
    assert corrections(applied(before, missed.payload), venue, resting=RESTING) == []


def test_a_fill_recorded_before_fills_carried_the_venue_id_is_not_added_again() -> None:
    f0, f1 = fill_at_venue("sim-7", "0.005"), fill_at_venue("sim-8", "0.005")
    # routing used to name the n-th fill of the submit's answer <order id>:<n>
    old = record(OrderStatus.PARTIALLY_FILLED, stored("o-1:1", "0.005", None))
    out = corrections(old, at_venue(VenueOrderStatus.PARTIALLY_FILLED, f0, f1))
    assert [e.payload.venue_fill_id for e in out] == ["sim-8"]
    # and reconcile used to name its own <order id>:v:<venue fill id>
    older = record(OrderStatus.PARTIALLY_FILLED, stored("o-1:v:sim-7", "0.005", None))
    assert [e.payload.venue_fill_id for e in corrections(older, at_venue(VenueOrderStatus.OPEN, f0, f1))] == ["sim-8"]


def test_an_aggregate_venue_fill_adds_only_the_quantity_the_record_lacks_at_that_venue() -> None:
    f0 = fill_at_venue("sim-7", "0.005")
    total = fill_at_venue("sim-v-1-upto-0.015", "0.015", aggregate=True)
    (added,) = corrections(record(OrderStatus.PARTIALLY_FILLED, routed(f0)),
                           at_venue(VenueOrderStatus.PARTIALLY_FILLED, total))
    assert added.payload.quantity == D("0.01") and added.payload.commission == D("0.6")
    assert corrections(record(OrderStatus.PARTIALLY_FILLED, routed(f0), routed(dataclasses.replace(
        total, quantity=D("0.01")))), at_venue(VenueOrderStatus.PARTIALLY_FILLED, total)) == []


def test_an_order_no_venue_knows_is_failed_only_when_routing_does_not_hold_it_resting() -> None:
    assert corrections(record(OrderStatus.ROUTED), None, resting=RESTING) == []
    (failed,) = corrections(record(OrderStatus.ROUTED), None)
    assert failed.payload.reason_code == "NOT_AT_VENUE"


async def test_an_in_process_venue_is_never_asked_and_not_finding_an_order_proves_nothing() -> None:
    paper = PaperVenue("paper")
    sim = CcxtVenue(CcxtVenueConfig(name="sim", api_key="k", secret="s", api_url="http://127.0.0.1:9"))
    try:
        venues: list[Venue] = [paper, sim]
        # routed to paper: the worker's paper venue is not routing's
        assert venues_to_ask(record(OrderStatus.ROUTED, venue="paper"), venues) == ([], False)
        assert venues_to_ask(record(OrderStatus.ROUTED, venue="sim"), venues) == ([sim], True)
        # not routed yet: it may be at either; only the shared one can be asked
        assert venues_to_ask(record(OrderStatus.UNKNOWN, venue=None), venues) == ([sim], False)
        assert venues_to_ask(record(OrderStatus.UNKNOWN, venue=None), [sim]) == ([sim], True)
        # a venue this process does not trade on
        assert venues_to_ask(record(OrderStatus.ROUTED, venue="elsewhere"), venues) == ([], False)
    finally:
        await close_shared_clients()
