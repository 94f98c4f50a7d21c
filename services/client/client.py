"""``Client`` and ``AsyncClient``: the same calls, one over ``httpx.Client``, one over
``httpx.AsyncClient``. Each call is described once (``_Call``) and parsed once.

Connections and retries (docs/api.md, "The Python client"):

- an idle pooled connection is reused for at most ``keepalive_expiry`` seconds (2 s by
  default), well below the gateway's keep-alive (``ZVT_GATEWAY_KEEP_ALIVE_S``, 75 s), so the
  client never picks a connection the server is closing for being idle at that very moment;
- a call that is safe to repeat (``place_order``, whose ``client_order_id`` makes a repeat
  return the same order; every ``GET``; the ``PUT`` s) is sent again after a transport error
  in which the answer was lost (connection refused, reset or closed before the answer,
  connect timeout): at most ``retries`` more times (2 by default), after 0.05 s, 0.1 s, ...
  with jitter. A read timeout is not retried (the time is spent). Other calls (creating or
  revoking a key, cancelling, starting a rebalance) are never repeated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from services.client.models import ApiError, OrderRequest, OrderResult, decimals

__all__ = ["AsyncClient", "Client"]

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8080"
KEEPALIVE_EXPIRY_S = 2.0
"""Longest an idle pooled connection is reused: well below the gateway's keep-alive (75 s)
and any usual proxy's, so a reused connection is never one the server is just closing."""
RETRIES = 2
"""Repeats of a repeatable call after a transport error that lost its answer."""

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
"""Transport errors after which the request may or may not have reached the gateway, and no
answer came: a repeatable call is sent again. ``ReadTimeout`` is not among them."""


def _backoff(attempt: int) -> float:
    """0.05 s, 0.1 s, 0.2 s, ... (at most 1 s), with up to 50 % jitter."""
    base: float = min(1.0, 0.05 * 2**attempt)
    return base * (0.5 + random.random() / 2)


@dataclasses.dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    repeatable: bool = False
    """Safe to send again when its answer was lost: idempotent on the gateway."""

    def __post_init__(self) -> None:
        if self.method in ("GET", "PUT"):
            object.__setattr__(self, "repeatable", True)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    retry = response.headers.get("retry-after")
    raise ApiError(
        response.status_code,
        str(body.get("code") or f"http_{response.status_code}"),
        str(body.get("detail") or response.reason_phrase),
        errors=body.get("errors"),
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )


def _order(response: httpx.Response) -> OrderResult:
    return OrderResult.from_json(response.json(), response.status_code)


def _json(response: httpx.Response) -> Any:
    return decimals(response.json())


def _orders(response: httpx.Response) -> list[OrderResult]:
    return [OrderResult.from_json(o) for o in response.json()["orders"]]


def _nothing(_: httpx.Response) -> None:
    return None


def _seg(value: str) -> str:
    return quote(value, safe="")


