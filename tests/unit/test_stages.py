"""The stages' decisions, without Redis: each stage's apply step is a function of the event,
the state it loaded, and a ``Commit`` that collects what it emits and writes."""

from __future__ import annotations

import uuid

import datetime as dt
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from services.core.bus import Commit, PermanentError, Unavailable
from services.core.events import (
    Event,
    EventType,
    ExchangeRouted,
    OrderCanceled,
    OrderCancelRequested,
    OrderCreated,
    OrderExecuted,
    OrderRejected,
    OrderRequested,
    OrderValidated,
)
from services.core.hotstate import (
    DEFAULT_LIMITS,
    PortfolioRecord,
    PositionRecord,
    StateKeys,
    new_order_id,
    requested_order,
    shard_of_order_id,
)
from services.core.keys import Keys
from services.order.stage import EXPIRED_REASON, OrderStage, rebuild_order
from services.portfolio.stage import PortfolioStage, _State, apply_fill_to_balances
from services.replay.ledger import compare, rebuild
from services.risk.stage import PortfolioState, RiskStage
from services.trading import Liquidity, OrderType, Side, TimeInForce, TradingState
from services.trading.catalogue import combine_markets
from services.trading.orders import Order, OrderStatus
from services.venues.paper import DEFAULT_MARKETS

D = Decimal
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
KEYS = Keys("u", 4)
SK = StateKeys(KEYS)
CATALOGUE = combine_markets({"paper": DEFAULT_MARKETS})


def commit_for(pid: str) -> Commit:
    return Commit(KEYS, KEYS.shard_of(pid))


def record(status: OrderStatus = OrderStatus.REQUESTED, **kw: Any) -> Order:
    values: dict[str, Any] = dict(
        order_id="o-1", client_order_id="c-1", portfolio_id="pf", correlation_id="o-1", symbol="BTC/USDT",
        side=Side.BUY, order_type=OrderType.MARKET, quantity=D("2"), status=status, created_at=NOW, updated_at=NOW,
    )
    values.update(kw)
    return Order(**values)


def executed(fill: int, qty: str, leaves: str, cumulative: str) -> Event[Any]:
    return Event.new(
        OrderExecuted(
            order_id="o-1", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY, venue="paper",
            venue_order_id="v-1", fill_id=f"o-1:{fill}", quantity=D(qty), price=D("100"), commission=D("0.1"),
            commission_asset="USDT", liquidity=Liquidity.TAKER, cumulative_quantity=D(cumulative),
            leaves_quantity=D(leaves),
        ),
        portfolio_id="pf",
    )


def validated() -> Event[Any]:
    return Event.new(
        OrderValidated(
            order_id="o-1", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.MARKET,
            quantity=D("2"),
        ),
        portfolio_id="pf",
    )


def test_order_id_when_made_for_a_shard_names_that_shard() -> None:
    for shard in (0, 3, 4095):
        assert shard_of_order_id(new_order_id(shard)) == shard
    assert shard_of_order_id("not-an-order-id") is None


def test_order_ids_when_made_within_one_millisecond_sort_in_the_order_they_were_made() -> None:
    ids = [new_order_id(1) for _ in range(5000)]  # many share a millisecond; more than 4,096 may
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_order_stage_when_validated_creates_the_order_and_emits_order_created() -> None:
    stage = OrderStage(None, SK, clock=lambda: NOW)
    commit = commit_for("pf")
    after = stage.apply(validated(), record(), commit)
    assert after.status is OrderStatus.CREATED
    assert [e.event_type for e in commit.outputs] == [EventType.ORDER_CREATED]
    again = commit_for("pf")
    assert stage.apply(validated(), after, again) is after and not again.outputs  # a repeat changes nothing


def test_order_stage_when_validated_carries_the_terms_and_the_price_cap_into_order_created() -> None:
    terms: dict[str, Any] = dict(
        order_id="o-1", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.LIMIT,
        quantity=D("2"), price=D("100"), time_in_force=TimeInForce.IOC, venue="paper",
    )
    commit = commit_for("pf")
    ok = Event.new(OrderValidated(**terms, reference_price=D("99"), price_cap=D("101")), portfolio_id="pf")
    OrderStage(None, SK, clock=lambda: NOW).apply(ok, record(), commit)
    assert [e.payload for e in commit.outputs] == [OrderCreated(**terms, price_cap=D("101"))]


