"""Pre-trade risk: one test per reason code, the rule order, and what passes."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.events import OrderRequested
from services.trading import Instrument, OrderType, Side, TradingState
from services.trading.risk import (
    RejectReason,
    RiskDecision,
    RiskLimits,
    check_order,
)

D = Decimal
NOW = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
R = RejectReason

BTC = Instrument(
    symbol="BTC/USDT",
    base="BTC",
    quote="USDT",
    quantity_step=D("0.001"),
    price_step=D("0.01"),
    min_quantity=D("0.001"),
    max_quantity=D("100"),
    min_notional=D("10"),
)
LIMITS = RiskLimits(
    max_notional_per_order=D("100000"),
    max_position_per_symbol=D("5"),
    price_band=D("0.05"),
    max_orders_per_window=3,
    window_seconds=10,
)


def request(**overrides: Any) -> OrderRequested:
    values: dict[str, Any] = dict(
        order_id="o1",
        client_order_id="c1",
        symbol="BTC/USDT",
        side=Side.BUY,
        order_type=OrderType.LIMIT,
        quantity=D("0.5"),
        price=D("50000"),
    )
    values.update(overrides)
    return OrderRequested(**values)


def check(req: OrderRequested | None = None, **overrides: Any) -> RiskDecision:
    kwargs: dict[str, Any] = dict(
        instrument=BTC,
        limits=LIMITS,
        position_quantity=D("0"),
        balances={"USDT": D("1000000"), "BTC": D("10")},
        reference_price=D("50000"),
        trading_state=TradingState.ACTIVE,
        recent_order_times=[],
        now=NOW,
    )
    kwargs.update(overrides)
    return check_order(req or request(), **kwargs)


def assert_rejected(decision: RiskDecision, reason: RejectReason) -> None:
    assert not decision.approved
    assert decision.reason == reason, decision.message
    assert decision.message


class TestApproves:
    def test_check_order_when_limit_buy_within_limits_approves_with_notional(self) -> None:
        decision = check()
        assert decision == RiskDecision(True, None, "approved", D("25000.0"), D("50000"))

    def test_check_order_when_market_buy_needs_the_slippage_allowance_on_top_of_the_reference(self) -> None:
        market = request(order_type=OrderType.MARKET, price=None, quantity=D("1"))
        # 50000 at the reference, 50500 with 1% slippage, plus a 0.1% fee: 50550.5
        enough = check(market, balances={"USDT": D("50550.5")}, slippage=D("0.01"), fee_rate=D("0.001"))
        assert enough.approved and enough.worst_price == D("50500")
        short = check(market, balances={"USDT": D("50550.49")}, slippage=D("0.01"), fee_rate=D("0.001"))
        assert_rejected(short, RejectReason.INSUFFICIENT_BALANCE)
        # without the allowance the reference price alone would have been enough
        assert check(market, balances={"USDT": D("50050")}, fee_rate=D("0.001")).approved

    def test_check_order_when_market_sell_uses_reference_price_for_notional(self) -> None:
        decision = check(request(side=Side.SELL, order_type=OrderType.MARKET, price=None))
        assert decision.approved
        assert decision.notional == D("25000.0")

    def test_check_order_when_reducing_and_order_shrinks_long_approves(self) -> None:
        decision = check(request(side=Side.SELL), position_quantity=D("2"), trading_state=TradingState.REDUCING)
        assert decision.approved

    def test_check_order_when_reducing_and_order_closes_exactly_approves(self) -> None:
        decision = check(
            request(side=Side.BUY, quantity=D("2")), position_quantity=D("-2"), trading_state=TradingState.REDUCING
        )
        assert decision.approved

    def test_check_order_when_position_over_limit_and_order_shrinks_it_approves(self) -> None:
        assert check(request(side=Side.SELL), position_quantity=D("7")).approved

    def test_check_order_when_earlier_orders_left_the_window_approves(self) -> None:
        old = [NOW - dt.timedelta(seconds=10)] * 5
        assert check(recent_order_times=old).approved

    def test_check_order_when_price_on_band_edge_approves(self) -> None:
        assert check(request(price=D("52500"))).approved
        assert check(request(price=D("47500"))).approved


class TestRejectsOnePerReason:
    def test_check_order_when_no_instrument_rejects_unknown_symbol(self) -> None:
        assert_rejected(check(instrument=None), R.UNKNOWN_SYMBOL)

    def test_check_order_when_symbol_differs_from_instrument_rejects_unknown_symbol(self) -> None:
        assert_rejected(check(request(symbol="DOGE/USDT")), R.UNKNOWN_SYMBOL)

    @pytest.mark.parametrize("quantity", ["0", "-1", "NaN", "Infinity", "0.0005", "101"])
    def test_check_order_when_quantity_bad_or_out_of_bounds_rejects_invalid_quantity(self, quantity: str) -> None:
        assert_rejected(check(request(quantity=D(quantity))), R.INVALID_QUANTITY)

    @pytest.mark.parametrize("price", [None, D("0"), D("-5"), D("NaN")])
    def test_check_order_when_limit_price_missing_or_not_positive_rejects_invalid_price(
        self, price: Decimal | None
    ) -> None:
        assert_rejected(check(request(price=price)), R.INVALID_PRICE)

    def test_check_order_when_market_order_has_price_rejects_invalid_price(self) -> None:
        assert_rejected(check(request(order_type=OrderType.MARKET)), R.INVALID_PRICE)

    def test_check_order_when_quantity_off_step_rejects_precision(self) -> None:
        assert_rejected(check(request(quantity=D("0.5005"))), R.PRECISION)

    def test_check_order_when_price_off_tick_rejects_precision(self) -> None:
        assert_rejected(check(request(price=D("50000.005"))), R.PRECISION)

    def test_check_order_when_halted_rejects_trading_halted(self) -> None:
        assert_rejected(check(trading_state=TradingState.HALTED), R.TRADING_HALTED)

    @pytest.mark.parametrize(
        "side,quantity,position",
        [
            (Side.BUY, "0.5", "2"),  # grows a long
            (Side.SELL, "3", "2"),  # crosses zero
            (Side.SELL, "0.5", "0"),  # opens from flat
            (Side.SELL, "0.5", "-1"),  # grows a short
        ],
    )
    def test_check_order_when_reducing_and_order_does_not_shrink_rejects_reduce_only(
        self, side: Side, quantity: str, position: str
    ) -> None:
        decision = check(
            request(side=side, quantity=D(quantity)),
            position_quantity=D(position),
            trading_state=TradingState.REDUCING,
        )
        assert_rejected(decision, R.REDUCE_ONLY)

    def test_check_order_when_no_reference_price_rejects_no_reference_price(self) -> None:
        assert_rejected(check(reference_price=None), R.NO_REFERENCE_PRICE)

    @pytest.mark.parametrize("price", ["52500.01", "47499.99"])
    def test_check_order_when_price_outside_band_rejects_price_band(self, price: str) -> None:
        assert_rejected(check(request(price=D(price))), R.PRICE_BAND)

    def test_check_order_when_notional_below_minimum_rejects_min_notional(self) -> None:
        decision = check(request(quantity=D("0.001"), price=D("9000")), reference_price=D("9000"))
        assert_rejected(decision, R.MIN_NOTIONAL)
        assert decision.notional == D("9.000")

    def test_check_order_when_notional_above_limit_rejects_max_notional(self) -> None:
        decision = check(request(quantity=D("2.001")))
        assert_rejected(decision, R.MAX_NOTIONAL)
        assert decision.notional == D("100050.000")

    def test_check_order_when_position_would_exceed_limit_rejects_max_position(self) -> None:
        assert_rejected(check(request(quantity=D("1")), position_quantity=D("4.5")), R.MAX_POSITION)

    def test_check_order_when_short_would_exceed_limit_rejects_max_position(self) -> None:
        assert_rejected(check(request(side=Side.SELL, quantity=D("1")), position_quantity=D("-4.5")), R.MAX_POSITION)

    def test_check_order_when_window_is_full_rejects_order_rate(self) -> None:
        recent = [NOW - dt.timedelta(seconds=s) for s in (0, 3, 9)]
        assert_rejected(check(recent_order_times=recent), R.ORDER_RATE)

    def test_check_order_when_quote_short_for_buy_rejects_insufficient_balance(self) -> None:
        assert_rejected(check(balances={"USDT": D("24999.99")}), R.INSUFFICIENT_BALANCE)

    def test_check_order_when_quote_covers_notional_but_not_fee_rejects_insufficient_balance(self) -> None:
        decision = check(balances={"USDT": D("25000")}, fee_rate=D("0.001"))
        assert_rejected(decision, R.INSUFFICIENT_BALANCE)
        assert check(balances={"USDT": D("25025")}, fee_rate=D("0.001")).approved

    def test_check_order_when_base_short_for_sell_rejects_insufficient_balance(self) -> None:
        assert_rejected(check(request(side=Side.SELL), balances={"BTC": D("0.499")}), R.INSUFFICIENT_BALANCE)

    def test_check_order_when_market_buy_checks_balance_at_reference_price(self) -> None:
        market = request(order_type=OrderType.MARKET, price=None)
        assert_rejected(check(market, balances={"USDT": D("100")}), R.INSUFFICIENT_BALANCE)

    def test_reject_reasons_when_listed_each_has_a_test_above(self) -> None:
        tested = {
            R.UNKNOWN_SYMBOL, R.INVALID_QUANTITY, R.INVALID_PRICE, R.PRECISION, R.TRADING_HALTED,
            R.REDUCE_ONLY, R.NO_REFERENCE_PRICE, R.PRICE_BAND, R.MIN_NOTIONAL, R.MAX_NOTIONAL,
            R.MAX_POSITION, R.ORDER_RATE, R.INSUFFICIENT_BALANCE,
        }
        assert tested == set(R)


class TestRuleOrder:
    def test_check_order_when_halted_and_malformed_reports_the_malformed_request(self) -> None:
        assert_rejected(check(request(quantity=D("0")), trading_state=TradingState.HALTED), R.INVALID_QUANTITY)

    def test_check_order_when_halted_and_no_reference_reports_halted(self) -> None:
        assert_rejected(check(trading_state=TradingState.HALTED, reference_price=None), R.TRADING_HALTED)

    def test_check_order_when_over_notional_and_short_of_balance_reports_max_notional(self) -> None:
        assert_rejected(check(request(quantity=D("3")), balances={}), R.MAX_NOTIONAL)


# ------------------------------------------------------------------------------------------
# Properties

lots = st.integers(min_value=1, max_value=100_000).map(lambda n: D(n) / 1000)
ticks = st.integers(min_value=4_000_000, max_value=6_000_000).map(lambda n: D(n) / 100)
positions = st.integers(min_value=-10_000, max_value=10_000).map(lambda n: D(n) / 1000)


@given(lots, ticks, positions, st.sampled_from(list(Side)), st.sampled_from(list(TradingState)))
def test_check_order_when_approved_respects_every_limit(
    quantity: Decimal, price: Decimal, position: Decimal, side: Side, state: TradingState
) -> None:
    decision = check(request(quantity=quantity, price=price, side=side), position_quantity=position, trading_state=state)
    if not decision.approved:
        assert decision.reason in set(R)
        return
    after = position + (quantity if side is Side.BUY else -quantity)
    assert state is not TradingState.HALTED
    if state is TradingState.REDUCING:
        assert abs(after) < abs(position) and after * position >= 0
    assert decision.notional is not None
    assert BTC.min_notional <= decision.notional <= LIMITS.max_notional_per_order
    assert abs(after) <= LIMITS.max_position_per_symbol or abs(after) <= abs(position)
    assert abs(price - D(50000)) <= D(50000) * LIMITS.price_band
