"""The order: the transition table, the event methods that move it, fills, and its stored format."""

from __future__ import annotations

import datetime as dt
import enum
import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading import OrderTerms, OrderType, Route, Side, TimeInForce
from services.trading.orders import (
    TERMINAL,
    TRANSITIONS,
    Fill,
    InvalidFill,
    InvalidTransition,
    Order,
    OrderStatus,
)
from services.trading.terms import carry

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(seconds=1)
S = OrderStatus
TERMS = OrderTerms(
    order_id="o1", client_order_id="c1", symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.LIMIT,
    quantity=Decimal("1.0"), price=Decimal("50000"), time_in_force=TimeInForce.GTC, venue="paper",
)


def make_order(status: OrderStatus = S.ROUTED, quantity: str = "1.0") -> Order:
    order = Order.requested(msgspec.structs.replace(TERMS, quantity=Decimal(quantity)), portfolio_id="p1", at=T0)
    return msgspec.structs.replace(order, status=status)


def fill(fill_id: str, quantity: str, price: str = "100", commission: str = "0", *, venue: str = "paper",
         venue_fill_id: str | None = None) -> Fill:
    return Fill(fill_id=fill_id, quantity=Decimal(quantity), price=Decimal(price), commission=Decimal(commission),
                commission_asset="USDT", liquidity="taker", venue=venue, at=T0, venue_fill_id=venue_fill_id)


EVENTS: dict[str, tuple[OrderStatus, Callable[[Order], Order]]] = {
    "rejected": (S.REJECTED, lambda o: o.rejected("MAX_NOTIONAL", "too big", T1)),
    "routed": (S.ROUTED, lambda o: o.routed("paper", T1)),
    "outcome unknown": (S.UNKNOWN, lambda o: o.outcome_unknown("sima", T1)),
    "failed": (S.FAILED, lambda o: o.failed("VENUE_REJECTED", "venue said no", T1)),
    "canceled": (S.CANCELED, lambda o: o.canceled("client", T1)),
    "expired": (S.EXPIRED, lambda o: o.expired("expired", T1)),
    "filled in part": (S.PARTIALLY_FILLED, lambda o: o.filled(fill("f1", "0.4"), T1)),
    "filled": (S.FILLED, lambda o: o.filled(fill("f1", "1.0"), T1)),
}
"""Each event that moves an order to one status, and the status it moves it to."""


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

    def test_transitions_when_listed_each_is_made_by_an_event(self) -> None:
        made = {(current, to) for current in S for to, _ in EVENTS.values()}
        made |= {(S.REQUESTED, S.VALIDATED), (S.VALIDATED, S.CREATED)}  # validated_and_created
        assert TRANSITIONS - made == set()


class TestEvents:
    @pytest.mark.parametrize("current", list(S))
    @pytest.mark.parametrize("event", list(EVENTS))
    def test_event_when_the_table_allows_the_move_moves_and_stamps_time_else_raises(
        self, event: str, current: OrderStatus
    ) -> None:
        to, apply = EVENTS[event]
        order = make_order(current)
        if (current, to) in TRANSITIONS:
            moved = apply(order)
            assert (moved.status, moved.updated_at) == (to, T1)
        else:
            with pytest.raises(InvalidTransition):
                apply(order)

    @pytest.mark.parametrize("current", list(S))
    def test_validated_and_created_when_requested_moves_to_created_else_raises(self, current: OrderStatus) -> None:
        order = make_order(current)
        if current is S.REQUESTED:
            assert order.validated_and_created(T1).status is S.CREATED
        else:
            with pytest.raises(InvalidTransition):
                order.validated_and_created(T1)

    def test_event_when_applied_leaves_the_original_unchanged(self) -> None:
        order = make_order(S.ROUTED)
        order.canceled("client", T1)
        assert order.status == S.ROUTED

    def test_rejected_when_requested_records_code_and_reason(self) -> None:
        rejected = make_order(S.REQUESTED).rejected("MAX_NOTIONAL", "too big", T1)
        assert rejected.status is S.REJECTED
        assert (rejected.reject_code, rejected.reject_reason) == ("MAX_NOTIONAL", "too big")

    def test_failed_when_routed_records_code_and_reason(self) -> None:
        failed = make_order(S.ROUTED).failed("VENUE_REJECTED", "venue said no", T1)
        assert failed.status is S.FAILED
        assert (failed.reject_code, failed.reject_reason) == ("VENUE_REJECTED", "venue said no")

    def test_routed_when_created_records_the_venue(self) -> None:
        assert make_order(S.CREATED).routed("sim", T1).venue == "sim"

    def test_expired_when_routed_keeps_the_reason(self) -> None:
        expired = make_order(S.ROUTED).expired("expired", T1)
        assert (expired.status, expired.reject_code, expired.reject_reason) == (S.EXPIRED, None, "expired")

    def test_canceled_when_partially_filled_keeps_the_fills(self) -> None:
        order = make_order(S.ROUTED).filled(fill("f1", "0.4", commission="0.1"), T1)
        canceled = order.canceled("client", T1)
        assert canceled.status == S.CANCELED
        assert canceled.filled_quantity == Decimal("0.4")
        assert canceled.fills == order.fills

    @pytest.mark.parametrize("status", sorted(TERMINAL))
    def test_canceled_when_terminal_raises(self, status: OrderStatus) -> None:
        with pytest.raises(InvalidTransition):
            make_order(status).canceled("client", T1)


