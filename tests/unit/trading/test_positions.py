"""Netting positions: average price, realized and unrealized PnL, the ledger identity."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading import Side
from services.trading.positions import Position

D = Decimal


def pos(*fills: tuple[Side, str, str] | tuple[Side, str, str, str]) -> Position:
    p = Position(symbol="BTC/USDT")
    for f in fills:
        p = p.apply_fill(f[0], D(f[1]), D(f[2]), D(f[3]) if len(f) == 4 else D(0))
    return p


class TestLong:
    def test_apply_fill_when_flat_buy_opens_long_at_fill_price(self) -> None:
        p = pos((Side.BUY, "2", "100"))
        assert (p.quantity, p.average_price, p.realized_pnl) == (D(2), D(100), D(0))

    def test_apply_fill_when_adding_to_long_weights_the_average(self) -> None:
        p = pos((Side.BUY, "1", "100"), (Side.BUY, "3", "200"))
        assert p.quantity == D(4)
        assert p.average_price == D(175)

    def test_apply_fill_when_reducing_long_realizes_price_minus_average(self) -> None:
        p = pos((Side.BUY, "4", "100"), (Side.SELL, "1", "130"))
        assert p.quantity == D(3)
        assert p.realized_pnl == D(30)
        assert p.average_price == D(100)

    def test_apply_fill_when_long_closed_is_flat_with_no_cost(self) -> None:
        p = pos((Side.BUY, "2", "100"), (Side.SELL, "2", "90"))
        assert p.is_flat
        assert p.realized_pnl == D(-20)
        assert p.average_price == D(0)
        assert p.cost_basis == D(0)

    def test_apply_fill_when_sell_crosses_zero_closes_then_opens_short_at_fill_price(self) -> None:
        p = pos((Side.BUY, "1", "100"), (Side.SELL, "3", "120"))
        assert p.quantity == D(-2)
        assert p.realized_pnl == D(20)
        assert p.average_price == D(120)


class TestShort:
    def test_apply_fill_when_flat_sell_opens_short(self) -> None:
        p = pos((Side.SELL, "2", "100"))
        assert (p.quantity, p.average_price) == (D(-2), D(100))

    def test_apply_fill_when_covering_short_lower_realizes_a_gain(self) -> None:
        p = pos((Side.SELL, "2", "100"), (Side.BUY, "1", "80"))
        assert p.quantity == D(-1)
        assert p.realized_pnl == D(20)
        assert p.average_price == D(100)

    def test_apply_fill_when_buy_crosses_zero_opens_long_at_fill_price(self) -> None:
        p = pos((Side.SELL, "1", "100"), (Side.BUY, "2", "110"))
        assert p.quantity == D(1)
        assert p.realized_pnl == D(-10)
        assert p.average_price == D(110)

    def test_unrealized_pnl_when_short_and_price_falls_is_positive(self) -> None:
        assert pos((Side.SELL, "2", "100")).unrealized_pnl(D(90)) == D(20)


class TestFeesAndInput:
    def test_apply_fill_when_fee_charged_reduces_realized_pnl(self) -> None:
        assert pos((Side.BUY, "1", "100", "0.5")).realized_pnl == D("-0.5")

    def test_unrealized_pnl_when_long_is_quantity_times_move(self) -> None:
        assert pos((Side.BUY, "2", "100")).unrealized_pnl(D(105)) == D(10)

    @pytest.mark.parametrize("quantity,price", [("0", "1"), ("-1", "1"), ("1", "0"), ("Infinity", "1")])
    def test_apply_fill_when_quantity_or_price_not_positive_raises(self, quantity: str, price: str) -> None:
        with pytest.raises(ValueError):
            Position(symbol="X").apply_fill(Side.BUY, D(quantity), D(price))

    def test_from_average_when_rebuilt_matches_reported_values(self) -> None:
        p = Position.from_average("BTC/USDT", D("-2"), D("100"), D("5"))
        assert (p.quantity, p.average_price, p.realized_pnl) == (D(-2), D(100), D(5))

    def test_position_when_flat_with_cost_raises(self) -> None:
        with pytest.raises(ValueError):
            Position(symbol="X", quantity=D(0), cost_basis=D(1))


# ------------------------------------------------------------------------------------------
# Properties

qty = st.integers(min_value=1, max_value=10**6).map(lambda n: D(n) / 10**4)
px = st.integers(min_value=1, max_value=10**8).map(lambda n: D(n) / 100)
fee = st.integers(min_value=0, max_value=10**5).map(lambda n: D(n) / 10**4)
fill = st.tuples(st.sampled_from(list(Side)), qty, px, fee)


def replay(fills: list[tuple[Side, Decimal, Decimal, Decimal]]) -> Position:
    p = Position(symbol="BTC/USDT")
    for side, q, price, f in fills:
        p = p.apply_fill(side, q, price, f)
    return p


@given(st.lists(fill, max_size=40))
def test_position_when_any_fills_quantity_is_the_signed_sum(fills: list[tuple[Side, Decimal, Decimal, Decimal]]) -> None:
    expected = sum((q if s is Side.BUY else -q for s, q, _, _ in fills), D(0))
    assert replay(fills).quantity == expected


@given(qty, px, fee, fee, st.sampled_from(list(Side)))
def test_position_when_round_trip_at_same_price_realizes_minus_fees(
    q: Decimal, price: Decimal, fee1: Decimal, fee2: Decimal, first: Side
) -> None:
    back = Side.SELL if first is Side.BUY else Side.BUY
    p = replay([(first, q, price, fee1), (back, q, price, fee2)])
    assert p.is_flat
    assert p.realized_pnl == -(fee1 + fee2)


@given(st.lists(fill, max_size=40), px)
def test_position_when_any_fills_satisfies_the_ledger_identity_exactly(
    fills: list[tuple[Side, Decimal, Decimal, Decimal]], mark: Decimal
) -> None:
    p = replay(fills)
    proceeds = sum((q * price for s, q, price, _ in fills if s is Side.SELL), D(0))
    cost = sum((q * price for s, q, price, _ in fills if s is Side.BUY), D(0))
    fees = sum((f for _, _, _, f in fills), D(0))
    assert p.realized_pnl + p.unrealized_pnl(mark) == proceeds - cost + p.quantity * mark - fees


@given(st.lists(fill, max_size=40))
def test_position_when_any_fills_results_are_exact_decimals(fills: list[tuple[Side, Decimal, Decimal, Decimal]]) -> None:
    p = replay(fills)
    for value in (p.quantity, p.cost_basis, p.realized_pnl, p.average_price):
        assert isinstance(value, Decimal)
        assert value.is_finite()
    if p.is_flat:
        assert p.cost_basis == 0
    else:
        assert (p.cost_basis > 0) == (p.quantity > 0)


@given(st.lists(fill, max_size=20))
def test_position_when_ambient_decimal_context_differs_gives_the_same_result(
    fills: list[tuple[Side, Decimal, Decimal, Decimal]],
) -> None:
    live = replay(fills)
    with decimal.localcontext(prec=6, rounding=decimal.ROUND_DOWN):
        replayed = replay(fills)
    assert replayed == live