def test_order_stage_when_a_venue_fill_comes_again_under_another_fill_id_drops_it() -> None:
    stage = OrderStage(None, SK, clock=lambda: NOW)
    first = executed(1, "0.5", "1.5", "0.5")
    first = msgspec.structs.replace(first, payload=msgspec.structs.replace(first.payload, venue_fill_id="x-9"))
    again = msgspec.structs.replace(first, payload=msgspec.structs.replace(first.payload, fill_id="o-1:paper:x-9"))
    once = stage.apply(first, record(OrderStatus.ROUTED), commit_for("pf"))
    assert once.filled_quantity == D("0.5")
    assert stage.apply(again, once, commit_for("pf")) is once


def test_order_stage_when_fill_overtakes_routing_ack_fills_and_ignores_the_late_ack() -> None:
    stage = OrderStage(None, SK, clock=lambda: NOW)
    created = record(OrderStatus.CREATED)
    partly = stage.apply(executed(1, "0.5", "1.5", "0.5"), created, commit_for("pf"))
    assert partly.status is OrderStatus.PARTIALLY_FILLED and partly.venue == "paper"
    full = stage.apply(executed(2, "1.5", "0", "2"), partly, commit_for("pf"))
    assert full.status is OrderStatus.FILLED and full.filled_quantity == D("2") and full.commission == D("0.2")
    assert stage.apply(executed(2, "1.5", "0", "2"), full, commit_for("pf")) is full  # same fill again
    ack = Event.new(ExchangeRouted(order_id="o-1", venue="paper", expected_price=None, fee_rate=D("0"), reason="x"), portfolio_id="pf")
    assert stage.apply(ack, full, commit_for("pf")) is full
    with pytest.raises(PermanentError):  # a new fill on a finished order is for an operator
        stage.apply(executed(3, "0.1", "0", "2.1"), full, commit_for("pf"))


def test_order_stage_when_expiry_overtakes_routing_ack_expires_the_order() -> None:
    stage = OrderStage(None, SK, clock=lambda: NOW)
    canceled = Event.new(
        OrderCanceled(order_id="o-1", client_order_id="c-1", reason=EXPIRED_REASON, filled_quantity=D(0), canceled_quantity=D(2)),
        portfolio_id="pf",
    )
    assert stage.apply(canceled, record(OrderStatus.CREATED), commit_for("pf")).status is OrderStatus.EXPIRED


def test_order_stage_when_rejected_keeps_the_code_even_for_an_invalid_request() -> None:
    stage = OrderStage(None, SK, clock=lambda: NOW)
    rejected = Event.new(
        OrderRejected(order_id="o-1", client_order_id="c-1", reason_code="INVALID_PRICE", reason="bad", stage="risk"),
        portfolio_id="pf",
    )
    after = stage.apply(rejected, record(price=D("-1"), order_type=OrderType.LIMIT), commit_for("pf"))
    assert (after.status, after.reject_code) == (OrderStatus.REJECTED, "INVALID_PRICE")


def request(qty: str = "0.1", side: Side = Side.BUY, order_id: str = "o-1") -> Event[Any]:
    return Event.new(
        OrderRequested(order_id=order_id, client_order_id=order_id, symbol="BTC/USDT", side=side, order_type=OrderType.MARKET, quantity=D(qty)),
        portfolio_id="pf",
    )


def portfolio_state(usdt: str, trading_state: TradingState = TradingState.ACTIVE) -> PortfolioState:
    return PortfolioState(
        portfolio=PortfolioRecord(portfolio_id="pf", trading_state=trading_state, created_at=NOW, updated_at=NOW),
        balances={"USDT": D(usdt)},
        positions={},
    )


