"""The event envelope and the catalog of every event the platform publishes.

An event is frozen once built. Its payload is a typed struct registered for exactly one
event type; money and quantities are ``Decimal`` (strings on the wire), timestamps are UTC.

Versions are ``"<major>.<minor>"`` per event type. A consumer accepts any minor of the
major it knows and rejects another major (the bus dead-letters it). Payloads reject unknown
fields, so a minor bump that adds a field must reach consumers before producers use it.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import os
import time
from decimal import Decimal
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from services.trading import (
    Liquidity,
    OrderTerms,
    OrderType,
    Route,
    Side,
    TimeInForce,
    TradingState,
    UtcDatetime,
    VenueQuote,
)

# The vocabulary (sides, order types, ...) and the order's terms live in ``services.trading``,
# the ground floor; the payloads here are built from them. Import them from there (``Route``
# and ``UtcDatetime`` stay re-exported here: the envelope names them).

__all__ = [
    "CATALOG",
    "EVENT_CLASSES",
    "AlertTriggered",
    "Event",
    "EventType",
    "ExchangeRouted",
    "OrderCancelRequested",
    "OrderCanceled",
    "OrderCreated",
    "OrderExecuted",
    "OrderFailed",
    "OrderRejected",
    "OrderRequested",
    "OrderValidated",
    "OrderbookUpdated",
    "Payload",
    "PortfolioRebalanced",
    "PortfolioUpdated",
    "PositionUpdated",
    "PriceLevel",
    "PriceUpdated",
    "RiskAssessed",
    "RiskBreached",
    "Route",
    "TradeTick",
    "UtcDatetime",
    "WorkflowCompleted",
    "WorkflowFailed",
    "WorkflowStarted",
    "derive_event_id",
    "new_event_id",
    "utcnow",
]


class EventType(enum.StrEnum):
    ORDER_REQUESTED = "order.requested"
    ORDER_VALIDATED = "order.validated"
    ORDER_REJECTED = "order.rejected"
    ORDER_CREATED = "order.created"
    EXCHANGE_ROUTED = "exchange.routed"
    ORDER_EXECUTED = "order.executed"
    ORDER_FAILED = "order.failed"
    ORDER_CANCELED = "order.canceled"
    ORDER_CANCEL_REQUESTED = "order.cancel_requested"
    POSITION_UPDATED = "position.updated"
    PORTFOLIO_UPDATED = "portfolio.updated"
    PORTFOLIO_REBALANCED = "portfolio.rebalanced"
    RISK_ASSESSED = "risk.assessed"
    RISK_BREACHED = "risk.breached"
    PRICE_UPDATED = "price.updated"
    ORDERBOOK_UPDATED = "orderbook.updated"
    TRADE_TICK = "trade.tick"
    ALERT_TRIGGERED = "alert.triggered"
    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_COMPLETED = "workflow.completed"
    WORKFLOW_FAILED = "workflow.failed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------
# Identifiers


def _as_uuid(h: str, version: str) -> str:
    """Format 32 hex digits as a UUID string with the given version and the RFC variant."""
    return f"{h[:8]}-{h[8:12]}-{version}{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids of fresh events sort by creation time."""
    return _as_uuid(f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}" + os.urandom(10).hex(), "7")


def derive_event_id(cause_id: str, stage: str, index: int = 0) -> str:
    """The id of the ``index``-th event a ``stage`` emits in reaction to ``cause_id``.

    Deterministic, so a stage that crashes after emitting and runs again emits the same id,
    and every consumer drops the second copy.
    """
    # Version 8 is the UUID version for custom, here name-based, layouts.
    return _as_uuid(hashlib.blake2b(f"{cause_id}|{stage}|{index}".encode(), digest_size=16).hexdigest(), "8")


# ---------------------------------------------------------------------------------------------
# Payloads


class Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    """Base of every payload; a subclass names its event type and schema version.

    Only class variables here: msgspec lets a struct have several bases as long as one at
    most has fields, so a payload may also subclass a struct of shared fields (``OrderTerms``).
    """

    EVENT_TYPE: ClassVar[EventType]
    VERSION: ClassVar[str] = "1.0"


class PriceLevel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True, gc=False):
    price: Decimal
    quantity: Decimal


class OrderRequested(Payload, OrderTerms, frozen=True, kw_only=True):
    """An order as the gateway accepted it: its terms, then who asked."""

    EVENT_TYPE = EventType.ORDER_REQUESTED
    requested_by: str | None = None


class OrderValidated(Payload, OrderTerms, frozen=True, kw_only=True):
    """Risk approved the order: its terms, then the prices risk judged it by."""

    VERSION = "1.1"
    EVENT_TYPE = EventType.ORDER_VALIDATED
    reference_price: Decimal | None = None
    price_cap: Decimal | None = None
    """A market buy's protection price: the most risk reserved funds for (the reference price
    plus the slippage allowance). Routing sends the order as an IOC limit at this price, so
    it can never cost more than it reserved."""


