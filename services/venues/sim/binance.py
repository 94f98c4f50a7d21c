"""The part of Binance's REST API that ccxt's ``binance`` client uses for spot trading, with
its default options, backed by a ``PaperVenue`` (a spot-only account).

Public: ``GET /api/v3/ping``, ``time``, ``exchangeInfo``, ``ticker/24hr``, ``ticker/bookTicker``,
``depth``; ``GET /fapi/v1/exchangeInfo`` and ``/dapi/v1/exchangeInfo`` with no symbols (ccxt's
``load_markets`` reads the futures markets too). API key only: ``GET /sapi/v1/margin/allPairs``
and ``margin/isolated/allPairs``, both empty. Signed (``X-MBX-APIKEY`` header, ``timestamp`` within ``recvWindow``, and
``signature`` = hex HMAC-SHA256 of the query string followed by the form body, keyed by the
API secret): ``POST/DELETE/GET /api/v3/order``, ``GET /api/v3/openOrders``,
``GET /api/v3/myTrades`` (an order's executions, with the ids its ``FULL`` answer gave),
``GET /api/v3/account``, ``GET /sapi/v1/asset/tradeFee``, ``GET /sapi/v1/capital/config/getall``
(ccxt's currencies: the venue's assets and balances, tradable, no deposit or withdrawal
networks). Errors are Binance's ``{"code": -NNNN, "msg": ...}`` with its codes, so ccxt maps
them to its own exceptions; any other endpoint is 404 ``{"code": -1000, "msg": "unknown
endpoint ..."}``.

Simulation controls (not Binance; no signature), under ``/sim``: see ``docs/venues.md``.

- ``GET /sim/health`` (with ``requests``: API requests served so far); ``GET /sim/orders`` every order the venue holds, terminal ones too;
- ``POST /sim/price`` ``{"symbol": "BTC/USDT", "price": "61000"}`` moves the mid and fills
  the resting orders it reaches;
- ``POST /sim/faults`` ``{"kind": ..., "times": n, ...}`` queues faults for the next order
  placements: ``reject`` (-2010), ``accept_then_timeout`` (the order lands, the answer comes
  ``delay_s`` later, past the client's timeout), ``drop`` (the connection closes with no
  answer; ``after_accept`` says whether the order landed), ``rate_limit`` (429 or 418 with
  ``Retry-After``); ``{"kind": "down"}`` answers every request but ``/sim`` with a dropped
  connection until ``{"kind": "up"}``; ``{"kind": "clear"}`` empties the queue;
- ``POST /sim/fund`` ``{"USDT": "1000000", ...}`` sets free balances.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncio

from services.trading import OrderType, Side, TimeInForce
from services.venues.base import (
    InsufficientFunds,
    OrderNotFound,
    OrderRejected,
    VenueError,
    VenueOrder,
    VenueOrderRequest,
    VenueOrderStatus,
)
from services.venues.paper import PaperVenue
from services.venues.sim.http import DropConnection, HttpRequest, HttpResponse

__all__ = ["BinanceSim", "FAULT_KINDS", "binance_symbol"]

FAULT_KINDS = ("reject", "accept_then_timeout", "drop", "rate_limit")
_STATUS = {
    VenueOrderStatus.OPEN: "NEW",
    VenueOrderStatus.PARTIALLY_FILLED: "PARTIALLY_FILLED",
    VenueOrderStatus.FILLED: "FILLED",
    VenueOrderStatus.CANCELED: "CANCELED",
    VenueOrderStatus.REJECTED: "REJECTED",
    VenueOrderStatus.EXPIRED: "EXPIRED",
}
_TIF = {"GTC": TimeInForce.GTC, "IOC": TimeInForce.IOC, "FOK": TimeInForce.FOK}


def binance_symbol(symbol: str) -> str:
    """``BTC/USDT`` -> ``BTCUSDT``."""
    return symbol.replace("/", "")


class _ApiError(Exception):
    def __init__(self, status: int, code: int, msg: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg, self.headers = status, code, msg, headers


@dataclasses.dataclass(frozen=True, slots=True)
class _Fault:
    kind: str
    delay_s: float = 30.0
    after_accept: bool = False
    status: int = 429
    retry_after: float = 1.0


def _num(value: Decimal | None) -> str:
    return "0" if value is None else format(value, "f")


def _ms(at: Any) -> int:
    return int(at.timestamp() * 1000)


class BinanceSim:
    """One simulated Binance account: a request handler for ``services.venues.sim.http``."""

    def __init__(
        self,
        venue: PaperVenue,
        *,
        api_key: str,
        secret: str,
        recv_window_ms: int = 5000,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.venue = venue
        self.api_key = api_key
        self._secret = secret.encode()
        self.recv_window_ms = recv_window_ms
        self.now_ms = now_ms
        self.faults: collections.deque[_Fault] = collections.deque()
        self.down = False
        self.requests = 0
        self._ids: dict[str, int] = {}
        self._by_number: dict[int, str] = {}
        self._symbols = {binance_symbol(s): s for s in venue.markets_now()}
        self._routes: dict[tuple[str, str], Callable[[dict[str, str]], Any]] = {
            ("GET", "/api/v3/ping"): self._ping,
            ("GET", "/api/v3/time"): self._time,
            ("GET", "/api/v3/exchangeInfo"): self._exchange_info,
            ("GET", "/api/v3/ticker/24hr"): self._ticker,
            ("GET", "/api/v3/ticker/bookTicker"): self._book_ticker,
            ("GET", "/api/v3/depth"): self._depth,
            # ccxt's default load_markets also reads the futures markets: none here
            ("GET", "/fapi/v1/exchangeInfo"): self._futures_info,
            ("GET", "/dapi/v1/exchangeInfo"): self._futures_info,
        }
        # MARKET_DATA: the API key, no signature needed (ccxt signs them anyway)
        self._keyed: dict[tuple[str, str], Callable[[dict[str, str]], Any]] = {
            ("GET", "/sapi/v1/margin/allPairs"): self._no_margin,
            ("GET", "/sapi/v1/margin/isolated/allPairs"): self._no_margin,
        }
        self._signed: dict[tuple[str, str], Callable[[dict[str, str]], Any]] = {
            ("POST", "/api/v3/order"): self._new_order,
            ("DELETE", "/api/v3/order"): self._cancel_order,
            ("GET", "/api/v3/order"): self._get_order,
            ("GET", "/api/v3/openOrders"): self._open_orders,
            ("GET", "/api/v3/myTrades"): self._my_trades,
            ("GET", "/api/v3/account"): self._account,
            ("GET", "/sapi/v1/asset/tradeFee"): self._trade_fee,
            ("GET", "/sapi/v1/capital/config/getall"): self._coins,
        }

    # -- dispatch ----------------------------------------------------------------------------

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/sim/"):
            return await self._sim(request)
        self.requests += 1
        if self.down:
            raise DropConnection()
        key = (request.method, request.path)
        try:
            public = self._routes.get(key)
            if public is not None:
                return _ok(public(request.params()))
            keyed = self._keyed.get(key)
            if keyed is not None:
                self._check_key(request)
                return _ok(keyed(request.params()))
            signed = self._signed.get(key)
            if signed is None:
                raise _ApiError(404, -1000, f"unknown endpoint {request.method} {request.path}")
            params = self._authenticate(request)
            if key == ("POST", "/api/v3/order"):
                return await self._place(params)
            return _ok(signed(params))
        except _ApiError as exc:
            body = json.dumps({"code": exc.code, "msg": exc.msg}).encode()
            return HttpResponse(exc.status, body, exc.headers)

    def _check_key(self, request: HttpRequest) -> None:
        if request.headers.get("x-mbx-apikey") != self.api_key:
            raise _ApiError(401, -2015, "Invalid API-key, IP, or permissions for action.")

    def _authenticate(self, request: HttpRequest) -> dict[str, str]:
        self._check_key(request)
        signed = request.query_string
        body = request.body.decode()
        if body:
            signed = f"{signed}&{body}" if signed else body
        payload, sep, signature = signed.rpartition("&signature=")
        if not sep:
            if signed.startswith("signature="):
                payload, signature = "", signed[len("signature="):]
            else:
                raise _ApiError(400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.")
        expected = hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise _ApiError(400, -1022, "Signature for this request is not valid.")
        params = request.params()
        params.pop("signature", None)
        try:
            timestamp = int(params["timestamp"])
            window = int(params.get("recvWindow", self.recv_window_ms))
        except (KeyError, ValueError):
            raise _ApiError(400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.")
        now = self.now_ms()
        if timestamp > now + 1000 or now - timestamp > window:
            raise _ApiError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        return params

    # -- public ------------------------------------------------------------------------------

    def _ping(self, params: dict[str, str]) -> Any:
        return {}

    def _time(self, params: dict[str, str]) -> Any:
        return {"serverTime": self.now_ms()}

    def _exchange_info(self, params: dict[str, str]) -> Any:
        symbols = []
        for market in self.venue.markets_now().values():
            symbols.append({
                "symbol": binance_symbol(market.symbol),
                "status": "TRADING",
                "baseAsset": market.base,
                "baseAssetPrecision": 8,
                "quoteAsset": market.quote,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT", "MARKET"],
                "icebergAllowed": False,
                "ocoAllowed": False,
                "quoteOrderQtyMarketAllowed": False,
                "allowTrailingStop": False,
                "cancelReplaceAllowed": False,
                "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": [
                    {"filterType": "PRICE_FILTER", "minPrice": _num(market.price_step),
                     "maxPrice": "10000000.00000000", "tickSize": _num(market.price_step)},
                    {"filterType": "LOT_SIZE", "minQty": _num(market.min_quantity),
                     "maxQty": "100000.00000000", "stepSize": _num(market.quantity_step)},
                    {"filterType": "NOTIONAL", "minNotional": _num(market.min_notional),
                     "applyMinToMarket": True, "maxNotional": "90000000.00000000", "applyMaxToMarket": False,
                     "avgPriceMins": 5},
                ],
                "permissions": [],
                "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "NONE",
                "allowedSelfTradePreventionModes": ["NONE"],
            })
        return {"timezone": "UTC", "serverTime": self.now_ms(), "rateLimits": [], "exchangeFilters": [],
                "symbols": symbols}

    def _futures_info(self, params: dict[str, str]) -> Any:
        return {"timezone": "UTC", "serverTime": self.now_ms(), "rateLimits": [], "exchangeFilters": [],
                "assets": [], "symbols": []}

    def _no_margin(self, params: dict[str, str]) -> Any:
        return []

    def _symbol(self, params: dict[str, str]) -> str:
        raw = params.get("symbol")
        if not raw:
            raise _ApiError(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        symbol = self._symbols.get(raw)
        if symbol is None:
            raise _ApiError(400, -1121, "Invalid symbol.")
        return symbol

    def _ticker(self, params: dict[str, str]) -> Any:
        if "symbol" not in params:
            return [self._ticker_of(s) for s in self._symbols.values()]
        return self._ticker_of(self._symbol(params))

    def _ticker_of(self, symbol: str) -> Any:
        book = self.venue.book_now(symbol, 1)
        bid, ask = book.bids[0], book.asks[0]
        last = self.venue.last_now(symbol)
        now = self.now_ms()
        return {
            "symbol": binance_symbol(symbol), "priceChange": "0", "priceChangePercent": "0",
            "weightedAvgPrice": _num(last), "prevClosePrice": _num(last), "lastPrice": _num(last), "lastQty": "0",
            "bidPrice": _num(bid.price), "bidQty": _num(bid.quantity), "askPrice": _num(ask.price),
            "askQty": _num(ask.quantity), "openPrice": _num(last), "highPrice": _num(last), "lowPrice": _num(last),
            "volume": "0", "quoteVolume": "0", "openTime": now - 86_400_000, "closeTime": now,
            "firstId": -1, "lastId": -1, "count": 0,
        }

    def _book_ticker(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        book = self.venue.book_now(symbol, 1)
        return {"symbol": binance_symbol(symbol), "bidPrice": _num(book.bids[0].price),
                "bidQty": _num(book.bids[0].quantity), "askPrice": _num(book.asks[0].price),
                "askQty": _num(book.asks[0].quantity)}

    def _depth(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        try:
            limit = int(params.get("limit", "100"))
        except ValueError:
            raise _ApiError(400, -1100, "Illegal characters found in parameter 'limit'.")
        book = self.venue.book_now(symbol, max(1, min(limit, 5000)))
        return {
            "lastUpdateId": self.requests,
            "bids": [[_num(p), _num(q)] for p, q in book.bids],
            "asks": [[_num(p), _num(q)] for p, q in book.asks],
        }

    # -- signed ------------------------------------------------------------------------------

    async def _place(self, params: dict[str, str]) -> HttpResponse:
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind == "rate_limit":
            raise _ApiError(
                fault.status, -1003, "Too many requests; simulated rate limit.",
                (("Retry-After", str(int(fault.retry_after) if fault.retry_after >= 1 else 1)),),
            )
        if fault is not None and fault.kind == "reject":
            raise _ApiError(400, -2010, "New order rejected (simulated).")
        if fault is not None and fault.kind == "drop" and not fault.after_accept:
            raise DropConnection()
        response = _ok(self._new_order(params))
        if fault is not None and fault.kind == "drop":
            raise DropConnection()
        if fault is not None and fault.kind == "accept_then_timeout":
            await asyncio.sleep(fault.delay_s)
        return response

    def _new_order(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        side = {"BUY": Side.BUY, "SELL": Side.SELL}.get(params.get("side", ""))
        order_type = {"MARKET": OrderType.MARKET, "LIMIT": OrderType.LIMIT}.get(params.get("type", ""))
        if side is None or order_type is None:
            raise _ApiError(400, -1102, "Mandatory parameter 'side' or 'type' was not sent, or is not supported.")
        client_id = params.get("newClientOrderId") or f"sim-{self.requests}"
        tif = _TIF.get(params.get("timeInForce", "GTC"))
        if tif is None:
            raise _ApiError(400, -1100, "Illegal characters found in parameter 'timeInForce'.")
        quantity = _decimal(params, "quantity")
        price = _decimal(params, "price") if order_type is OrderType.LIMIT else None
        if quantity is None or (order_type is OrderType.LIMIT and price is None):
            raise _ApiError(400, -1102, "Mandatory parameter 'quantity' or 'price' was not sent.")
        request = VenueOrderRequest(
            client_order_id=client_id, symbol=symbol, side=side, order_type=order_type, quantity=quantity,
            price=price, time_in_force=tif if order_type is OrderType.LIMIT else TimeInForce.IOC,
        )
        try:
            order = self.venue.submit_now(request)
        except InsufficientFunds:
            raise _ApiError(400, -2010, "Account has insufficient balance for requested action.")
        except OrderRejected as exc:
            if "already used" in str(exc):
                raise _ApiError(400, -2010, "Duplicate order sent.")
            raise _ApiError(400, -1013, f"Filter failure: {exc}")
        body = self._order(order)
        body["transactTime"] = _ms(order.created_at)
        if params.get("newOrderRespType", "FULL") == "FULL":
            body["fills"] = [
                {"price": _num(f.price), "qty": _num(f.quantity), "commission": _num(f.fee),
                 "commissionAsset": f.fee_asset, "tradeId": int(f.fill_id.rsplit("-", 1)[1])}
                for f in order.fills
            ]
        return body

    def _lookup(self, params: dict[str, str]) -> tuple[str, str | None, str | None]:
        symbol = self._symbol(params)
        order_id = params.get("orderId")
        client_id = params.get("origClientOrderId")
        if not order_id and not client_id:
            raise _ApiError(400, -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!")
        venue_id = None
        if order_id:
            try:
                venue_id = self._by_number.get(int(order_id), "")
            except ValueError:
                raise _ApiError(400, -1100, "Illegal characters found in parameter 'orderId'.")
        return symbol, venue_id, client_id

    def _get_order(self, params: dict[str, str]) -> Any:
        symbol, venue_id, client_id = self._lookup(params)
        try:
            return self._order(self.venue.find_now(symbol, venue_order_id=venue_id, client_order_id=client_id))
        except OrderNotFound:
            raise _ApiError(400, -2013, "Order does not exist.")

    def _cancel_order(self, params: dict[str, str]) -> Any:
        symbol, venue_id, client_id = self._lookup(params)
        try:
            order = self.venue.find_now(symbol, venue_order_id=venue_id, client_order_id=client_id)
        except OrderNotFound:
            raise _ApiError(400, -2011, "Unknown order sent.")
        if order.is_terminal:
            raise _ApiError(400, -2011, "Unknown order sent.")
        return self._order(self.venue.cancel_now(symbol, venue_order_id=order.venue_order_id))

    def _open_orders(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params) if "symbol" in params else None
        return [self._order(o) for o in self.venue.open_orders_now(symbol)]

    def _my_trades(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        order_id = params.get("orderId")
        trades = []
        for order in self.venue.all_orders_now():
            if order.symbol != symbol or not order.fills:
                continue
            number = self._order(order)["orderId"]
            if order_id and str(number) != order_id:
                continue
            for f in order.fills:
                trades.append({
                    "symbol": binance_symbol(symbol), "id": int(f.fill_id.rsplit("-", 1)[1]), "orderId": number,
                    "orderListId": -1, "price": _num(f.price), "qty": _num(f.quantity),
                    "quoteQty": _num(f.price * f.quantity), "commission": _num(f.fee),
                    "commissionAsset": f.fee_asset, "time": _ms(f.at), "isBuyer": order.side is Side.BUY,
                    "isMaker": f.liquidity.value == "maker", "isBestMatch": True,
                })
        return sorted(trades, key=lambda t: t["id"])

    def _account(self, params: dict[str, str]) -> Any:
        balances = self.venue.balances_now()
        return {
            "makerCommission": 0, "takerCommission": 0, "buyerCommission": 0, "sellerCommission": 0,
            "commissionRates": {"maker": "0", "taker": "0", "buyer": "0", "seller": "0"},
            "canTrade": True, "canWithdraw": False, "canDeposit": False, "brokered": False,
            "requireSelfTradePrevention": False, "preventSor": False, "updateTime": self.now_ms(),
            "accountType": "SPOT",
            "balances": [{"asset": a, "free": _num(b.free), "locked": _num(b.used)} for a, b in balances.items()],
            "permissions": ["SPOT"], "uid": 1,
        }

    def _coins(self, params: dict[str, str]) -> Any:
        """Every asset the venue trades or holds, as ``capital/config/getall`` lists coins:
        tradable, no deposit or withdrawal networks (a spot-only simulated account)."""
        balances = self.venue.balances_now()
        assets = {a for m in self.venue.markets_now().values() for a in (m.base, m.quote)} | set(balances)
        coins = []
        for asset in sorted(assets):
            balance = balances.get(asset)
            coins.append({
                "coin": asset, "name": asset, "depositAllEnable": False, "withdrawAllEnable": False,
                "free": _num(balance.free if balance else None), "locked": _num(balance.used if balance else None),
                "freeze": "0", "withdrawing": "0", "ipoing": "0", "ipoable": "0", "storage": "0",
                "isLegalMoney": False, "trading": True, "networkList": [],
            })
        return coins

    def _trade_fee(self, params: dict[str, str]) -> Any:
        markets = self.venue.markets_now()
        if "symbol" in params:
            markets = {s: m for s, m in markets.items() if s == self._symbol(params)}
        return [
            {"symbol": binance_symbol(m.symbol), "makerCommission": _num(m.maker_fee),
             "takerCommission": _num(m.taker_fee)}
            for m in markets.values()
        ]

    def _order(self, order: VenueOrder) -> dict[str, Any]:
        number = self._ids.get(order.venue_order_id)
        if number is None:
            number = int(order.venue_order_id.rsplit("-", 1)[1])
            self._ids[order.venue_order_id] = number
            self._by_number[number] = order.venue_order_id
        with_fills_notional = sum((f.price * f.quantity for f in order.fills), Decimal(0))
        return {
            "symbol": binance_symbol(order.symbol), "orderId": number, "orderListId": -1,
            "clientOrderId": order.client_order_id, "price": _num(order.price or Decimal(0)),
            "origQty": _num(order.quantity), "executedQty": _num(order.filled_quantity),
            "cummulativeQuoteQty": _num(with_fills_notional), "status": _STATUS[order.status],
            "timeInForce": order.time_in_force.value.upper(), "type": order.order_type.value.upper(),
            "side": order.side.value.upper(), "stopPrice": "0", "icebergQty": "0",
            "time": _ms(order.created_at), "updateTime": _ms(order.updated_at),
            "isWorking": not order.is_terminal, "workingTime": _ms(order.created_at),
            "origQuoteOrderQty": "0", "selfTradePreventionMode": "NONE",
        }

    # -- simulation controls -----------------------------------------------------------------

    async def _sim(self, request: HttpRequest) -> HttpResponse:
        try:
            body: Any = json.loads(request.body) if request.body else {}
        except ValueError:
            return _problem("the body is not JSON")
        path = request.path
        if path == "/sim/health":
            return _ok({"name": self.venue.name, "down": self.down, "faults": len(self.faults),
                        "requests": self.requests})
        if path == "/sim/orders":
            orders = [self._order(o) for o in self.venue.all_orders_now()]
            return _ok({"orders": orders})
        if not isinstance(body, dict):
            return _problem("the body must be a JSON object")
        if path == "/sim/price":
            try:
                symbol, price = str(body["symbol"]), Decimal(str(body["price"]))
                filled = self.venue.set_price(symbol, price)
            except (KeyError, InvalidOperation, ValueError, VenueError) as exc:
                return _problem(f"bad price update: {exc!r}")
            return _ok({"filled": [o.client_order_id for o in filled]})
        if path == "/sim/fund":
            try:
                self.venue.fund({str(k): Decimal(str(v)) for k, v in body.items()})
            except (InvalidOperation, ValueError) as exc:
                return _problem(f"bad balances: {exc}")
            return _ok({})
        if path == "/sim/faults":
            return self._set_faults(body)
        return _problem(f"unknown simulation control {path}", 404)

    def _set_faults(self, body: Mapping[str, Any]) -> HttpResponse:
        kind = body.get("kind")
        if kind == "down":
            self.down = True
        elif kind == "up":
            self.down = False
        elif kind == "clear":
            self.faults.clear()
        elif kind in FAULT_KINDS:
            try:
                times = int(body.get("times", 1))
                fault = _Fault(
                    kind=str(kind),
                    delay_s=float(body.get("delay_s", 30.0)),
                    after_accept=bool(body.get("after_accept", False)),
                    status=int(body.get("status", 429)),
                    retry_after=float(body.get("retry_after", 1.0)),
                )
            except (TypeError, ValueError) as exc:
                return _problem(f"bad fault: {exc}")
            if times < 1 or fault.status not in (418, 429) or fault.delay_s < 0:
                return _problem("times must be >= 1, status 418 or 429, delay_s >= 0")
            self.faults.extend([fault] * times)
        else:
            return _problem(f"kind must be one of {', '.join(FAULT_KINDS + ('down', 'up', 'clear'))}, got {kind!r}")
        return _ok({"down": self.down, "faults": len(self.faults)})


def _decimal(params: Mapping[str, str], name: str) -> Decimal | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _ApiError(400, -1100, f"Illegal characters found in parameter '{name}'.")
    if not value.is_finite():
        raise _ApiError(400, -1100, f"Illegal characters found in parameter '{name}'.")
    return value


def _ok(body: Any) -> HttpResponse:
    return HttpResponse(200, json.dumps(body).encode())


def _problem(detail: str, status: int = 400) -> HttpResponse:
    return HttpResponse(status, json.dumps({"detail": detail}).encode())