def position_updated(order_id: str, fill_quantity: str) -> Event[Any]:
    from services.core.events import PositionUpdated

    return Event.new(
        PositionUpdated(
            symbol="BTC/USDT", quantity=D(fill_quantity), average_price=D("60000"), realized_pnl=D(0),
            order_id=order_id, fill_id=f"{order_id}:1", sequence=1, fill_quantity=D(fill_quantity),
        ),
        portfolio_id="pf",
    )


def test_risk_stage_when_orders_approved_holds_funds_until_the_portfolio_applied_their_fills() -> None:
    stage = RiskStage(None, SK, None, None, clock=lambda: NOW, market_slippage=D("0"))  # type: ignore[arg-type]
    state = portfolio_state("7000")
    marks = {"BTC/USDT": D("60000")}
    first, second = commit_for("pf"), commit_for("pf")
    stage.assess(request(order_id="o-1"), state, marks, CATALOGUE, first)  # 6006 with the fee allowance
    stage.assess(request(order_id="o-2"), state, marks, CATALOGUE, second)
    assert first.outputs[0].event_type is EventType.ORDER_VALIDATED
    assert second.outputs[0].payload.reason_code == "INSUFFICIENT_BALANCE"
    assert state.reserved["USDT"] == D("6006.0")
    assert first.writes[0][:3] == ("HSET", SK.reservations("pf"), "o-1")
    half = commit_for("pf")
    stage.release(position_updated("o-1", "0.05"), state, half)  # half applied: half still held
    assert state.reserved["USDT"] == D("3003.0") and half.writes[0][:3] == ("HSET", SK.reservations("pf"), "o-1")
    released = commit_for("pf")
    stage.release(position_updated("o-1", "0.05"), state, released)  # all applied: the hold goes
    assert released.writes == [("HDEL", SK.reservations("pf"), "o-1")]
    third = commit_for("pf")
    stage.assess(request(order_id="o-3"), state, marks, CATALOGUE, third)
    assert third.outputs[0].event_type is EventType.ORDER_VALIDATED
    assert {k for k, v in state.open.items() if v} == {"o-3"}
    assert state.record().reserved == {"USDT": D("6006.0")} and len(state.record().recent) == 2


def test_risk_stage_when_market_buy_approved_caps_its_price_where_it_held_funds() -> None:
    stage = RiskStage(None, SK, None, None, clock=lambda: NOW, market_slippage=D("0.01"))  # type: ignore[arg-type]
    state = portfolio_state("7000")
    commit = commit_for("pf")
    stage.assess(request(order_id="o-1"), state, {"BTC/USDT": D("60000")}, CATALOGUE, commit)
    assert commit.outputs[0].payload.price_cap == D("60600")
    assert state.reserved["USDT"] == D("0.1") * D("60600") * D("1.001")


def test_risk_stage_when_portfolio_halted_rejects() -> None:
    stage = RiskStage(None, SK, None, None, clock=lambda: NOW)  # type: ignore[arg-type]
    commit = commit_for("pf")
    stage.assess(request(), portfolio_state("1000000", TradingState.HALTED), {"BTC/USDT": D("60000")}, CATALOGUE, commit)
    assert commit.outputs[0].payload.reason_code == "TRADING_HALTED"
    assert DEFAULT_LIMITS.to_limits().max_orders_per_window > 0


def test_risk_stage_when_catalogue_does_not_list_the_symbol_rejects_unknown_symbol() -> None:
    stage = RiskStage(None, SK, None, None, clock=lambda: NOW)  # type: ignore[arg-type]
    commit = commit_for("pf")
    only_eth = combine_markets({"paper": {"ETH/USDT": DEFAULT_MARKETS["ETH/USDT"]}})
    stage.assess(request(), portfolio_state("1000000"), {"BTC/USDT": D("60000")}, only_eth, commit)
    assert commit.outputs[0].payload.reason_code == "UNKNOWN_SYMBOL"


class _NoCatalogue:
    async def current(self) -> None:
        return None


