"""The order: one frozen ``Order`` that applies every order event, and the one table of
allowed transitions.

The order is stored as it is (msgpack in Redis under its order key, ``services.core.hotstate``)
and every part of the platform reads that same type: the order stage moves it, the gateway
shows it, the workflows and reconciliation read it, the event store's replay rebuilds it.
Each event is a method (``rejected``, ``routed``, ``filled``...) that returns a new ``Order``
after checking the move against ``TRANSITIONS``; nothing is mutated, nothing is read from a
clock (``at`` is passed in). Fills are idempotent on ``fill_id`` (and on the venue's own fill
id) so an at-least-once bus can deliver the same ``order.executed`` twice without counting it
twice.
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal
from typing import Any

import msgspec

from services.trading.money import ZERO, money_context
from services.trading.terms import OrderTerms
from services.trading.vocabulary import OrderType, Route, Side, TimeInForce, UtcDatetime

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Fill",
    "InvalidFill",
    "InvalidTransition",
    "Order",
    "OrderStatus",
]


class OrderStatus(enum.StrEnum):
    REQUESTED = "requested"
    VALIDATED = "validated"
    REJECTED = "rejected"
    CREATED = "created"
    ROUTED = "routed"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    FAILED = "failed"
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    """A venue call (submit or cancel) whose outcome is not known: it timed out or the
    connection dropped. Never retried blindly; resolved by looking the order up."""


S = OrderStatus

TRANSITIONS: frozenset[tuple[OrderStatus, OrderStatus]] = frozenset(
    {
        (S.REQUESTED, S.VALIDATED),
        (S.REQUESTED, S.REJECTED),
        (S.VALIDATED, S.CREATED),
        # The order service may still refuse a validated request (e.g. a duplicate
        # client_order_id with a different body found only once the record is written).
        (S.VALIDATED, S.REJECTED),
        # A client cancel can overtake the order before it reaches a venue.
        (S.VALIDATED, S.CANCELED),
        (S.CREATED, S.ROUTED),
        (S.CREATED, S.CANCELED),
        # No healthy venue lists the symbol, or the venue refused the submit outright.
        (S.CREATED, S.FAILED),
        # The submit timed out: the venue may or may not hold the order.
        (S.CREATED, S.UNKNOWN),
        # order.executed and exchange.routed travel on different streams, so a fill can be
        # processed before the routing acknowledgement is.
        (S.CREATED, S.PARTIALLY_FILLED),
        (S.CREATED, S.FILLED),
        # Likewise an expiry (IOC, FOK, market remainder) can overtake the acknowledgement.
        (S.CREATED, S.EXPIRED),
        (S.ROUTED, S.PARTIALLY_FILLED),
        (S.ROUTED, S.FILLED),
        (S.ROUTED, S.CANCELED),
        # The venue rejected the order after acknowledging it (e.g. a post-trade balance check).
        (S.ROUTED, S.FAILED),
        # IOC/FOK with nothing filled, or the venue's own expiry.
        (S.ROUTED, S.EXPIRED),
        # A cancel request timed out: the order may be canceled, filled or still working.
        (S.ROUTED, S.UNKNOWN),
        # Every further fill that leaves quantity open stays here.
        (S.PARTIALLY_FILLED, S.PARTIALLY_FILLED),
        (S.PARTIALLY_FILLED, S.FILLED),
        # The remainder is canceled; the fills so far stand (filled_quantity > 0).
        (S.PARTIALLY_FILLED, S.CANCELED),
        # The remainder of an IOC, or of an order the venue expires.
        (S.PARTIALLY_FILLED, S.EXPIRED),
        (S.PARTIALLY_FILLED, S.UNKNOWN),
        # Resolving an unknown outcome: the lookup tells us where the order really is.
        (S.UNKNOWN, S.ROUTED),
        (S.UNKNOWN, S.PARTIALLY_FILLED),
        (S.UNKNOWN, S.FILLED),
        (S.UNKNOWN, S.CANCELED),
        # The venue has no such order: the submit never landed.
        (S.UNKNOWN, S.FAILED),
        (S.UNKNOWN, S.EXPIRED),
    }
)
"""Every allowed ``(current, next)`` pair. Anything else raises ``InvalidTransition``."""

TERMINAL: frozenset[OrderStatus] = frozenset({S.REJECTED, S.FILLED, S.CANCELED, S.FAILED, S.EXPIRED})

# Statuses in which a venue may hold the order, so a fill can arrive.
_FILLABLE: frozenset[OrderStatus] = frozenset(
    current for current, nxt in TRANSITIONS if nxt in (S.PARTIALLY_FILLED, S.FILLED)
)


class InvalidTransition(Exception):
    """The state machine does not allow this move (e.g. canceling a filled order)."""

    def __init__(self, order_id: str, current: OrderStatus, requested: OrderStatus) -> None:
        super().__init__(f"order {order_id}: {current} -> {requested} is not allowed")
        self.order_id = order_id
        self.current = current
        self.requested = requested


class InvalidFill(ValueError):
    """A fill that cannot be applied: non-positive quantity or price, or an overfill."""


_TERMS_STORED_AS = {"venue": "requested_venue"}
"""The order keeps its terms as flat fields of the same names, but for the venue the client
asked for: ``venue`` is where the order was routed."""


class Fill(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One venue execution the order counted (from its ``order.executed``)."""

    fill_id: str
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_asset: str
    liquidity: str
    venue: str
    at: UtcDatetime
    """When the venue reported it (the event's time)."""
    venue_fill_id: str | None = None
    """The venue's own id of the execution (``OrderExecuted.venue_fill_id``), which
    ``orders.reconcile`` matches the venue's fills on; ``None`` in records written before."""