class TestFills:
    def test_filled_when_partial_moves_to_partially_filled(self) -> None:
        order = make_order(S.ROUTED).filled(fill("f1", "0.25", commission="0.01"), T1)
        assert order.status == S.PARTIALLY_FILLED
        assert order.filled_quantity == Decimal("0.25")
        assert order.leaves_quantity == Decimal("0.75")
        assert order.avg_fill_price == Decimal("100")
        assert order.commission_asset == "USDT"
        assert [f.fill_id for f in order.fills] == ["f1"]
        assert order.updated_at == T1

    def test_filled_when_complete_moves_to_filled_with_weighted_average(self) -> None:
        order = (
            make_order(S.ROUTED)
            .filled(fill("f1", "0.25", "100", "0.01"), T1)
            .filled(fill("f2", "0.75", "200", "0.02"), T1)
        )
        assert order.status == S.FILLED
        assert order.avg_fill_price == Decimal("175")
        assert order.commission == Decimal("0.03")

    def test_filled_when_before_the_acknowledgement_takes_the_venue_of_the_fill(self) -> None:
        assert make_order(S.CREATED).filled(fill("f1", "0.25", venue="sim"), T1).venue == "sim"
        # a routed order keeps the venue it was routed to
        routed = make_order(S.CREATED).routed("paper", T1)
        assert routed.filled(fill("f1", "0.25", venue="sim"), T1).venue == "paper"

    def test_filled_when_fill_id_repeated_returns_same_order(self) -> None:
        once = make_order(S.ROUTED).filled(fill("f1", "0.5"), T1)
        assert once.filled(fill("f1", "0.5"), T1) is once

    def test_filled_when_the_venue_fill_was_counted_under_another_fill_id_returns_same_order(self) -> None:
        once = make_order(S.ROUTED).filled(fill("o1:1", "0.5", venue_fill_id="v-7"), T1)
        assert once.filled(fill("o1:paper:v-7", "0.5", venue_fill_id="v-7"), T1) is once
        # the same execution id at another venue is another fill
        assert once.filled(fill("o1:sim:v-7", "0.5", venue="sim", venue_fill_id="v-7"), T1).status is S.FILLED

    def test_filled_when_fill_id_repeated_after_terminal_is_a_no_op(self) -> None:
        filled = make_order(S.ROUTED).filled(fill("f1", "1.0"), T1)
        assert filled.filled(fill("f1", "1.0"), T1) is filled

    def test_filled_when_new_fill_after_terminal_raises(self) -> None:
        filled = make_order(S.ROUTED).filled(fill("f1", "1.0"), T1)
        with pytest.raises(InvalidTransition):
            filled.filled(fill("f2", "0.1"), T1)

    def test_filled_when_cumulative_exceeds_quantity_raises(self) -> None:
        order = make_order(S.ROUTED).filled(fill("f1", "0.6"), T1)
        with pytest.raises(InvalidFill):
            order.filled(fill("f2", "0.5"), T1)

    @pytest.mark.parametrize("quantity,price", [("0", "1"), ("-1", "1"), ("0.1", "0"), ("NaN", "1")])
    def test_filled_when_quantity_or_price_not_positive_raises(self, quantity: str, price: str) -> None:
        with pytest.raises(InvalidFill):
            make_order(S.ROUTED).filled(fill("f1", quantity, price), T1)

    @pytest.mark.parametrize("status", [S.REQUESTED, S.VALIDATED])
    def test_filled_when_not_yet_at_a_venue_raises(self, status: OrderStatus) -> None:
        with pytest.raises(InvalidTransition):
            make_order(status).filled(fill("f1", "0.1"), T1)

    @pytest.mark.parametrize("status", [S.CREATED, S.UNKNOWN, S.ROUTED])
    def test_filled_when_venue_may_hold_the_order_is_accepted(self, status: OrderStatus) -> None:
        assert make_order(status).filled(fill("f1", "0.1"), T1).status == S.PARTIALLY_FILLED


