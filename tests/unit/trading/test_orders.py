"""The order state machine: the transition table, fills, and what terminal means."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading import OrderType, Side, TimeInForce
from services.trading.orders import (
    TERMINAL,
    TRANSITIONS,
    InvalidFill,
    InvalidTransition,
    Order,
    OrderStatus,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(seconds=1)
S = OrderStatus


def make_order(status: OrderStatus = S.ROUTED, quantity: str = "1.0", **overrides: object) -> Order:
    order = Order.requested(
        order_id="o1",
        client_order_id="c1",
        portfolio_id="p1",
        symbol="BTC/USDT",
        side=Side.BUY,
        order_type=OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=Decimal("50000"),
        at=T0,
        time_in_force=TimeInForce.GTC,
    )
    return dataclasses.replace(order, status=status, **overrides)  # type: ignore[arg-type]


class TestTransitionTable:
    def test_transitions_when_from_terminal_none_exist(self) -> None:
        assert not [pair for pair in TRANSITIONS if pair[0] in TERMINAL]

    def test_transitions_when_non_terminal_every_state_has_a_way_out(self) -> None:
        for status in set(S) - TERMINAL:
            assert any(current == status for current, _ in TRANSITIONS), status

    def test_transitions_when_unknown_resolves_to_every_venue_outcome(self) -> None:
        for outcome in (S.ROUTED, S.PARTIALLY_FILLED, S.FILLED, S.CANCELED, S.FAILED):
            assert (S.UNKNOWN, outcome) in TRANSITIONS

    def test_terminal_when_listed_is_exactly_the_five_final_states(self) -> None:
        assert TERMINAL == {S.REJECTED, S.FILLED, S.CANCELED, S.FAILED, S.EXPIRED}

    @pytest.mark.parametrize("current,to", sorted(TRANSITIONS))
    def test_transition_when_in_table_moves_and_stamps_time(self, current: OrderStatus, to: OrderStatus) -> None:
        moved = make_order(current).transition(to, at=T1)
        assert moved.status == to
        assert moved.updated_at == T1

    @pytest.mark.parametrize(
        "current,to", [(c, t) for c in S for t in S if (c, t) not in TRANSITIONS]
    )
    def test_transition_when_not_in_table_raises(self, current: OrderStatus, to: OrderStatus) -> None:
        order = make_order(current)
        with pytest.raises(InvalidTransition):
            order.transition(to, at=T1)

    def test_transition_when_routed_records_the_venue(self) -> None:
        assert make_order(S.CREATED).transition(S.ROUTED, at=T1, venue="paper").venue == "paper"

    def test_transition_when_applied_leaves_the_original_unchanged(self) -> None:
        order = make_order(S.ROUTED)
        order.cancel(at=T1)
        assert order.status == S.ROUTED


class TestCommands:
    def test_reject_when_requested_records_the_reason(self) -> None:
        rejected = make_order(S.REQUESTED).reject("MAX_NOTIONAL", at=T1)
        assert (rejected.status, rejected.reject_reason) == (S.REJECTED, "MAX_NOTIONAL")

    def test_fail_when_routed_records_the_reason(self) -> None:
        failed = make_order(S.ROUTED).fail("venue said no", at=T1)
        assert (failed.status, failed.reject_reason) == (S.FAILED, "venue said no")

    def test_cancel_when_partially_filled_keeps_the_fills(self) -> None:
        order = make_order(S.ROUTED).apply_fill("f1", Decimal("0.4"), Decimal("100"), Decimal("0.1"), T1)
        canceled = order.cancel(at=T1)
        assert canceled.status == S.CANCELED
        assert canceled.filled_quantity == Decimal("0.4")

    @pytest.mark.parametrize("status", sorted(TERMINAL))
    def test_cancel_when_terminal_raises(self, status: OrderStatus) -> None:
        with pytest.raises(InvalidTransition):
            make_order(status).cancel(at=T1)

    def test_order_when_quantity_not_positive_raises(self) -> None:
        with pytest.raises(ValueError):
            make_order(quantity="0")


class TestFills:
    def test_apply_fill_when_partial_moves_to_partially_filled(self) -> None:
        order = make_order(S.ROUTED).apply_fill("f1", Decimal("0.25"), Decimal("100"), Decimal("0.01"), T1)
        assert order.status == S.PARTIALLY_FILLED
        assert order.filled_quantity == Decimal("0.25")
        assert order.leaves_quantity == Decimal("0.75")
        assert order.avg_fill_price == Decimal("100")
        assert order.fill_ids == {"f1"}
        assert order.updated_at == T1

    def test_apply_fill_when_complete_moves_to_filled_with_weighted_average(self) -> None:
        order = (
            make_order(S.ROUTED)
            .apply_fill("f1", Decimal("0.25"), Decimal("100"), Decimal("0.01"), T1)
            .apply_fill("f2", Decimal("0.75"), Decimal("200"), Decimal("0.02"), T1)
        )
        assert order.status == S.FILLED
        assert order.avg_fill_price == Decimal("175")
        assert order.commission == Decimal("0.03")

    def test_apply_fill_when_fill_id_repeated_returns_same_order(self) -> None:
        once = make_order(S.ROUTED).apply_fill("f1", Decimal("0.5"), Decimal("100"), Decimal("0"), T1)
        assert once.apply_fill("f1", Decimal("0.5"), Decimal("100"), Decimal("0"), T1) is once

    def test_apply_fill_when_fill_id_repeated_after_terminal_is_a_no_op(self) -> None:
        filled = make_order(S.ROUTED).apply_fill("f1", Decimal("1.0"), Decimal("100"), Decimal("0"), T1)
        assert filled.apply_fill("f1", Decimal("1.0"), Decimal("100"), Decimal("0"), T1) is filled

    def test_apply_fill_when_new_fill_after_terminal_raises(self) -> None:
        filled = make_order(S.ROUTED).apply_fill("f1", Decimal("1.0"), Decimal("100"), Decimal("0"), T1)
        with pytest.raises(InvalidTransition):
            filled.apply_fill("f2", Decimal("0.1"), Decimal("100"), Decimal("0"), T1)

    def test_apply_fill_when_cumulative_exceeds_quantity_raises(self) -> None:
        order = make_order(S.ROUTED).apply_fill("f1", Decimal("0.6"), Decimal("100"), Decimal("0"), T1)
        with pytest.raises(InvalidFill):
            order.apply_fill("f2", Decimal("0.5"), Decimal("100"), Decimal("0"), T1)

    @pytest.mark.parametrize("quantity,price", [("0", "1"), ("-1", "1"), ("0.1", "0"), ("NaN", "1")])
    def test_apply_fill_when_quantity_or_price_not_positive_raises(self, quantity: str, price: str) -> None:
        with pytest.raises(InvalidFill):
            make_order(S.ROUTED).apply_fill("f1", Decimal(quantity), Decimal(price), Decimal("0"), T1)

    @pytest.mark.parametrize("status", [S.REQUESTED, S.VALIDATED])
    def test_apply_fill_when_not_yet_at_a_venue_raises(self, status: OrderStatus) -> None:
        with pytest.raises(InvalidTransition):
            make_order(status).apply_fill("f1", Decimal("0.1"), Decimal("100"), Decimal("0"), T1)

    @pytest.mark.parametrize("status", [S.CREATED, S.UNKNOWN, S.ROUTED])
    def test_apply_fill_when_venue_may_hold_the_order_is_accepted(self, status: OrderStatus) -> None:
        order = make_order(status).apply_fill("f1", Decimal("0.1"), Decimal("100"), Decimal("0"), T1)
        assert order.status == S.PARTIALLY_FILLED


# ------------------------------------------------------------------------------------------
# Properties

step = st.integers(min_value=1, max_value=1000).map(lambda n: Decimal(n) / 1000)
price = st.integers(min_value=1, max_value=10_000_000).map(lambda n: Decimal(n) / 100)
fee = st.integers(min_value=-100, max_value=1000).map(lambda n: Decimal(n) / 10_000)

operation = st.one_of(
    st.tuples(st.just("transition"), st.sampled_from(list(S))),
    st.tuples(st.just("fill"), st.sampled_from(["f1", "f2", "f3", "f4"]), step, price, fee),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("reject")),
    st.tuples(st.just("fail")),
)


def apply(order: Order, op: tuple[object, ...]) -> Order:
    match op:
        case ("transition", OrderStatus() as to):
            return order.transition(to, at=T1)
        case ("fill", str(fid), Decimal() as qty, Decimal() as px, Decimal() as fee_):
            return order.apply_fill(fid, qty, px, fee_, T1)
        case ("cancel",):
            return order.cancel(at=T1)
        case ("reject",):
            return order.reject("r", at=T1)
        case ("fail",):
            return order.fail("f", at=T1)
    raise AssertionError(op)


@given(st.sampled_from(list(S)), st.lists(operation, max_size=30))
def test_order_when_random_operations_never_leaves_terminal_nor_overfills(
    start: OrderStatus, ops: list[tuple[object, ...]]
) -> None:
    order = make_order(start)
    for op in ops:
        before = order
        try:
            order = apply(order, op)
        except (InvalidTransition, InvalidFill):
            continue
        if before.is_terminal:
            assert order is before  # only a repeated fill id gets through, unchanged
        assert (before.status, order.status) in TRANSITIONS or order is before
        assert before.filled_quantity <= order.filled_quantity <= order.quantity
        assert len(order.fill_ids) >= len(before.fill_ids)


fills = st.lists(
    st.tuples(step, price, fee), min_size=1, max_size=6
).map(lambda xs: [(f"f{i}", q, p, c) for i, (q, p, c) in enumerate(xs)])


@given(fills)
def test_apply_fill_when_permuted_gives_the_same_totals(
    fill_list: list[tuple[str, Decimal, Decimal, Decimal]],
) -> None:
    total = sum((q for _, q, _, _ in fill_list), Decimal(0))
    base = make_order(S.ROUTED, quantity=str(total + Decimal("0.5")))
    results = set()
    for perm in itertools.islice(itertools.permutations(fill_list), 24):
        order = base
        for fid, q, p, c in perm:
            order = order.apply_fill(fid, q, p, c, T1)
        results.add((order.filled_quantity, order.avg_fill_price, order.commission, order.fill_ids))
    assert len(results) == 1
    filled, avg, commission, _ = results.pop()
    assert filled == total
    assert commission == sum((c for _, _, _, c in fill_list), Decimal(0))
    assert avg is not None
    assert min(p for _, _, p, _ in fill_list) <= avg <= max(p for _, _, p, _ in fill_list)


@given(fills, st.lists(st.integers(min_value=0, max_value=5), max_size=10))
def test_apply_fill_when_fill_ids_repeat_counts_each_once(
    fill_list: list[tuple[str, Decimal, Decimal, Decimal]], repeats: list[int]
) -> None:
    total = sum((q for _, q, _, _ in fill_list), Decimal(0))
    base = make_order(S.ROUTED, quantity=str(total))
    once = base
    for fid, q, p, c in fill_list:
        once = once.apply_fill(fid, q, p, c, T1)
    twice = base
    for fid, q, p, c in fill_list:
        twice = twice.apply_fill(fid, q, p, c, T1)
        for i in repeats:
            rid, rq, rp, rc = fill_list[i % len(fill_list)]
            if rid in twice.fill_ids:
                twice = twice.apply_fill(rid, rq, rp, rc, T1)
    assert twice == once
    assert once.status == S.FILLED
