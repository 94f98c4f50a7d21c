"""``CcxtVenue``: a real exchange account through ccxt's async client.

- One ccxt client per (venue, account) per process (``shared_client``), reused by every
  adapter object for that account; numbers come back as strings (``number = str``) and
  become ``Decimal`` here, never floats.
- Our client order id rides on every order (``newClientOrderId`` on Binance), so an order is
  found again by it (``fetch_order(client_order_id=...)``). A lookup of an order that has
  filled lists its executions (``fetch_my_trades`` by order id), so its fills carry the same
  venue fill ids the submit's answer gave; only a venue that will not list them gets one
  aggregate fill (``VenueFill.aggregate``).
- Amounts are floored to the market's quantity step, prices rounded to its price step,
  before they leave.
- ``ERRORS`` maps each ccxt exception to what it means for us. ``create_order`` is never
  retried blindly: a timeout or a connection lost after the request went out is
  ``UnknownOutcome``, which ``submit`` resolves itself by looking the order up by client
  order id (``resolve_s``); only if the venue cannot answer either does ``UnknownOutcome``
  reach the caller. Reads are retried (``read_attempts``).
- Requests spend tokens of the account's bucket (``AccountLimiter``, shared through Redis by
  every process); a 418/429 opens the account's breaker for the venue's ``Retry-After``, and
  ``breaker_failures`` unreachable calls in a row open it for ``breaker_cooldown_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import ccxt.async_support as ccxt_async
from ccxt.base import errors as ccxt_errors

from services.core.events import utcnow
from services.core.keys import Keys
from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.money import ZERO, money_context
from services.venues.base import (
    Balance,
    BookLevel,
    Clock,
    InsufficientFunds,
    Market,
    OrderBook,
    OrderNotFound,
    OrderRejected,
    RateLimited,
    Ticker,
    UnknownOutcome,
    VenueError,
    VenueFill,
    VenueOrder,
    VenueOrderRequest,
    VenueOrderStatus,
    VenueUnavailable,
)
from services.venues.limits import AccountBreaker, AccountLimiter

__all__ = [
    "ERRORS", "CcxtVenue", "CcxtVenueConfig", "ErrorClass", "api_urls_at", "close_shared_clients", "shared_client",
]


class ErrorClass(enum.Enum):
    RETRY = "retry"
    """Not applied; the same call may be made again (reads are, writes are not)."""
    UNKNOWN = "unknown"
    """A write may or may not have been applied: resolve by lookup. A read: retry."""
    REJECTED = "rejected"
    """Terminal: the venue refused the request as it is."""
    FUNDS = "funds"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    """Not applied; back off for Retry-After and open the account's breaker."""
    UNAVAILABLE = "unavailable"
    """Not applied (could not connect, maintenance, bad credentials): counts toward the breaker."""


ERRORS: tuple[tuple[type[Exception], ErrorClass], ...] = (
    # most specific first: the first match wins
    (ccxt_errors.OrderNotFound, ErrorClass.NOT_FOUND),
    (ccxt_errors.InsufficientFunds, ErrorClass.FUNDS),
    (ccxt_errors.DuplicateOrderId, ErrorClass.REJECTED),
    (ccxt_errors.InvalidOrder, ErrorClass.REJECTED),
    (ccxt_errors.BadSymbol, ErrorClass.REJECTED),
    (ccxt_errors.BadRequest, ErrorClass.REJECTED),
    (ccxt_errors.AuthenticationError, ErrorClass.UNAVAILABLE),
    (ccxt_errors.RateLimitExceeded, ErrorClass.RATE_LIMITED),
    (ccxt_errors.DDoSProtection, ErrorClass.RATE_LIMITED),
    (ccxt_errors.InvalidNonce, ErrorClass.RETRY),
    (ccxt_errors.RequestTimeout, ErrorClass.UNKNOWN),
    (ccxt_errors.OnMaintenance, ErrorClass.UNAVAILABLE),
    # ExchangeNotAvailable: UNAVAILABLE if the connection was never made, else UNKNOWN (_classify)
    (ccxt_errors.ExchangeNotAvailable, ErrorClass.UNKNOWN),
    (ccxt_errors.NetworkError, ErrorClass.UNKNOWN),
    (ccxt_errors.BadResponse, ErrorClass.UNKNOWN),
    (ccxt_errors.OperationRejected, ErrorClass.REJECTED),
    (ccxt_errors.ExchangeError, ErrorClass.REJECTED),
    (ccxt_errors.BaseError, ErrorClass.UNKNOWN),
)
"""What each ccxt error means, most specific first. See ``docs/venues.md``."""