class TestTerms:
    def test_requested_when_made_from_terms_gives_them_back(self) -> None:
        order = Order.requested(TERMS, portfolio_id="p1", at=T0, requested_by="k1", body_hash="h", route=Route.WORKFLOW)
        assert order.terms == TERMS
        assert (order.status, order.requested_venue, order.venue) == (S.REQUESTED, "paper", None)
        assert (order.correlation_id, order.created_at, order.updated_at) == ("o1", T0, T0)
        assert (order.requested_by, order.body_hash, order.route) == ("k1", "h", Route.WORKFLOW)

    def test_requested_when_rejected_terms_still_makes_an_order(self) -> None:
        # risk, not the order, is where a bad request is refused
        bad = msgspec.structs.replace(TERMS, quantity=Decimal("-1"))
        assert Order.requested(bad, portfolio_id="p1", at=T0).rejected("QTY", "negative", T1).status is S.REJECTED

    def test_every_term_when_stored_has_a_field_of_the_same_type(self) -> None:
        fields = {f.name: f.type for f in msgspec.structs.fields(Order)}
        for term in msgspec.structs.fields(OrderTerms):
            assert fields["requested_venue" if term.name == "venue" else term.name] == term.type, term.name

    def test_carry_when_into_a_message_with_more_fields_keeps_the_terms(self) -> None:
        class Next(OrderTerms, frozen=True, kw_only=True):
            cap: Decimal | None = None

        carried = carry(make_order().terms, Next, cap=Decimal("1"))
        assert (carried.venue, carried.cap, carried.quantity) == ("paper", Decimal("1"), Decimal("1.0"))


# ------------------------------------------------------------------------------------------
# The stored format: an order is msgpack in Redis under its key. Records written before the
# order and the record became one type must still decode, field for field.

_UtcDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]


class _Route(enum.StrEnum):
    STREAM = "stream"
    WORKFLOW = "workflow"


class _StatusAt_db5e190(enum.StrEnum):
    REQUESTED = "requested"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"


