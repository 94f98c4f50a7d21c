"""The order state machine: an immutable ``Order`` and the one table of allowed transitions.

Every method returns a new ``Order``; nothing is mutated, nothing is read from a clock
(``at`` is passed in). Fills are idempotent on ``fill_id`` so an at-least-once bus can
deliver the same ``order.executed`` twice without counting it twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from decimal import Decimal

from services.trading.money import ZERO, money_context
from services.trading.vocabulary import OrderType, Side, TimeInForce

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    order_id: str
    client_order_id: str
    portfolio_id: str
    symbol: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None
    time_in_force: TimeInForce
    status: OrderStatus
    updated_at: dt.datetime
    filled_quantity: Decimal = ZERO
    avg_fill_price: Decimal | None = None
    commission: Decimal = ZERO
    reject_reason: str | None = None
    fill_ids: frozenset[str] = frozenset()
    venue: str | None = None
    fill_notional: Decimal = ZERO
    """Sum of quantity * price over the fills. The average is derived from this exact sum,
    not updated incrementally, so it does not depend on the order fills arrive in."""

    def __post_init__(self) -> None:
        if not (self.quantity.is_finite() and self.quantity > 0):
            raise ValueError(f"order {self.order_id}: quantity must be positive, got {self.quantity}")
        if self.price is not None and not (self.price.is_finite() and self.price > 0):
            raise ValueError(f"order {self.order_id}: price must be positive, got {self.price}")
        if not ZERO <= self.filled_quantity <= self.quantity:
            raise ValueError(f"order {self.order_id}: filled_quantity out of [0, quantity]")

    @classmethod
    def requested(
        cls,
        *,
        order_id: str,
        client_order_id: str,
        portfolio_id: str,
        symbol: str,
        side: Side,
        order_type: OrderType,
        quantity: Decimal,
        price: Decimal | None,
        at: dt.datetime,
        time_in_force: TimeInForce = TimeInForce.GTC,
        venue: str | None = None,
    ) -> Order:
        """A new order as the gateway accepted it, before risk has looked at it."""
        return cls(
            order_id=order_id,
            client_order_id=client_order_id,
            portfolio_id=portfolio_id,
            symbol=symbol,
            side=side,
            order_type=order_type,
            quantity=quantity,
            price=price,
            time_in_force=time_in_force,
            status=OrderStatus.REQUESTED,
            venue=venue,
            updated_at=at,
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def leaves_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity

    def can_transition(self, to: OrderStatus) -> bool:
        return (self.status, to) in TRANSITIONS

    def transition(self, to: OrderStatus, *, at: dt.datetime, venue: str | None = None) -> Order:
        """Move to ``to``; ``venue`` records where the order was routed."""
        self._check(to)
        return dataclasses.replace(self, status=to, updated_at=at, venue=venue or self.venue)

    def cancel(self, *, at: dt.datetime) -> Order:
        return self.transition(OrderStatus.CANCELED, at=at)

    def reject(self, reason: str, *, at: dt.datetime) -> Order:
        self._check(OrderStatus.REJECTED)
        return dataclasses.replace(self, status=OrderStatus.REJECTED, reject_reason=reason, updated_at=at)

    def fail(self, reason: str, *, at: dt.datetime) -> Order:
        self._check(OrderStatus.FAILED)
        return dataclasses.replace(self, status=OrderStatus.FAILED, reject_reason=reason, updated_at=at)

    def apply_fill(
        self,
        fill_id: str,
        quantity: Decimal,
        price: Decimal,
        commission: Decimal,
        at: dt.datetime,
    ) -> Order:
        """Count one venue fill. A ``fill_id`` seen before returns this order unchanged,
        whatever the status, so a redelivered fill is harmless even after the order is done.

        ``commission`` may be negative (a maker rebate).

        A new fill on a terminal order raises. On a real venue a fill can race a cancel; the
        order service must decide what to do with such a fill (the position changed either
        way), which is why this does not silently drop it.
        """
        if fill_id in self.fill_ids:
            return self
        if self.status not in _FILLABLE:
            raise InvalidTransition(self.order_id, self.status, OrderStatus.PARTIALLY_FILLED)
        if not (quantity.is_finite() and quantity > 0):
            raise InvalidFill(f"order {self.order_id}: fill {fill_id} quantity must be positive, got {quantity}")
        if not (price.is_finite() and price > 0):
            raise InvalidFill(f"order {self.order_id}: fill {fill_id} price must be positive, got {price}")
        if not commission.is_finite():
            raise InvalidFill(f"order {self.order_id}: fill {fill_id} commission must be finite")
        with money_context():
            filled = self.filled_quantity + quantity
            if filled > self.quantity:
                raise InvalidFill(
                    f"order {self.order_id}: fill {fill_id} of {quantity} overfills "
                    f"({self.filled_quantity} of {self.quantity} already filled)"
                )
            notional = self.fill_notional + quantity * price
            avg = notional / filled
            total_commission = self.commission + commission
        to = OrderStatus.FILLED if filled == self.quantity else OrderStatus.PARTIALLY_FILLED
        self._check(to)
        return dataclasses.replace(
            self,
            status=to,
            filled_quantity=filled,
            fill_notional=notional,
            avg_fill_price=avg,
            commission=total_commission,
            fill_ids=self.fill_ids | {fill_id},
            updated_at=at,
        )

    def _check(self, to: OrderStatus) -> None:
        if (self.status, to) not in TRANSITIONS:
            raise InvalidTransition(self.order_id, self.status, to)