def _classify(exc: Exception) -> ErrorClass:
    for kind, cls in ERRORS:
        if isinstance(exc, kind):
            if cls is ErrorClass.UNKNOWN and isinstance(exc, ccxt_errors.ExchangeNotAvailable):
                # aiohttp could not connect at all: the request never left.
                if isinstance(exc.__cause__, aiohttp.ClientConnectorError):
                    return ErrorClass.UNAVAILABLE
            return cls
    return ErrorClass.UNKNOWN


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CcxtVenueConfig:
    name: str
    """The venue's name in the platform (routing, events)."""
    exchange: str = "binance"
    """The ccxt exchange id."""
    account: str = "default"
    api_key: str = dataclasses.field(repr=False)
    secret: str = dataclasses.field(repr=False)
    api_url: str | None = None
    """Base URL overriding the exchange's (a simulated venue server: ``http://127.0.0.1:9101``)."""
    timeout_s: float = 5.0
    rate_per_s: float = 50.0
    burst: int = 100
    breaker_failures: int = 3
    breaker_cooldown_s: float = 5.0
    read_attempts: int = 3
    resolve_s: float = 10.0
    """How long ``submit`` keeps looking up an order whose submit outcome is unknown."""


_CLIENTS: dict[tuple[str, str], Any] = {}


def shared_client(config: CcxtVenueConfig) -> Any:
    """The process's ccxt client for (venue, account), created on first use."""
    key = (config.name, config.account)
    client = _CLIENTS.get(key)
    if client is None:
        cls = getattr(ccxt_async, config.exchange, None)
        if cls is None:
            raise ValueError(f"ccxt has no exchange {config.exchange!r}")
        client = cls(
            {
                "apiKey": config.api_key,
                "secret": config.secret,
                "enableRateLimit": False,  # the shared AccountLimiter paces requests
                "timeout": int(config.timeout_s * 1000),
                "options": {
                    "defaultType": "spot",
                    # Spot markets only, no currencies, no margin pairs: one request per
                    # load_markets (exchangeInfo) instead of ccxt's default seven (futures
                    # exchangeInfo twice, capital/config/getall, margin pairs three times),
                    # none of which the platform uses. The simulated server serves those too.
                    "fetchMarkets": {"types": ["spot"]},
                    "fetchCurrencies": False,
                    "fetchMargins": False,
                    "adjustForTimeDifference": False,
                    "warnOnFetchOpenOrdersWithoutSymbol": False,
                },
            }
        )
        client.number = str
        if config.api_url is not None:
            client.urls["api"] = api_urls_at(config.api_url, client.urls["api"])
        _CLIENTS[key] = client
    return client


def api_urls_at(base: str, urls: Mapping[str, Any]) -> dict[str, Any]:
    """Every API URL of a ccxt client moved to ``base``, paths kept
    (``https://fapi.binance.com/fapi/v1`` -> ``http://127.0.0.1:9101/fapi/v1``), so no
    request for any endpoint goes to the real exchange."""
    base = base.rstrip("/")
    return {
        name: base + urlsplit(url).path if isinstance(url, str) else api_urls_at(base, url) if isinstance(url, Mapping)
        else url
        for name, url in urls.items()
    }


async def close_shared_clients() -> None:
    clients = list(_CLIENTS.values())
    _CLIENTS.clear()
    for client in clients:
        await client.close()