class _FillAt_db5e190(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``services.core.hotstate.Fill`` as it was at db5e190 (frozen: do not update)."""

    fill_id: str
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_asset: str
    liquidity: str
    venue: str
    at: _UtcDatetime
    venue_fill_id: str | None = None


class _OrderRecordAt_db5e190(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``services.core.hotstate.OrderRecord`` as it was at db5e190 (frozen: do not update)."""

    order_id: str
    client_order_id: str
    portfolio_id: str
    correlation_id: str
    symbol: str
    side: str
    order_type: str
    quantity: Decimal
    price: Decimal | None = None
    time_in_force: str = "gtc"
    requested_venue: str | None = None
    status: _StatusAt_db5e190 = _StatusAt_db5e190.REQUESTED
    created_at: _UtcDatetime
    updated_at: _UtcDatetime
    venue: str | None = None
    filled_quantity: Decimal = Decimal(0)
    avg_fill_price: Decimal | None = None
    commission: Decimal = Decimal(0)
    commission_asset: str | None = None
    fill_notional: Decimal = Decimal(0)
    reject_code: str | None = None
    reject_reason: str | None = None
    fills: tuple[_FillAt_db5e190, ...] = ()
    body_hash: str = ""
    route: _Route = _Route.STREAM
    requested_by: str | None = None


STORED_AT_DB5E190 = bytes.fromhex(
    "de001aa86f726465725f6964a36f2d31af636c69656e745f6f726465725f6964a3632d31ac706f7274666f6c696f5f69"
    "64a470662d31ae636f7272656c6174696f6e5f6964a36f2d31a673796d626f6ca84254432f55534454a473696465a362"
    "7579aa6f726465725f74797065a56c696d6974a87175616e74697479a3312e35a57072696365a836303030302e3130ad"
    "74696d655f696e5f666f726365a3696f63af7265717565737465645f76656e7565a57061706572a6737461747573b070"
    "61727469616c6c795f66696c6c6564aa637265617465645f6174d6ff69a42a40aa757064617465645f6174d6ff69a42a"
    "42a576656e7565a57061706572af66696c6c65645f7175616e74697479a3302e35ae6176675f66696c6c5f7072696365"
    "a53630303030aa636f6d6d697373696f6ea4302e3235b0636f6d6d697373696f6e5f6173736574a455534454ad66696c"
    "6c5f6e6f74696f6e616ca733303030302e30ab72656a6563745f636f6465c0ad72656a6563745f726561736f6ec0a566"
    "696c6c739189a766696c6c5f6964ac6f2d313a70617065723a6631a87175616e74697479a3302e35a57072696365a536"
    "30303030aa636f6d6d697373696f6ea4302e3235b0636f6d6d697373696f6e5f6173736574a455534454a96c69717569"
    "64697479a574616b6572a576656e7565a57061706572a26174d6ff69a42a42ad76656e75655f66696c6c5f6964a26631"
    "a9626f64795f68617368a3616263a5726f757465a8776f726b666c6f77ac7265717565737465645f6279a56b65792d31"
)
"""A partially filled order as db5e190's order stage stored it (``dump(OrderRecord(...))``)."""


class TestStoredFormat:
    def test_stored_record_when_written_at_db5e190_decodes_and_encodes_to_the_same_bytes(self) -> None:
        order = msgspec.msgpack.decode(STORED_AT_DB5E190, type=Order)
        assert (order.status, order.filled_quantity) == (S.PARTIALLY_FILLED, Decimal("0.5"))
        assert order.route is Route.WORKFLOW
        assert order.fills[0].venue_fill_id == "f1"
        assert msgspec.msgpack.encode(order) == STORED_AT_DB5E190

    def test_stored_record_when_encoded_by_the_old_type_decodes_field_for_field(self) -> None:
        old = _OrderRecordAt_db5e190(
            order_id="o1", client_order_id="c1", portfolio_id="p1", correlation_id="o1", symbol="BTC/USDT",
            side="sell", order_type="market", quantity=Decimal("2"), created_at=T0, updated_at=T1,
            status=_StatusAt_db5e190.FILLED, venue="paper", filled_quantity=Decimal("2"), fill_notional=Decimal("200"),
            avg_fill_price=Decimal("100"), commission=Decimal("0.2"), commission_asset="USDT",
            fills=(_FillAt_db5e190(fill_id="o1:1", quantity=Decimal("2"), price=Decimal("100"),
                                   commission=Decimal("0.2"), commission_asset="USDT", liquidity="taker",
                                   venue="paper", at=T1),),
        )
        order = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Order)
        assert msgspec.structs.asdict(order) | {"fills": None} == msgspec.structs.asdict(old) | {"fills": None}
        assert [msgspec.structs.asdict(f) for f in order.fills] == [msgspec.structs.asdict(f) for f in old.fills]
        assert msgspec.msgpack.encode(order) == msgspec.msgpack.encode(old)

    def test_stored_record_when_only_the_required_fields_were_written_decodes_with_defaults(self) -> None:
        old = _OrderRecordAt_db5e190(
            order_id="o1", client_order_id="c1", portfolio_id="p1", correlation_id="o1", symbol="BTC/USDT",
            side="buy", order_type="limit", quantity=Decimal("1"), created_at=T0, updated_at=T0,
        )
        order = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Order)
        assert order == Order(
            order_id="o1", client_order_id="c1", portfolio_id="p1", correlation_id="o1", symbol="BTC/USDT",
            side=Side.BUY, order_type=OrderType.LIMIT, quantity=Decimal("1"), created_at=T0, updated_at=T0,
        )
        assert (order.status, order.fills, order.route) == (S.REQUESTED, (), Route.STREAM)


