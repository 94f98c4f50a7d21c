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
from tests.unit.trading.test_orders import STORED_AT_DB5E190

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
    stored = load(Order, STORED_AT_DB5E190)  # a partially filled order, as Redis holds it
    assert msgspec.json.encode(order_view(stored)) == ORDER_JSON
    rejected = msgspec.structs.replace(
        stored, status=OrderStatus.REJECTED, fills=(), reject_code="MAX_NOTIONAL", reject_reason="too big", venue=None,
        price=None, avg_fill_price=None, commission_asset=None,
    )
    assert msgspec.json.encode(order_view(rejected)) == REJECTED_JSON
