"""The Python client's wire format: what it sends and how it reads answers, over httpx's
in-memory transport (a canned server; the real gateway is exercised in the integration tests)."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from services.client import ApiError, Client, OrderRequest, OrderResult

FULL_ORDER = {
    "order_id": "o-1", "client_order_id": "c-1", "status": "filled", "correlation_id": "o-1",
    "portfolio_id": "p-1", "symbol": "BTC/USDT", "side": "buy", "type": "limit", "quantity": "0.50",
    "price": "100.1", "time_in_force": "gtc", "requested_venue": None, "venue": "paper",
    "filled_quantity": "0.50", "avg_fill_price": "100.05", "commission": "0.05", "commission_asset": "USDT",
    "reject_code": None, "reject_reason": None,
    "fills": [{"fill_id": "f1", "quantity": "0.50", "price": "100.05", "commission": "0.05",
               "commission_asset": "USDT", "liquidity": "taker", "venue": "paper", "at": "2026-01-01T00:00:00Z"}],
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z",
}


def test_order_request_when_serialized_sends_decimals_as_plain_strings() -> None:
    request = OrderRequest(portfolio_id="p-1", symbol="BTC/USDT", side="buy", order_type="limit",
                           quantity=Decimal("1E-8"), price=Decimal("1E+3"), client_order_id="c-1")
    assert request.to_json() == {
        "client_order_id": "c-1", "portfolio_id": "p-1", "symbol": "BTC/USDT", "side": "buy", "type": "limit",
        "quantity": "0.00000001", "time_in_force": "gtc", "price": "1000",
    }
    assert OrderRequest(portfolio_id="p", symbol="BTC/USDT", side="buy", quantity=Decimal(1)).client_order_id


def test_order_result_when_full_order_parsed_has_decimal_money_and_fills() -> None:
    result = OrderResult.from_json(FULL_ORDER)
    assert result.filled_quantity == Decimal("0.50") and result.avg_fill_price == Decimal("100.05")
    assert result.is_terminal and result.success and result.fills[0].price == Decimal("100.05")
    assert result.created_at is not None and result.created_at.utcoffset() is not None
    short = OrderResult.from_json({"order_id": "o", "client_order_id": "c", "status": "rejected", "correlation_id": "o"})
    assert not short.success and short.quantity is None


def test_client_when_placing_sends_bearer_key_and_wait_and_reads_the_answer() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=FULL_ORDER)

    with Client("http://gw", "secret-1", transport=httpx.MockTransport(server)) as zvt:
        result = zvt.place_order(OrderRequest(portfolio_id="p-1", symbol="BTC/USDT", side="buy",
                                              quantity=Decimal("0.5")), wait=2.5)
    assert result.status == "filled" and result.http_status == 200
    sent = seen[0]
    assert sent.headers["authorization"] == "Bearer secret-1" and sent.url.params["wait"] == "2.5"
    assert json.loads(sent.content)["quantity"] == "0.5"


def test_client_when_answer_is_a_problem_raises_api_error_with_status_code_and_fields() -> None:
    def server(_: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, headers={"Retry-After": "3", "Content-Type": "application/problem+json"},
            json={"type": "/problems/backpressure", "title": "Too Many Requests", "status": 429,
                  "detail": "behind", "code": "backpressure"},
        )

    with Client("http://gw", "k", transport=httpx.MockTransport(server)) as zvt, pytest.raises(ApiError) as info:
        zvt.get_order("o-1")
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "backpressure", 3.0)


def test_client_when_no_arguments_reads_url_and_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_GATEWAY_URL", "http://from-env:9000")
    monkeypatch.setenv("ZVT_API_KEY", "env-key")
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"portfolio_id": "p", "balances": {"USDT": "1.5"}, "positions": []})

    with Client(transport=httpx.MockTransport(server)) as zvt:
        assert zvt.get_portfolio("p/1")["balances"] == {"USDT": Decimal("1.5")}
    assert str(seen[0].url) == "http://from-env:9000/v1/portfolios/p%2F1"
    assert seen[0].headers["authorization"] == "Bearer env-key"