# ------------------------------------------------------------------------------------------
# Properties

step = st.integers(min_value=1, max_value=1000).map(lambda n: Decimal(n) / 1000)
price = st.integers(min_value=1, max_value=10_000_000).map(lambda n: Decimal(n) / 100)
fee = st.integers(min_value=-100, max_value=1000).map(lambda n: Decimal(n) / 10_000)

operation = st.one_of(
    st.tuples(st.sampled_from(sorted(set(EVENTS) - {"filled in part", "filled"}))),
    st.tuples(st.just("validated"),),
    st.tuples(st.just("fill"), st.sampled_from(["f1", "f2", "f3", "f4"]), step, price, fee),
)


def apply(order: Order, op: tuple[object, ...]) -> Order:
    match op:
        case ("fill", str(fid), Decimal() as qty, Decimal() as px, Decimal() as fee_):
            return order.filled(Fill(fill_id=fid, quantity=qty, price=px, commission=fee_, commission_asset="USDT",
                                     liquidity="maker", venue="paper", at=T0), T1)
        case ("validated",):
            return order.validated_and_created(T1)
        case (str(event),):
            return EVENTS[event][1](order)
    raise AssertionError(op)


@given(st.sampled_from(list(S)), st.lists(operation, max_size=30))
def test_order_when_random_events_never_leaves_terminal_nor_overfills(
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
            assert order is before  # only a repeated fill gets through, unchanged
        moves = {(before.status, order.status)}
        if op == ("validated",):
            moves = {(S.REQUESTED, S.VALIDATED), (S.VALIDATED, S.CREATED)}
        assert moves <= TRANSITIONS or order is before
        assert before.filled_quantity <= order.filled_quantity <= order.quantity
        assert order.fills[: len(before.fills)] == before.fills


fills = st.lists(
    st.tuples(step, price, fee), min_size=1, max_size=6
).map(lambda xs: [fill(f"f{i}", str(q), str(p), str(c)) for i, (q, p, c) in enumerate(xs)])


@given(fills)
def test_filled_when_permuted_gives_the_same_totals(fill_list: list[Fill]) -> None:
    total = sum((f.quantity for f in fill_list), Decimal(0))
    base = make_order(S.ROUTED, quantity=str(total + Decimal("0.5")))
    results = set()
    for perm in itertools.islice(itertools.permutations(fill_list), 24):
        order = base
        for f in perm:
            order = order.filled(f, T1)
        results.add((order.filled_quantity, order.avg_fill_price, order.commission, frozenset(order.fills)))
    assert len(results) == 1
    filled, avg, commission, _ = results.pop()
    assert filled == total
    assert commission == sum((f.commission for f in fill_list), Decimal(0))
    assert avg is not None
    assert min(f.price for f in fill_list) <= avg <= max(f.price for f in fill_list)


@given(fills, st.lists(st.integers(min_value=0, max_value=5), max_size=10))
def test_filled_when_fills_repeat_counts_each_once(fill_list: list[Fill], repeats: list[int]) -> None:
    total = sum((f.quantity for f in fill_list), Decimal(0))
    base = make_order(S.ROUTED, quantity=str(total))
    once = base
    for f in fill_list:
        once = once.filled(f, T1)
    twice = base
    for f in fill_list:
        twice = twice.filled(f, T1)
        for i in repeats:
            again = fill_list[i % len(fill_list)]
            if twice.counted(again):
                twice = twice.filled(again, T1)
    assert twice == once
    assert once.status == S.FILLED
