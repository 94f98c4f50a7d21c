"""The API's body types decode exactly what their patterns say (issue 11); no request text
can turn an error answer into a 500."""

from __future__ import annotations

import json

import msgspec
import pytest

from services.core.hotstate import load
from services.gateway.models import (
    ApiKeyBody,
    OrderBody,
    PortfolioBody,
    RebalanceBody,
    decode_body,
    openapi_components,
    order_view,
)
from services.gateway.problems import FieldError, Problem, problem_response
from services.trading.orders import Order, OrderStatus

ORDER = {"client_order_id": "c-1", "portfolio_id": "pf-1", "symbol": "BTC/USDT", "side": "buy", "type": "limit",
         "quantity": "0.5", "price": "100", "venue": "paper"}


@pytest.mark.parametrize("field", ["client_order_id", "portfolio_id", "symbol", "quantity", "price", "venue"])
@pytest.mark.parametrize("tail", ["\n", "\r\n", " ", "\n\n"])
def test_order_body_when_a_field_has_a_trailing_newline_or_space_is_invalid(field: str, tail: str) -> None:
    assert decode_body(json.dumps(ORDER).encode(), OrderBody).portfolio_id == "pf-1"
    with pytest.raises(Problem) as info:
        decode_body(json.dumps({**ORDER, field: ORDER[field] + tail}).encode(), OrderBody)
    assert (info.value.status, info.value.code) == (422, "validation_error")
    assert info.value.errors and info.value.errors[0].field == field
    assert "\\Z" not in info.value.detail  # the pattern as the OpenAPI document writes it


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (PortfolioBody, {"base_currency": "USDT\n"}),
        (PortfolioBody, {"balances": {"USDT\n": "1"}}),
        (RebalanceBody, {"targets": {"BTC/USDT\n": "1"}}),
        (ApiKeyBody, {"name": "n\n", "portfolios": "*", "scopes": ["read"]}),
        (ApiKeyBody, {"name": "n", "portfolios": ["pf\n"], "scopes": ["read"]}),
    ],
)
def test_bodies_when_a_value_or_key_has_a_trailing_newline_are_invalid(cls: type, body: dict[str, object]) -> None:
    with pytest.raises(Problem) as info:
        decode_body(json.dumps(body).encode(), cls)
    assert info.value.code == "validation_error"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b'{"portfolio_id": "\xff"}', b'{"\xc3": 1}', b'{"portfolio_id": "\\ud800"}'])
def test_decode_body_when_not_utf8_raises_422_malformed_json(raw: bytes) -> None:
    with pytest.raises(Problem) as info:
        decode_body(raw, OrderBody)
    assert (info.value.status, info.value.code) == (422, "malformed_json")


def test_openapi_components_when_rendered_write_patterns_as_json_schema() -> None:
    text = json.dumps(openapi_components())
    assert "\\\\Z" not in text and '"^[A-Za-z0-9._:-]{1,64}$"' in text


def test_problem_response_when_text_has_a_lone_surrogate_still_answers_the_problem() -> None:
    r = problem_response(422, "validation_error", "bad \ud800", errors=[FieldError("f\udc00", "m")])
    body = json.loads(r.body)
    assert r.status_code == 422 and body["code"] == "validation_error" and body["errors"][0]["field"] == "f\\udc00"


STORED_ORDER = bytes.fromhex(
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
"""A partially filled order as the order stage stores it in Redis."""

ORDER_JSON = (
    b'{"order_id":"o-1","client_order_id":"c-1","status":"partially_filled","correlation_id":"o-1","portfo'
    b'lio_id":"pf-1","symbol":"BTC/USDT","side":"buy","type":"limit","quantity":"1.5","price":"60000.10","'
    b'time_in_force":"ioc","requested_venue":"paper","venue":"paper","filled_quantity":"0.5","avg_fill_pri'
    b'ce":"60000","commission":"0.25","commission_asset":"USDT","reject_code":null,"reject_reason":null,"f'
    b'ills":[{"fill_id":"o-1:paper:f1","quantity":"0.5","price":"60000","commission":"0.25","commission_as'
    b'set":"USDT","liquidity":"taker","venue":"paper","at":"2026-03-01T12:00:02Z"}],"created_at":"2026-03-'
    b'01T12:00:00Z","updated_at":"2026-03-01T12:00:02Z"}'
)
REJECTED_JSON = (
    b'{"order_id":"o-1","client_order_id":"c-1","status":"rejected","correlation_id":"o-1","portfolio_id":'
    b'"pf-1","symbol":"BTC/USDT","side":"buy","type":"limit","quantity":"1.5","price":null,"time_in_force"'
    b':"ioc","requested_venue":"paper","venue":null,"filled_quantity":"0.5","avg_fill_price":null,"commiss'
    b'ion":"0.25","commission_asset":null,"reject_code":"MAX_NOTIONAL","reject_reason":"too big","fills":['
    b'],"created_at":"2026-03-01T12:00:00Z","updated_at":"2026-03-01T12:00:02Z"}'
)


def test_order_view_when_encoded_is_byte_for_byte_the_public_contract() -> None:
    stored = load(Order, STORED_ORDER)
    assert msgspec.json.encode(order_view(stored)) == ORDER_JSON
    rejected = msgspec.structs.replace(
        stored, status=OrderStatus.REJECTED, fills=(), reject_code="MAX_NOTIONAL", reject_reason="too big", venue=None,
        price=None, avg_fill_price=None, commission_asset=None,
    )
    assert msgspec.json.encode(order_view(rejected)) == REJECTED_JSON
