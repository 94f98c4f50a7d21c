"""The ``Venue`` protocol every exchange adapter implements, its domain types and its errors.

An adapter converts wire data into these types and maps its library's exceptions onto the
``VenueError`` hierarchy below, so nothing vendor-specific reaches the order path. Money and
quantities are ``Decimal``; timestamps are UTC and come from the adapter's injected clock.

Every error says whether the same call may simply be made again (``retryable``). A submit
that timed out is the exception to "retry on timeout": the venue may hold the order, so the
caller resolves it with ``fetch_order(client_order_id=...)`` and never submits blindly again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable
from decimal import Decimal
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.money import ZERO

__all__ = [
    "Balance",
    "BookLevel",
    "Clock",
    "InsufficientFunds",
    "Market",
    "OrderBook",
    "OrderNotFound",
    "OrderRejected",
    "RateLimited",
    "Ticker",
    "UnknownOutcome",
    "Venue",
    "VenueError",
    "VenueFill",
    "VenueOrder",
    "VenueOrderRequest",
    "VenueOrderStatus",
    "VenueUnavailable",
    "in_process",
    "platform_fill_id",
]

Clock = Callable[[], dt.datetime]
"""Returns the current time as an aware UTC datetime."""


# ---------------------------------------------------------------------------------------------
# Reference data and market data


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Market:
    """A spot pair as one venue trades it: ``BTC/USDT`` is base BTC, quote USDT.

    Fee rates are fractions of the notional (0.001 = 10 bps); a negative maker rate is a rebate.
    """

    symbol: str
    base: str
    quote: str
    price_step: Decimal
    quantity_step: Decimal
    min_quantity: Decimal
    min_notional: Decimal
    maker_fee: Decimal
    taker_fee: Decimal

    def __post_init__(self) -> None:
        if not (self.price_step > 0 and self.quantity_step > 0):
            raise ValueError(f"{self.symbol}: steps must be positive")
        if self.min_quantity < 0 or self.min_notional < 0:
            raise ValueError(f"{self.symbol}: minimums must not be negative")
        if not (-1 < self.maker_fee < 1 and 0 <= self.taker_fee < 1):
            raise ValueError(f"{self.symbol}: fee rates out of range")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Balance:
    """One asset of one account: ``used`` is reserved by open orders, ``free`` is the rest."""

    free: Decimal
    used: Decimal = ZERO

    @property
    def total(self) -> Decimal:
        return self.free + self.used


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ticker:
    symbol: str
    bid: Decimal | None
    ask: Decimal | None
    last: Decimal | None
    at: dt.datetime


class BookLevel(NamedTuple):
    price: Decimal
    quantity: Decimal


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderBook:
    """Best level first on both sides: bids descending, asks ascending."""

    symbol: str
    bids: tuple[BookLevel, ...]
    asks: tuple[BookLevel, ...]
    at: dt.datetime


# ---------------------------------------------------------------------------------------------
# Orders


class VenueOrderStatus(enum.StrEnum):
    """An order as the venue sees it; the platform's own lifecycle is ``OrderStatus``."""

    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"
    EXPIRED = "expired"
    """Ended by the venue: the unfilled rest of a market or IOC order, or a FOK that could
    not fill completely. ``filled_quantity`` may be above zero."""

    @property
    def is_terminal(self) -> bool:
        return self not in (VenueOrderStatus.OPEN, VenueOrderStatus.PARTIALLY_FILLED)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VenueOrderRequest:
    """What the platform asks a venue to do. ``client_order_id`` is the platform's own id and
    rides on every order, so a submit whose outcome is unknown can be looked up by it."""

    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    """The limit price; ``None`` for a market order."""
    time_in_force: TimeInForce = TimeInForce.GTC


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VenueFill:
    """One execution. ``fill_id`` is the venue's own id of it (unique per venue and the same
    whichever call reports it: the submit's answer, a lookup), so a fill is never counted twice."""

    fill_id: str
    venue_order_id: str
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: Liquidity
    at: dt.datetime
    aggregate: bool = False
    """Not one execution but everything the order had filled when the venue was asked, as one
    fill at the average price (a venue that would not list the executions). Its id names that
    cumulative quantity, not an execution, so a reconciler compares it by quantity."""