async def test_risk_stage_when_no_catalogue_yet_holds_requests_as_unavailable_and_decides_nothing() -> None:
    stage = RiskStage(None, SK, None, _NoCatalogue(), clock=lambda: NOW)  # type: ignore[arg-type]
    commit = commit_for("pf")
    with pytest.raises(Unavailable):
        await stage.handle([(request(), commit)])
    assert not commit.outputs and not commit.writes


def test_portfolio_stage_when_fills_applied_moves_position_and_balances() -> None:
    stage = PortfolioStage(None, SK, clock=lambda: NOW)
    state = _State(trading_state=TradingState.ACTIVE, balances={"USDT": D("1000")}, positions={}, applied=set())
    commit = commit_for("pf")
    stage.apply(executed(1, "2", "0", "2"), state, commit)
    assert state.positions["BTC/USDT"].quantity == D("2") and state.positions["BTC/USDT"].fills == 1
    assert state.balances == {"USDT": D("799.9"), "BTC": D("2")}
    update = commit.outputs[0].payload
    assert (update.sequence, update.average_price, update.realized_pnl) == (1, D("100"), D("-0.1"))


def test_balances_when_sell_filled_receive_quote_less_fee() -> None:
    sell = executed(1, "1", "0", "1").payload
    sold = OrderExecuted(**{**{f: getattr(sell, f) for f in sell.__struct_fields__}, "side": Side.SELL})
    assert apply_fill_to_balances({"BTC": D("1")}, sold) == {"BTC": D("0"), "USDT": D("99.9")}


def test_ledger_when_fills_replayed_in_sequence_equals_the_live_fold() -> None:
    fills = [("pf", executed(i, "1", "0", "1").payload) for i in (1, 2)]
    updates = []
    for seq, (_, f) in enumerate(fills, start=1):
        from services.core.events import PositionUpdated

        updates.append(("pf", PositionUpdated(symbol="BTC/USDT", quantity=D(seq), average_price=D("100"), realized_pnl=D(0), fill_id=f.fill_id, sequence=seq)))
    rebuilt = rebuild(fills + fills, updates)  # duplicates are harmless
    assert not rebuilt.problems and rebuilt.fills == 2
    live = {("pf", "BTC/USDT"): PositionRecord(symbol="BTC/USDT", quantity=D("2"), cost_basis=D("200"), realized_pnl=D("-0.2"), fills=2)}
    assert compare(rebuilt.positions, live) == []
    wrong = {("pf", "BTC/USDT"): PositionRecord(symbol="BTC/USDT", quantity=D("3"), cost_basis=D("200"), realized_pnl=D("-0.2"), fills=2)}
    assert compare(rebuilt.positions, wrong) == ["pf BTC/USDT: quantity replayed 2 != live 3"]
    unapplied = rebuild(fills, updates[:1])
    assert any("never applied" in p for p in unapplied.problems)


def test_rebuild_order_when_folded_from_stored_events_equals_what_the_stage_kept() -> None:
    live, requested = requested_order(
        order_id="o-1", portfolio_id="pf", client_order_id="c-1", symbol="BTC/USDT", side=Side.BUY,
        order_type=OrderType.MARKET, quantity=D("2"), price=None, time_in_force=TimeInForce.GTC, venue=None, at=NOW,
        requested_by="k-1",
    )
    later = [validated(), executed(1, "0.5", "1.5", "0.5"), executed(2, "1.5", "0", "2")]
    stage = OrderStage(None, SK, clock=lambda: NOW)
    for event in later:
        live = stage.apply(event, live, commit_for("pf"))
    assert live.status is OrderStatus.FILLED
    cancel = Event.new(OrderCancelRequested(order_id="o-1", client_order_id="c-1", requested_by="k-1"), portfolio_id="pf")
    # stored order: a repeat and events the order stage does not handle change nothing
    rebuilt = rebuild_order([requested, later[0], later[1], later[1], cancel, later[2]])
    assert rebuilt is not None
    assert rebuilt.updated_at == later[2].occurred_at  # the time of its last event
    assert rebuilt == msgspec.structs.replace(live, updated_at=rebuilt.updated_at, body_hash="")
    assert rebuild_order(later) is None  # no request stored: not an order it can rebuild