def _dec(value: Any, default: Decimal | None = None) -> Decimal | None:
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def _to_step(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    with money_context():
        return ((value / step).to_integral_value(rounding=rounding) * step).normalize() + ZERO


_STATUS = {"closed": VenueOrderStatus.FILLED, "canceled": VenueOrderStatus.CANCELED,
           "expired": VenueOrderStatus.EXPIRED, "rejected": VenueOrderStatus.REJECTED}


class CcxtVenue:
    """One exchange account through ccxt. Implements ``services.venues.Venue``."""

    def __init__(
        self, config: CcxtVenueConfig, *, redis: Any | None = None, keys: Keys | None = None, clock: Clock = utcnow
    ) -> None:
        self.config = config
        self.client = shared_client(config)
        self.limiter = AccountLimiter(redis, keys, config.name, config.account, rate=config.rate_per_s,
                                      burst=config.burst)
        self.breaker = AccountBreaker(redis, keys, config.name, config.account,
                                      failures=config.breaker_failures, cooldown_s=config.breaker_cooldown_s)
        self._clock = clock
        self._markets: dict[str, Market] = {}
        self.calls = 0
        self.unknown_outcomes = 0
        """Submits whose answer was lost (each then resolved by lookup, or raised)."""

    @property
    def name(self) -> str:
        return self.config.name

    async def healthy(self) -> bool:
        return not await self.breaker.is_open()

    # -- the protocol ------------------------------------------------------------------------

    async def markets(self) -> dict[str, Market]:
        if not self._markets:
            self._markets = await self._load_markets(reload=False)
        return dict(self._markets)

    async def reload_markets(self) -> dict[str, Market]:
        """The markets as the venue lists them now; ``markets()`` answers with them from then on."""
        self._markets = await self._load_markets(reload=True)
        return dict(self._markets)

    async def _load_markets(self, *, reload: bool) -> dict[str, Market]:
        raw = await self._read(self.client.load_markets, reload)
        fees: Mapping[str, Any] = {}
        if self.client.has.get("fetchTradingFees"):
            fees = await self._read(self.client.fetch_trading_fees)
        out: dict[str, Market] = {}
        for symbol, m in raw.items():
            if not m.get("spot", True) or m.get("active") is False:
                continue
            fee = fees.get(symbol, m)
            limits = m.get("limits") or {}
            price_step = _dec(m["precision"]["price"])
            amount_step = _dec(m["precision"]["amount"])
            if price_step is None or amount_step is None:
                continue
            out[symbol] = Market(
                symbol=symbol, base=m["base"], quote=m["quote"], price_step=price_step,
                quantity_step=amount_step,
                min_quantity=_dec((limits.get("amount") or {}).get("min"), ZERO) or ZERO,
                min_notional=_dec((limits.get("cost") or {}).get("min"), ZERO) or ZERO,
                maker_fee=_dec(fee.get("maker"), ZERO) or ZERO, taker_fee=_dec(fee.get("taker"), ZERO) or ZERO,
            )
        return out

    async def submit(self, order: VenueOrderRequest) -> VenueOrder:
        if await self.breaker.is_open():
            raise VenueUnavailable("circuit breaker open", venue=self.name)
        market = (await self.markets()).get(order.symbol)
        if market is None:
            raise OrderRejected(f"unknown symbol {order.symbol}", venue=self.name)
        amount = _to_step(order.quantity, market.quantity_step, ROUND_FLOOR)
        price = _to_step(order.price, market.price_step, ROUND_HALF_EVEN) if order.price is not None else None
        if amount <= 0:
            raise OrderRejected(f"quantity {order.quantity} rounds to 0 at step {market.quantity_step}", venue=self.name)
        params: dict[str, Any] = {"newClientOrderId": order.client_order_id}
        if order.order_type is OrderType.LIMIT:
            params["timeInForce"] = order.time_in_force.value.upper()
        await self.limiter.acquire()
        self.calls += 1
        try:
            raw = await self.client.create_order(
                order.symbol, order.order_type.value, order.side.value, str(amount),
                str(price) if price is not None else None, params,
            )
        except Exception as exc:
            cls = _classify(exc)
            if cls is ErrorClass.REJECTED and "Duplicate order" in str(exc):
                return await self.fetch_order(order.symbol, client_order_id=order.client_order_id)
            if cls is not ErrorClass.UNKNOWN:
                raise await self._venue_error(exc, cls) from exc
            self.unknown_outcomes += 1
            return await self._resolve(order, exc)
        await self.breaker.success()
        return self._order(raw, order)

    async def cancel(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        venue_id = venue_order_id
        if venue_id is None:
            venue_id = (await self.fetch_order(symbol, client_order_id=client_order_id)).venue_order_id
        await self.limiter.acquire()
        self.calls += 1
        try:
            raw = await self.client.cancel_order(venue_id, symbol)
        except Exception as exc:
            cls = _classify(exc)
            if cls is ErrorClass.NOT_FOUND:
                # Binance answers "unknown order" for an order that already ended: look.
                return await self.fetch_order(symbol, venue_order_id=venue_id)
            raise await self._venue_error(exc, cls) from exc
        return self._order(raw, None)

    async def fetch_order(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        if venue_order_id is None and client_order_id is None:
            raise ValueError("pass venue_order_id or client_order_id")
        params = {} if venue_order_id is not None else {"origClientOrderId": client_order_id}
        raw = await self._read(self.client.fetch_order, venue_order_id, symbol, params)
        if not raw.get("trades") and (_dec(raw.get("filled"), ZERO) or ZERO) > 0:
            trades = await self._trades(symbol, str(raw.get("id")))
            if trades:
                raw = {**raw, "trades": trades}
        found = self._order(raw, None)
        if client_order_id is not None and found.client_order_id != client_order_id:
            raise OrderNotFound(f"order {venue_order_id} has client id {found.client_order_id}", venue=self.name)
        return found

    async def open_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        raw = await self._read(self.client.fetch_open_orders, symbol)
        orders = [self._order(r, None) for r in raw]
        return sorted(orders, key=lambda o: o.created_at)

    async def balances(self) -> dict[str, Balance]:
        raw = await self._read(self.client.fetch_balance)
        out: dict[str, Balance] = {}
        for asset, entry in raw.items():
            if isinstance(entry, dict) and "free" in entry and asset not in ("info", "free", "used", "total"):
                out[asset] = Balance(free=_dec(entry.get("free"), ZERO) or ZERO, used=_dec(entry.get("used"), ZERO) or ZERO)
        return out

    async def ticker(self, symbol: str) -> Ticker:
        raw = await self._read(self.client.fetch_ticker, symbol)
        return Ticker(symbol=symbol, bid=_dec(raw.get("bid")), ask=_dec(raw.get("ask")), last=_dec(raw.get("last")),
                      at=self._clock())

    async def order_book(self, symbol: str, depth: int) -> OrderBook:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        raw = await self._read(self.client.fetch_order_book, symbol, depth)

        def levels(side: list[Any]) -> tuple[BookLevel, ...]:
            return tuple(BookLevel(Decimal(str(p)), Decimal(str(q))) for p, q, *_ in side[:depth])

        return OrderBook(symbol=symbol, bids=levels(raw["bids"]), asks=levels(raw["asks"]), at=self._clock())

    async def close(self) -> None:
        """Close this account's shared client (for tools and tests that own the process)."""
        _CLIENTS.pop((self.config.name, self.config.account), None)
        await self.client.close()

    # -- internals ---------------------------------------------------------------------------

    async def _read(self, call: Any, *args: Any) -> Any:
        delay = 0.05
        for attempt in range(1, self.config.read_attempts + 1):
            await self.limiter.acquire()
            self.calls += 1
            try:
                result = await call(*args)
            except Exception as exc:
                cls = _classify(exc)
                retry = cls in (ErrorClass.RETRY, ErrorClass.UNKNOWN) and attempt < self.config.read_attempts
                if not retry:
                    raise await self._venue_error(exc, cls) from exc
                await asyncio.sleep(delay)
                delay *= 4
                continue
            await self.breaker.success()
            return result
        raise AssertionError("unreachable")

    async def _trades(self, symbol: str, venue_order_id: str) -> list[Any] | None:
        """The executions of one order, as the venue lists them (their ids are the ones the
        submit's answer gave); ``None`` where the venue will not list them."""
        if not self.client.has.get("fetchMyTrades"):
            return None
        try:
            trades = await self._read(self.client.fetch_my_trades, symbol, None, None, {"orderId": venue_order_id})
        except (OrderRejected, OrderNotFound):
            return None
        return [t for t in trades if str(t.get("order")) == venue_order_id]

    async def _resolve(self, order: VenueOrderRequest, cause: Exception) -> VenueOrder:
        """The submit's answer was lost: find the order by our client order id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.resolve_s
        delay = 0.1
        while True:
            try:
                return await self.fetch_order(order.symbol, client_order_id=order.client_order_id)
            except OrderNotFound:
                # Not there (yet): a request still in flight could land later, so look again
                # once more after a pause before saying it never landed.
                await asyncio.sleep(min(delay, 0.5))
                try:
                    return await self.fetch_order(order.symbol, client_order_id=order.client_order_id)
                except OrderNotFound:
                    raise VenueUnavailable(
                        f"submit of {order.client_order_id} failed ({type(cause).__name__}) and the venue has no "
                        "such order", venue=self.name,
                    ) from cause
            except VenueError as exc:
                if loop.time() + delay > deadline:
                    raise UnknownOutcome(
                        f"submit of {order.client_order_id} timed out and the lookup failed: {exc}",
                        venue=self.name, client_order_id=order.client_order_id,
                    ) from cause
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _venue_error(self, exc: Exception, cls: ErrorClass) -> VenueError:
        message = f"{type(exc).__name__}: {exc}"
        if cls is ErrorClass.NOT_FOUND:
            return OrderNotFound(message, venue=self.name)
        if cls is ErrorClass.FUNDS:
            return InsufficientFunds(message, venue=self.name)
        if cls is ErrorClass.REJECTED:
            return OrderRejected(message, venue=self.name)
        if cls is ErrorClass.RATE_LIMITED:
            headers = getattr(self.client, "last_response_headers", None) or {}
            retry_after = _dec(headers.get("Retry-After") or headers.get("retry-after"))
            seconds = float(retry_after) if retry_after is not None else None
            await self.breaker.trip(seconds)
            return RateLimited(message, venue=self.name, retry_after=seconds)
        if cls is ErrorClass.UNAVAILABLE:
            await self.breaker.failure()
            return VenueUnavailable(message, venue=self.name)
        if cls is ErrorClass.UNKNOWN:
            await self.breaker.failure()
            return VenueUnavailable(message, venue=self.name)
        return VenueUnavailable(message, venue=self.name)

    def _order(self, raw: Mapping[str, Any], request: VenueOrderRequest | None) -> VenueOrder:
        symbol = raw.get("symbol") or (request.symbol if request else "")
        market = self._markets.get(symbol)
        quote = market.quote if market else symbol.partition("/")[2]
        amount = _dec(raw.get("amount"), ZERO) or ZERO
        filled = _dec(raw.get("filled"), ZERO) or ZERO
        average = _dec(raw.get("average"))
        status = _STATUS.get(raw.get("status") or "", VenueOrderStatus.OPEN)
        if status is VenueOrderStatus.OPEN and filled > 0:
            status = VenueOrderStatus.PARTIALLY_FILLED
        if status is VenueOrderStatus.FILLED and filled < amount:
            status = VenueOrderStatus.EXPIRED  # Binance "closed" covers an IOC remainder too
        raw_status = (raw.get("info") or {}).get("status")
        if raw_status == "EXPIRED":
            status = VenueOrderStatus.EXPIRED
        venue_order_id = str(raw.get("id"))
        at = dt.datetime.fromtimestamp((raw.get("timestamp") or 0) / 1000, dt.UTC) if raw.get("timestamp") else self._clock()
        fills: list[VenueFill] = []
        fees = ZERO
        for trade in raw.get("trades") or ():
            fee = trade.get("fee") or {}
            quantity = _dec(trade.get("amount"), ZERO) or ZERO
            price = _dec(trade.get("price"), ZERO) or ZERO
            cost = _dec(fee.get("cost"), ZERO) or ZERO
            fees += cost
            when = trade.get("timestamp")
            fills.append(VenueFill(
                fill_id=f"{self.name}-{trade.get('id')}", venue_order_id=venue_order_id, quantity=quantity,
                price=price, fee=cost, fee_asset=fee.get("currency") or quote,
                liquidity=Liquidity.MAKER if trade.get("takerOrMaker") == "maker" else Liquidity.TAKER,
                at=dt.datetime.fromtimestamp(when / 1000, dt.UTC) if when else at,
            ))
        if not fills and filled > 0 and average is not None:
            # Neither the answer nor the venue's trade list has the executions: report them as
            # one, at the average price, with the fee at the taker rate. Its id names the
            # cumulative quantity (a reconciler compares it by quantity, never by id).
            rate = market.taker_fee if market else ZERO
            with money_context():
                fees = filled * average * rate
            fills.append(VenueFill(
                fill_id=f"{self.name}-{venue_order_id}-upto-{format(filled.normalize(), 'f')}",
                venue_order_id=venue_order_id, quantity=filled, price=average, fee=fees, fee_asset=quote,
                liquidity=Liquidity.TAKER, at=at, aggregate=True,
            ))
        if average is None and fills:
            with money_context():
                average = sum((f.price * f.quantity for f in fills), ZERO) / filled if filled else None
        side = Side(raw.get("side") or (request.side.value if request else "buy"))
        order_type = OrderType.LIMIT if (raw.get("type") or "limit") == "limit" else OrderType.MARKET
        tif_raw = (raw.get("timeInForce") or "GTC").upper()
        tif = {"GTC": TimeInForce.GTC, "IOC": TimeInForce.IOC, "FOK": TimeInForce.FOK}.get(tif_raw, TimeInForce.GTC)
        return VenueOrder(
            venue=self.name, venue_order_id=venue_order_id,
            client_order_id=str(raw.get("clientOrderId") or (request.client_order_id if request else "")),
            symbol=symbol, side=side, order_type=order_type, time_in_force=tif, quantity=amount,
            price=_dec(raw.get("price")) if order_type is OrderType.LIMIT else None, status=status,
            filled_quantity=filled, average_price=average, fees=fees, fee_asset=quote, fills=tuple(fills),
            created_at=at, updated_at=self._clock(),
        )