class _Calls:
    """Every API call, described; the two clients run them."""

    @staticmethod
    def place_order(request: OrderRequest, wait: float | None, durable: bool = False) -> _Call[OrderResult]:
        params: dict[str, Any] = {"wait": wait} if wait is not None else {}
        if durable:
            params["durable"] = "true"
        # idempotent by client_order_id: the same body again returns the same order (200)
        return _Call("POST", "/v1/orders", _order, json=request.to_json(), params=params or None, repeatable=True)

    @staticmethod
    def rebalance(portfolio_id: str, targets: Mapping[str, Decimal | str], all_or_nothing: bool) -> _Call[str]:
        body = {"targets": {k: str(v) for k, v in targets.items()}, "all_or_nothing": all_or_nothing}
        return _Call("POST", f"/v1/portfolios/{_seg(portfolio_id)}/rebalance", lambda r: str(r.json()["run_id"]),
                     json=body)

    @staticmethod
    def workflow(run_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/workflows/{_seg(run_id)}", lambda r: dict(r.json()))

    @staticmethod
    def get_order(order_id: str) -> _Call[OrderResult]:
        return _Call("GET", f"/v1/orders/{_seg(order_id)}", _order)

    @staticmethod
    def cancel_order(order_id: str) -> _Call[OrderResult]:
        return _Call("DELETE", f"/v1/orders/{_seg(order_id)}", _order)

    @staticmethod
    def put_portfolio(
        portfolio_id: str, base_currency: str, balances: Mapping[str, Decimal | str] | None,
        limits: Mapping[str, Any] | None,
    ) -> _Call[Any]:
        body: dict[str, Any] = {
            "base_currency": base_currency,
            "balances": {k: format(Decimal(str(v)), "f") for k, v in (balances or {}).items()},
        }
        if limits is not None:
            body["limits"] = {k: (format(v, "f") if isinstance(v, Decimal) else v) for k, v in limits.items()}
        return _Call("PUT", f"/v1/portfolios/{_seg(portfolio_id)}", _json, json=body)

    @staticmethod
    def get_portfolio(portfolio_id: str) -> _Call[Any]:
        return _Call("GET", f"/v1/portfolios/{_seg(portfolio_id)}", _json)

    @staticmethod
    def set_trading_state(portfolio_id: str, state: str) -> _Call[Any]:
        return _Call("PUT", f"/v1/portfolios/{_seg(portfolio_id)}/trading-state", _json, json={"state": state})

    @staticmethod
    def positions(portfolio_id: str) -> _Call[Any]:
        return _Call("GET", f"/v1/portfolios/{_seg(portfolio_id)}/positions", lambda r: _json(r)["positions"])

    @staticmethod
    def orders(portfolio_id: str, status: str | None, limit: int) -> _Call[list[OrderResult]]:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        return _Call("GET", f"/v1/portfolios/{_seg(portfolio_id)}/orders", _orders, params=params)

    @staticmethod
    def create_api_key(name: str, portfolios: Sequence[str] | str, scopes: Sequence[str]) -> _Call[Any]:
        body = {"name": name, "portfolios": portfolios if isinstance(portfolios, str) else list(portfolios),
                "scopes": list(scopes)}
        return _Call("POST", "/v1/api-keys", lambda r: r.json(), json=body)

    @staticmethod
    def revoke_api_key(key_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/api-keys/{_seg(key_id)}", _nothing)

    @staticmethod
    def events(correlation_id: str) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/events", lambda r: list(r.json()["events"]), params={"correlation_id": correlation_id})


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = base_url or os.environ.get("ZVT_GATEWAY_URL") or DEFAULT_URL
    key = api_key or os.environ.get("ZVT_API_KEY")
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return url, headers


class Client:
    """Synchronous client. ``transport`` lets tests plug an ``httpx`` transport in.

    ``keepalive_expiry``: longest an idle connection is reused (keep it well below the
    server's keep-alive); ``retries``: how many times a repeatable call is sent again after a
    transport error lost its answer (0: never)."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 40.0,
        transport: httpx.BaseTransport | None = None, keepalive_expiry: float = KEEPALIVE_EXPIRY_S,
        retries: int = RETRIES,
    ) -> None:
        url, headers = _settings(base_url, api_key)
        self.retries = max(0, retries)
        self._http = httpx.Client(
            base_url=url, headers=headers, timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=keepalive_expiry),
        )

    def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=call.params)
                break
            except _RETRYABLE:
                if not call.repeatable or attempt >= self.retries:
                    raise
            time.sleep(_backoff(attempt))
            attempt += 1
        _raise_for(response)
        return call.parse(response)

    def place_order(self, request: OrderRequest, *, wait: float | None = None, durable: bool = False) -> OrderResult:
        """Submit an order. Safe to repeat with the same request (same ``client_order_id``):
        the gateway returns the order made the first time (``200``). So when a transport error
        loses the answer (the connection refused, reset or closed under the request), the
        client sends it again by itself, up to ``retries`` times with a short backoff; it
        raises the error only when every try failed. ``durable``: through the
        ``trading.place_order`` workflow instead of the streams."""
        return self._run(_Calls.place_order(request, wait, durable))

    def workflow(self, run_id: str) -> dict[str, Any]:
        """A workflow run: status and result."""
        return self._run(_Calls.workflow(run_id))

    def rebalance(self, portfolio_id: str, targets: Mapping[str, Decimal | str], *, all_or_nothing: bool = False) -> str:
        """Start ``portfolio.rebalance``; its run id (follow it with ``workflow``)."""
        return self._run(_Calls.rebalance(portfolio_id, targets, all_or_nothing))

    def get_order(self, order_id: str) -> OrderResult:
        return self._run(_Calls.get_order(order_id))

    def cancel_order(self, order_id: str) -> OrderResult:
        return self._run(_Calls.cancel_order(order_id))

    def put_portfolio(
        self, portfolio_id: str, *, base_currency: str = "USDT", balances: Mapping[str, Decimal | str] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> Any:
        return self._run(_Calls.put_portfolio(portfolio_id, base_currency, balances, limits))

    def get_portfolio(self, portfolio_id: str) -> Any:
        return self._run(_Calls.get_portfolio(portfolio_id))

    def set_trading_state(self, portfolio_id: str, state: str) -> Any:
        return self._run(_Calls.set_trading_state(portfolio_id, state))

    def positions(self, portfolio_id: str) -> Any:
        return self._run(_Calls.positions(portfolio_id))

    def orders(self, portfolio_id: str, *, status: str | None = None, limit: int = 50) -> list[OrderResult]:
        return self._run(_Calls.orders(portfolio_id, status, limit))

    def create_api_key(self, name: str, *, portfolios: Sequence[str] | str, scopes: Sequence[str]) -> Any:
        return self._run(_Calls.create_api_key(name, portfolios, scopes))

    def revoke_api_key(self, key_id: str) -> None:
        self._run(_Calls.revoke_api_key(key_id))

    def events(self, correlation_id: str) -> list[dict[str, Any]]:
        return self._run(_Calls.events(correlation_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client, the same calls, connection reuse and retries as ``Client``."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 40.0,
        transport: httpx.AsyncBaseTransport | None = None, keepalive_expiry: float = KEEPALIVE_EXPIRY_S,
        retries: int = RETRIES,
    ) -> None:
        url, headers = _settings(base_url, api_key)
        self.retries = max(0, retries)
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=keepalive_expiry),
        )

    async def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params)
                break
            except _RETRYABLE:
                if not call.repeatable or attempt >= self.retries:
                    raise
            await asyncio.sleep(_backoff(attempt))
            attempt += 1
        _raise_for(response)
        return call.parse(response)

    async def place_order(self, request: OrderRequest, *, wait: float | None = None, durable: bool = False) -> OrderResult:
        """Submit an order; repeated by itself after a transport error lost the answer, as
        ``Client.place_order`` describes (same ``client_order_id``: the same order back)."""
        return await self._run(_Calls.place_order(request, wait, durable))

    async def workflow(self, run_id: str) -> dict[str, Any]:
        return await self._run(_Calls.workflow(run_id))

    async def rebalance(self, portfolio_id: str, targets: Mapping[str, Decimal | str], *,
                        all_or_nothing: bool = False) -> str:
        """Start ``portfolio.rebalance``; its run id (follow it with ``workflow``)."""
        return await self._run(_Calls.rebalance(portfolio_id, targets, all_or_nothing))

    async def get_order(self, order_id: str) -> OrderResult:
        return await self._run(_Calls.get_order(order_id))

    async def cancel_order(self, order_id: str) -> OrderResult:
        return await self._run(_Calls.cancel_order(order_id))

    async def put_portfolio(
        self, portfolio_id: str, *, base_currency: str = "USDT", balances: Mapping[str, Decimal | str] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> Any:
        return await self._run(_Calls.put_portfolio(portfolio_id, base_currency, balances, limits))

    async def get_portfolio(self, portfolio_id: str) -> Any:
        return await self._run(_Calls.get_portfolio(portfolio_id))

    async def set_trading_state(self, portfolio_id: str, state: str) -> Any:
        return await self._run(_Calls.set_trading_state(portfolio_id, state))

    async def positions(self, portfolio_id: str) -> Any:
        return await self._run(_Calls.positions(portfolio_id))

    async def orders(self, portfolio_id: str, *, status: str | None = None, limit: int = 50) -> list[OrderResult]:
        return await self._run(_Calls.orders(portfolio_id, status, limit))

    async def create_api_key(self, name: str, *, portfolios: Sequence[str] | str, scopes: Sequence[str]) -> Any:
        return await self._run(_Calls.create_api_key(name, portfolios, scopes))

    async def revoke_api_key(self, key_id: str) -> None:
        await self._run(_Calls.revoke_api_key(key_id))

    async def events(self, correlation_id: str) -> list[dict[str, Any]]:
        return await self._run(_Calls.events(correlation_id))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()