def platform_fill_id(order_id: str, venue: str, venue_fill_id: str) -> str:
    """The platform's id of one venue fill of one order: ``<order id>:<venue>:<venue fill id>``.

    Routing (from the submit's answer) and ``orders.reconcile`` (from a lookup) both name a
    fill this way, so the same execution reported by both has one id, and every layer that
    keeps fill ids (the order record, the portfolio's applied fills) takes it once."""
    return f"{order_id}:{venue}:{venue_fill_id}"


def in_process(venue: Venue) -> bool:
    """Whether the venue lives inside this process (the paper venue): its orders are this
    process's alone, so another process (the workflows worker) asking it about an order routing
    placed learns nothing, and "not found" there never means "not at the venue"."""
    return bool(getattr(venue, "IN_PROCESS", False))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VenueOrder:
    """A snapshot of one order at the venue, with every fill so far."""

    venue: str
    venue_order_id: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    quantity: Decimal
    price: Decimal | None
    status: VenueOrderStatus
    filled_quantity: Decimal
    average_price: Decimal | None
    """``None`` until the first fill."""
    fees: Decimal
    fee_asset: str
    fills: tuple[VenueFill, ...]
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def leaves_quantity(self) -> Decimal:
        """What is still working: zero once the order is terminal."""
        return ZERO if self.status.is_terminal else self.quantity - self.filled_quantity

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


# ---------------------------------------------------------------------------------------------
# Errors


class VenueError(Exception):
    """Base of every error a venue adapter raises."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, venue: str | None = None) -> None:
        super().__init__(f"{venue}: {message}" if venue else message)
        self.venue = venue


class OrderRejected(VenueError):
    """The venue refused the order (precision, minimums, unknown symbol...). Terminal."""


class OrderNotFound(VenueError):
    """The venue has no order with this id (for this symbol)."""


class InsufficientFunds(VenueError):
    """The account cannot pay for the order. Terminal."""


class RateLimited(VenueError):
    """Too many requests; the request was not applied. Try again after ``retry_after``
    seconds (``None`` when the venue did not say)."""

    retryable = True

    def __init__(self, message: str, *, venue: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, venue=venue)
        self.retry_after = retry_after


class VenueUnavailable(VenueError):
    """The venue could not be reached or refused service; the request was not applied."""

    retryable = True


class UnknownOutcome(VenueError):
    """The request may or may not have been applied (e.g. a submit timed out).

    Not retryable: resubmitting could place a second order. Resolve it by
    ``fetch_order(symbol, client_order_id=...)``; ``OrderNotFound`` there means it never landed.
    """

    def __init__(self, message: str, *, venue: str | None = None, client_order_id: str | None = None) -> None:
        super().__init__(message, venue=venue)
        self.client_order_id = client_order_id


# ---------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class Venue(Protocol):
    """One account at one exchange. Every call may raise a ``VenueError`` and nothing else
    that the adapter could have mapped."""

    @property
    def name(self) -> str: ...

    async def markets(self) -> dict[str, Market]:
        """Every market the venue lists, by symbol."""
        ...

    async def submit(self, order: VenueOrderRequest) -> VenueOrder:
        """Place an order. Idempotent on ``client_order_id``: submitting the same request
        again returns the existing order, never a second one."""
        ...

    async def cancel(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        """Cancel a working order by either id; returns the order as it ends up (a terminal
        order comes back unchanged, so its status tells whether the cancel was too late)."""
        ...

    async def fetch_order(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        """One order by either id; ``OrderNotFound`` if the venue has none."""
        ...

    async def open_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        """Working orders, oldest first, for one symbol or all."""
        ...

    async def balances(self) -> dict[str, Balance]:
        """The account's balances by asset."""
        ...

    async def ticker(self, symbol: str) -> Ticker: ...

    async def order_book(self, symbol: str, depth: int) -> OrderBook:
        """At most ``depth`` levels each side."""
        ...