class Order(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An order as the platform knows it, stored as it is. Its fields are the stored format:
    a field is only ever added, with a default, so records already in Redis still decode.

    No check on construction: a request risk will reject (a negative price, say) is still an
    order, with a record the client can read."""

    order_id: str
    client_order_id: str
    portfolio_id: str
    correlation_id: str
    symbol: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    requested_venue: str | None = None
    """The venue the client asked for (the terms' ``venue``); ``None`` lets routing choose."""
    status: OrderStatus = OrderStatus.REQUESTED
    created_at: UtcDatetime
    updated_at: UtcDatetime
    venue: str | None = None
    """Where the order went: the routed venue, or the venue of its first fill."""
    filled_quantity: Decimal = ZERO
    avg_fill_price: Decimal | None = None
    commission: Decimal = ZERO
    commission_asset: str | None = None
    fill_notional: Decimal = ZERO
    """Sum of quantity * price over the fills. The average is derived from this exact sum,
    not updated incrementally, so it does not depend on the order fills arrive in."""
    reject_code: str | None = None
    reject_reason: str | None = None
    """Why it was rejected or failed (also the reason of a cancel or an expiry)."""
    fills: tuple[Fill, ...] = ()
    body_hash: str = ""
    """What makes two submissions the same order (the intake's hash of the request)."""
    route: Route = Route.STREAM
    requested_by: str | None = None

    @classmethod
    def requested(
        cls, terms: OrderTerms, *, portfolio_id: str, at: dt.datetime, requested_by: str | None = None,
        body_hash: str = "", route: Route = Route.STREAM,
    ) -> Order:
        """A new order on these terms, as the platform took it in, before risk has looked at
        it; correlated by its own id."""
        return cls(
            **{_TERMS_STORED_AS.get(name, name): getattr(terms, name) for name in OrderTerms.__struct_fields__},
            portfolio_id=portfolio_id, correlation_id=terms.order_id, created_at=at, updated_at=at,
            requested_by=requested_by, body_hash=body_hash, route=route,
        )

    @property
    def terms(self) -> OrderTerms:
        """What the client asked for (``services.trading.terms.carry`` passes them on)."""
        return OrderTerms(
            **{name: getattr(self, _TERMS_STORED_AS.get(name, name)) for name in OrderTerms.__struct_fields__}
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def leaves_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity

    # -- the events ------------------------------------------------------------------------

    def validated_and_created(self, at: dt.datetime) -> Order:
        """Risk approved it and the order service recorded it (``order.validated``): the order
        never rests in ``validated``, both moves are made at once."""
        return self._moved(OrderStatus.VALIDATED, at)._moved(OrderStatus.CREATED, at)

    def rejected(self, code: str, reason: str, at: dt.datetime) -> Order:
        """``order.rejected``."""
        return self._moved(OrderStatus.REJECTED, at, reject_code=code, reject_reason=reason)

    def routed(self, venue: str, at: dt.datetime) -> Order:
        """``exchange.routed``: a venue acknowledged it."""
        return self._moved(OrderStatus.ROUTED, at, venue=venue)

    def outcome_unknown(self, venue: str, at: dt.datetime) -> Order:
        """``exchange.routed`` with ``outcome_unknown``: sent to ``venue``, whose answer was
        lost and which could not be asked; ``unknown`` until a lookup finds where it is."""
        return self._moved(OrderStatus.UNKNOWN, at, venue=venue)

    def failed(self, code: str, reason: str, at: dt.datetime) -> Order:
        """``order.failed``: no venue took it, or the venue refused it."""
        return self._moved(OrderStatus.FAILED, at, reject_code=code, reject_reason=reason)

    def canceled(self, reason: str, at: dt.datetime) -> Order:
        """``order.canceled``: the rest is canceled; the fills so far stand."""
        return self._moved(OrderStatus.CANCELED, at, reject_reason=reason)

    def expired(self, reason: str, at: dt.datetime) -> Order:
        """``order.canceled`` by the venue's own expiry (IOC, FOK, a market order's rest)."""
        return self._moved(OrderStatus.EXPIRED, at, reject_reason=reason)

    def counted(self, fill: Fill) -> bool:
        """Whether this fill is counted already: the same fill id, or the same execution of
        the same venue (a venue fill reported under another platform fill id)."""
        return any(
            f.fill_id == fill.fill_id
            or (fill.venue_fill_id is not None and (f.venue, f.venue_fill_id) == (fill.venue, fill.venue_fill_id))
            for f in self.fills
        )

    def filled(self, fill: Fill, at: dt.datetime) -> Order:
        """``order.executed``: count one venue fill. A fill counted before returns this order
        unchanged, whatever the status, so a redelivered fill is harmless even after the order
        is done.

        ``commission`` may be negative (a maker rebate).

        A new fill on an order no venue can hold (not yet created, or finished) raises
        ``InvalidTransition``. On a real venue a fill can race a cancel; the order service
        must decide what to do with such a fill (the position changed either way), which is
        why this does not silently drop it.
        """
        if self.counted(fill):
            return self
        if self.status not in _FILLABLE:
            raise InvalidTransition(self.order_id, self.status, OrderStatus.PARTIALLY_FILLED)
        fid, quantity, price, commission = fill.fill_id, fill.quantity, fill.price, fill.commission
        if not (quantity.is_finite() and quantity > 0):
            raise InvalidFill(f"order {self.order_id}: fill {fid} quantity must be positive, got {quantity}")
        if not (price.is_finite() and price > 0):
            raise InvalidFill(f"order {self.order_id}: fill {fid} price must be positive, got {price}")
        if not commission.is_finite():
            raise InvalidFill(f"order {self.order_id}: fill {fid} commission must be finite")
        with money_context():
            filled = self.filled_quantity + quantity
            if filled > self.quantity:
                raise InvalidFill(
                    f"order {self.order_id}: fill {fid} of {quantity} overfills "
                    f"({self.filled_quantity} of {self.quantity} already filled)"
                )
            notional = self.fill_notional + quantity * price
            avg = notional / filled
            total_commission = self.commission + commission
        to = OrderStatus.FILLED if filled == self.quantity else OrderStatus.PARTIALLY_FILLED
        return self._moved(
            to, at, filled_quantity=filled, fill_notional=notional, avg_fill_price=avg, commission=total_commission,
            commission_asset=fill.commission_asset, fills=(*self.fills, fill), venue=self.venue or fill.venue,
        )

    def _moved(self, to: OrderStatus, at: dt.datetime, **changes: Any) -> Order:
        """This order in ``to`` as of ``at`` (with ``changes``), if the table allows the move."""
        if (self.status, to) not in TRANSITIONS:
            raise InvalidTransition(self.order_id, self.status, to)
        return msgspec.structs.replace(self, status=to, updated_at=at, **changes)