class OrderRejected(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.ORDER_REJECTED
    order_id: str
    client_order_id: str
    reason_code: str
    reason: str
    stage: str


class OrderCreated(Payload, OrderTerms, frozen=True, kw_only=True):
    """The order service recorded the order; routing sends it on these terms."""

    VERSION = "1.1"
    EVENT_TYPE = EventType.ORDER_CREATED
    price_cap: Decimal | None = None
    """``OrderValidated.price_cap``: the worst price a market buy may fill at."""


class ExchangeRouted(Payload, frozen=True, kw_only=True):
    VERSION = "1.1"
    EVENT_TYPE = EventType.EXCHANGE_ROUTED
    order_id: str
    venue: str
    expected_price: Decimal | None
    fee_rate: Decimal
    reason: str
    candidates: tuple[VenueQuote, ...] = ()
    outcome_unknown: bool = False
    """The order was sent to ``venue`` but the submit's answer was lost and looking it up
    failed too: the venue may or may not hold it. The order is ``unknown`` until routing's
    retry of the submit finds it there (another ``exchange.routed``, its fills) or learns it
    never landed; reconciliation settles one that stays unknown."""


class OrderExecuted(Payload, frozen=True, kw_only=True):
    """One fill. ``fill_id`` is unique per venue fill, so a fill is never counted twice: it is
    ``services.venues.base.platform_fill_id(order id, venue, venue fill id)``, the same whoever
    reports the fill (routing, ``orders.reconcile``)."""

    VERSION = "1.1"
    EVENT_TYPE = EventType.ORDER_EXECUTED
    order_id: str
    client_order_id: str
    symbol: str
    side: Side
    venue: str
    venue_order_id: str
    fill_id: str
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_asset: str
    liquidity: Liquidity
    cumulative_quantity: Decimal
    leaves_quantity: Decimal
    venue_fill_id: str | None = None
    """The venue's own id of this execution (``VenueFill.fill_id``); ``None`` in events of
    schema 1.0."""


class OrderFailed(Payload, frozen=True, kw_only=True):
    VERSION = "1.1"
    EVENT_TYPE = EventType.ORDER_FAILED
    order_id: str
    client_order_id: str
    reason_code: str
    reason: str
    venue: str | None = None
    filled_quantity: Decimal | None = None
    """What the order had filled before it failed, as its emitter knew it (``None``: nothing,
    or not known); risk keeps the reservation of those fills until the portfolio has them."""


class OrderCanceled(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.ORDER_CANCELED
    order_id: str
    client_order_id: str
    reason: str
    filled_quantity: Decimal
    canceled_quantity: Decimal


class OrderCancelRequested(Payload, frozen=True, kw_only=True):
    """A client asked to cancel an order (``DELETE /v1/orders/{id}``); routing acts on it.

    Not in the seeds' catalog: the public API's cancel needs a request that travels in the
    order's shard, behind the events that created it.
    """

    EVENT_TYPE = EventType.ORDER_CANCEL_REQUESTED
    order_id: str
    client_order_id: str
    requested_by: str | None = None


class PositionUpdated(Payload, frozen=True, kw_only=True):
    VERSION = "1.1"
    EVENT_TYPE = EventType.POSITION_UPDATED
    symbol: str
    quantity: Decimal
    average_price: Decimal
    realized_pnl: Decimal
    order_id: str | None = None
    fill_id: str | None = None
    sequence: int = 0
    """How many fills this symbol's position has taken, this one included: the order in
    which replay applies them."""
    fill_quantity: Decimal | None = None
    """The quantity of the fill this update applied: risk releases the funds it had reserved
    for that much of the order once the portfolio has debited them."""


class PortfolioUpdated(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.PORTFOLIO_UPDATED
    balances: dict[str, Decimal]
    trading_state: TradingState
    equity: Decimal | None = None


class PortfolioRebalanced(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.PORTFOLIO_REBALANCED
    run_id: str
    target_weights: dict[str, Decimal]
    child_order_ids: tuple[str, ...]
    status: str


class RiskAssessed(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.RISK_ASSESSED
    gross_exposure: Decimal
    net_exposure: Decimal
    drawdown: Decimal
    trading_state: TradingState


class RiskBreached(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.RISK_BREACHED
    rule: str
    value: Decimal
    limit: Decimal
    action: TradingState
    message: str


class PriceUpdated(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.PRICE_UPDATED
    symbol: str
    venue: str
    bid: Decimal | None
    ask: Decimal | None
    last: Decimal | None
    mark: Decimal


class OrderbookUpdated(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.ORDERBOOK_UPDATED
    symbol: str
    venue: str
    bids: tuple[PriceLevel, ...]
    asks: tuple[PriceLevel, ...]


class TradeTick(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.TRADE_TICK
    symbol: str
    venue: str
    trade_id: str
    price: Decimal
    quantity: Decimal
    side: Side


class AlertTriggered(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.ALERT_TRIGGERED
    name: str
    severity: str
    message: str
    labels: dict[str, str] = {}


class WorkflowStarted(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.WORKFLOW_STARTED
    workflow: str
    run_id: str
    input: dict[str, Any] = {}


class WorkflowCompleted(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.WORKFLOW_COMPLETED
    workflow: str
    run_id: str
    result: dict[str, Any] = {}


class WorkflowFailed(Payload, frozen=True, kw_only=True):
    EVENT_TYPE = EventType.WORKFLOW_FAILED
    workflow: str
    run_id: str
    error: str
    step: str | None = None


CATALOG: dict[EventType, type[Payload]] = {
    cls.EVENT_TYPE: cls
    for cls in (
        OrderRequested,
        OrderValidated,
        OrderRejected,
        OrderCreated,
        ExchangeRouted,
        OrderExecuted,
        OrderFailed,
        OrderCanceled,
        OrderCancelRequested,
        PositionUpdated,
        PortfolioUpdated,
        PortfolioRebalanced,
        RiskAssessed,
        RiskBreached,
        PriceUpdated,
        OrderbookUpdated,
        TradeTick,
        AlertTriggered,
        WorkflowStarted,
        WorkflowCompleted,
        WorkflowFailed,
    )
}


# ---------------------------------------------------------------------------------------------
# The envelope

P = TypeVar("P")


class Event(msgspec.Struct, Generic[P], frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    """One event on the bus: the envelope of ARCHITECTURE section 3 around a typed payload.

    ``portfolio_id`` is the sharding key; market-wide events use the venue or symbol instead.
    Build events with ``Event.new`` or ``Event.derive``: each returns the concrete envelope
    class of its event type (``EVENT_CLASSES``), which is also what the codec decodes to, so
    a decoded event equals the one that was published.
    """

    event_id: str
    event_type: EventType
    version: str
    occurred_at: UtcDatetime
    portfolio_id: str
    correlation_id: str
    causation_id: str | None = None
    route: Route = Route.STREAM
    traceparent: str | None = None
    tracestate: str | None = None
    metadata: dict[str, str] = {}
    payload: P

    def __post_init__(self) -> None:
        tz = self.occurred_at.tzinfo
        if tz is not dt.UTC and self.occurred_at.utcoffset() != _ZERO:
            raise ValueError("occurred_at must be UTC")

    @staticmethod
    def new(
        payload: Payload,
        *,
        portfolio_id: str,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        event_id: str | None = None,
        route: Route = Route.STREAM,
        metadata: dict[str, str] | None = None,
        occurred_at: dt.datetime | None = None,
    ) -> Event[Any]:
        """A fresh event: the start of a story (an API call, a tick, a schedule)."""
        eid = event_id or new_event_id()
        return EVENT_CLASSES[payload.EVENT_TYPE](
            event_id=eid,
            event_type=payload.EVENT_TYPE,
            version=payload.VERSION,
            occurred_at=occurred_at or utcnow(),
            portfolio_id=portfolio_id,
            correlation_id=correlation_id or eid,
            causation_id=causation_id,
            route=route,
            metadata=metadata or {},
            payload=payload,
        )

    def derive(
        self,
        payload: Payload,
        stage: str,
        *,
        index: int = 0,
        portfolio_id: str | None = None,
        occurred_at: dt.datetime | None = None,
    ) -> Event[Any]:
        """The ``index``-th event ``stage`` emits in reaction to this one, with a derived id.

        It keeps the correlation id, route, metadata and trace context; the bus points the
        trace context at the consumer's span when tracing is on.
        """
        return EVENT_CLASSES[payload.EVENT_TYPE](
            event_id=derive_event_id(self.event_id, stage, index),
            event_type=payload.EVENT_TYPE,
            version=payload.VERSION,
            occurred_at=occurred_at or utcnow(),
            portfolio_id=portfolio_id or self.portfolio_id,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            route=self.route,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            metadata=self.metadata,
            payload=payload,
        )


_ZERO = dt.timedelta(0)

EVENT_CLASSES: dict[EventType, type[Event[Any]]] = {
    et: msgspec.defstruct(  # type: ignore[misc]
        f"{cls.__name__}Event",
        [("payload", cls)],
        bases=(Event,),
        module=__name__,
        frozen=True,
        forbid_unknown_fields=True,
        kw_only=True,
        gc=False,  # events hold no reference cycles; untracked, they cost the collector nothing
    )
    for et, cls in CATALOG.items()
}
"""The concrete envelope class of each event type."""
