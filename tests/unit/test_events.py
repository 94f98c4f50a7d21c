"""The envelope, the catalog and the codec: pure code, no I/O."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.codec import DecodeError, DecodeReason, decode, decode_any, encode
from services.core.events import (
    CATALOG,
    EVENT_CLASSES,
    Event,
    EventType,
    OrderCreated,
    OrderExecuted,
    OrderRequested,
    OrderValidated,
    Payload,
    Route,
    derive_event_id,
    new_event_id,
)
from services.core.keys import Keys, shard_of
from services.trading import Liquidity, OrderTerms, OrderType, Side, TimeInForce

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-([78])[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def requested(**overrides: object) -> OrderRequested:
    values: dict[str, object] = dict(
        order_id="o1", client_order_id="c1", symbol="BTC/USDT", side=Side.BUY,
        order_type=OrderType.LIMIT, quantity=Decimal("0.10"), price=Decimal("50000.50"),
    )
    values.update(overrides)
    return OrderRequested(**values)  # type: ignore[arg-type]


# The catalog of ARCHITECTURE.md section 3, as written there.
ARCHITECTURE_CATALOG = """
order.requested order.validated order.rejected order.created exchange.routed order.executed
order.failed order.canceled position.updated portfolio.updated portfolio.rebalanced
risk.assessed risk.breached price.updated orderbook.updated trade.tick alert.triggered
workflow.started workflow.completed workflow.failed
""".split()


def test_catalog_when_compared_with_architecture_has_every_event_type() -> None:
    # the catalog of ARCHITECTURE section 3, plus the cancel request the public API needs
    assert {str(t) for t in EventType} == set(ARCHITECTURE_CATALOG) | {"order.cancel_requested"}
    assert set(CATALOG) == set(EventType) == set(EVENT_CLASSES)
    for event_type, payload in CATALOG.items():
        # major 1 everywhere; a minor bump adds an optional field (consumers upgrade first)
        assert payload.EVENT_TYPE is event_type and payload.VERSION.startswith("1.")


def test_codec_when_round_tripped_returns_an_equal_event_with_decimals_as_strings() -> None:
    event = Event.new(requested(), portfolio_id="pf-1")
    data = encode(event)
    assert b'"quantity":"0.10"' in data and b'"price":"50000.50"' in data
    decoded = decode(data, EventType.ORDER_REQUESTED)
    assert decoded == event
    assert decoded.payload.quantity == Decimal("0.10") and str(decoded.payload.quantity) == "0.10"
    assert decoded.occurred_at.tzinfo is not None and decoded.occurred_at.utcoffset() == dt.timedelta(0)
    assert decode_any(data) == event


@given(
    quantity=st.decimals(min_value=Decimal("1e-12"), max_value=Decimal("1e12"), allow_nan=False, allow_infinity=False, places=12),
    price=st.decimals(min_value=Decimal("1e-8"), max_value=Decimal("1e9"), allow_nan=False, allow_infinity=False, places=8),
)
def test_codec_when_any_decimal_amount_round_trips_exactly(quantity: Decimal, price: Decimal) -> None:
    event = Event.new(requested(quantity=quantity, price=price), portfolio_id="pf")
    decoded = decode(encode(event), EventType.ORDER_REQUESTED)
    assert decoded.payload.quantity == quantity and decoded.payload.price == price
    assert str(decoded.payload.quantity) == str(quantity)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"\x00garbage", DecodeReason.MALFORMED),
        (lambda b: b'{"hello":"world"}', DecodeReason.MALFORMED),
        (lambda b: b.replace(b'"order.requested"', b'"order.bogus"'), DecodeReason.UNKNOWN_TYPE),
        (lambda b: b.replace(b'"version":"1.0"', b'"version":"2.0"'), DecodeReason.UNSUPPORTED_VERSION),
        (lambda b: b.replace(b'"version":"1.0"', b'"version":"11.0"'), DecodeReason.UNSUPPORTED_VERSION),
        (lambda b: b.replace(b'"side":"buy"', b'"side":"up"'), DecodeReason.INVALID_PAYLOAD),
        (lambda b: b.replace(b'"symbol"', b'"ticker"'), DecodeReason.INVALID_PAYLOAD),
        (lambda b: b.replace(b'Z"', b'+02:00"', 1), DecodeReason.MALFORMED),
    ],
    ids=["binary", "not-an-envelope", "unknown-type", "major-2", "major-11", "bad-enum", "unknown-field", "not-utc"],
)
def test_decode_when_entry_is_invalid_names_the_reason(mutate, reason: DecodeReason) -> None:  # type: ignore[no-untyped-def]
    data = encode(Event.new(requested(), portfolio_id="pf"))
    with pytest.raises(DecodeError) as info:
        decode(mutate(data), EventType.ORDER_REQUESTED)
    assert info.value.reason is reason


def test_decode_when_minor_version_is_newer_accepts_it() -> None:
    data = encode(Event.new(requested(), portfolio_id="pf")).replace(b'"version":"1.0"', b'"version":"1.7"')
    assert decode(data, EventType.ORDER_REQUESTED).version == "1.7"


def test_decode_when_entry_is_in_the_wrong_stream_says_so() -> None:
    data = encode(Event.new(requested(), portfolio_id="pf"))
    with pytest.raises(DecodeError) as info:
        decode(data, EventType.ORDER_VALIDATED)
    assert info.value.reason is DecodeReason.WRONG_STREAM


def test_event_when_built_is_frozen_and_rejects_naive_timestamps() -> None:
    event = Event.new(requested(), portfolio_id="pf")
    with pytest.raises(AttributeError):
        event.portfolio_id = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="UTC"):
        Event.new(requested(), portfolio_id="pf", occurred_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    with pytest.raises(TypeError):
        OrderRequested(order_id="o", client_order_id="c", symbol="X", side=Side.BUY,  # type: ignore[call-arg]
                       order_type=OrderType.MARKET, quantity=Decimal(1), surprise=1)


def test_derive_when_repeated_gives_the_same_id_and_keeps_the_story() -> None:
    cause = Event.new(requested(), portfolio_id="pf-9", metadata={"k": "v"})
    first = cause.derive(requested(), "risk")
    again = cause.derive(requested(), "risk")
    assert first.event_id == again.event_id == derive_event_id(cause.event_id, "risk")
    assert cause.derive(requested(), "risk", index=1).event_id != first.event_id
    assert cause.derive(requested(), "order").event_id != first.event_id
    assert first.causation_id == cause.event_id
    assert first.correlation_id == cause.correlation_id == cause.event_id
    assert first.portfolio_id == "pf-9" and first.metadata == {"k": "v"} and first.route is Route.STREAM
    assert UUID.match(first.event_id) and UUID.match(first.event_id).group(1) == "8"  # type: ignore[union-attr]


def test_new_event_id_when_generated_is_a_time_ordered_uuid7() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(UUID.match(i) and i[14] == "7" for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # millisecond prefix never goes back


def test_fill_when_encoded_keeps_every_money_field_a_string() -> None:
    fill = OrderExecuted(
        order_id="o", client_order_id="c", symbol="ETH/USDT", side=Side.SELL, venue="paper",
        venue_order_id="v1", fill_id="f1", quantity=Decimal("1.5"), price=Decimal("2000.01"),
        commission=Decimal("0.003"), commission_asset="USDT", liquidity=Liquidity.TAKER,
        cumulative_quantity=Decimal("1.5"), leaves_quantity=Decimal("0"),
    )
    raw = msgspec.json.decode(encode(Event.new(fill, portfolio_id="pf")))
    money = {k: v for k, v in raw["payload"].items() if k in {"quantity", "price", "commission", "cumulative_quantity", "leaves_quantity"}}
    assert all(isinstance(v, str) for v in money.values()), money


def test_shard_when_hashed_is_stable_and_spreads() -> None:
    assert shard_of("pf-1", 16) == shard_of("pf-1", 16)
    assert shard_of("portfolio-42", 16) == 5  # a pinned value: the hash must never change
    counts = [0] * 16
    for i in range(16_000):
        counts[shard_of(f"pf-{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200
    keys = Keys("zvt", 16)
    assert keys.stream(3, EventType.ORDER_REQUESTED) == "zvt:{3}:order.requested"
    assert keys.deadletter(3) == "zvt:{3}:deadletter"
    assert keys.state(3, "positions", "pf") == "zvt:{3}:positions:pf"


# The order's terms as the three order events have always put them on the wire: these names,
# in this order, before each event's own fields.
TERMS_ON_THE_WIRE: dict[str, object] = {
    "order_id": "o1",
    "client_order_id": "c1",
    "symbol": "BTC/USDT",
    "side": "buy",
    "order_type": "limit",
    "quantity": "0.5",
    "price": "100",
    "time_in_force": "ioc",
    "venue": "paper",
}
TERMS: dict[str, Any] = dict(
    order_id="o1", client_order_id="c1", symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.LIMIT,
    quantity=Decimal("0.5"), price=Decimal("100"), time_in_force=TimeInForce.IOC, venue="paper",
)
TERMS_PAYLOADS: list[tuple[Payload, dict[str, object]]] = [
    (OrderRequested(**TERMS, requested_by="key-1"), {"requested_by": "key-1"}),
    (OrderValidated(**TERMS, reference_price=Decimal("99"), price_cap=Decimal("101")), {"reference_price": "99", "price_cap": "101"}),
    (OrderCreated(**TERMS, price_cap=Decimal("101")), {"price_cap": "101"}),
]
TERMS_IDS = ["requested", "validated", "created"]


@pytest.mark.parametrize(("payload", "own"), TERMS_PAYLOADS, ids=TERMS_IDS)
def test_order_terms_when_shared_keep_each_payload_byte_identical_on_the_wire(payload: Payload, own: dict[str, object]) -> None:
    # encoding a plain dict in the historical field order is what the payload encoded to
    # when it listed the terms itself; JSON is the bus's codec, msgpack checks the same order
    wire = {**TERMS_ON_THE_WIRE, **own}
    assert isinstance(payload, OrderTerms)
    assert payload.__struct_fields__ == tuple(wire)
    assert msgspec.json.encode(payload) == msgspec.json.encode(wire)
    assert msgspec.msgpack.encode(payload) == msgspec.msgpack.encode(wire)


@pytest.mark.parametrize(
    ("event_type", "version", "own"),
    [
        (EventType.ORDER_REQUESTED, "1.0", {"requested_by": None}),
        (EventType.ORDER_VALIDATED, "1.1", {"reference_price": "99", "price_cap": None}),
        (EventType.ORDER_CREATED, "1.1", {"price_cap": "101"}),
    ],
    ids=TERMS_IDS,
)
def test_order_terms_when_a_stored_event_is_decoded_it_encodes_back_to_the_same_bytes(
    event_type: EventType, version: str, own: dict[str, object]
) -> None:
    stored = msgspec.json.encode({
        "event_id": "e", "event_type": str(event_type), "version": version, "occurred_at": "2024-01-01T00:00:00Z",
        "portfolio_id": "p", "correlation_id": "e", "causation_id": None, "route": "stream",
        "traceparent": None, "tracestate": None, "metadata": {}, "payload": {**TERMS_ON_THE_WIRE, **own},
    })
    event = decode(stored, event_type)
    assert event.payload.side is Side.BUY and event.payload.time_in_force is TimeInForce.IOC
    assert encode(event) == stored


def test_order_terms_when_a_payload_has_an_unknown_field_it_is_rejected() -> None:
    raw = msgspec.json.encode({**TERMS_ON_THE_WIRE, "price_cap": None, "surprise": 1})
    with pytest.raises(msgspec.ValidationError, match="unknown field `surprise`"):
        msgspec.json.decode(raw, type=OrderCreated)
