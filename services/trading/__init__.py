"""The pure trading domain: order state machine, positions and PnL, pre-trade risk, funds held
for open orders, routing.

No I/O here: no Redis, no HTTP, no asyncio, no clock reads (time is a parameter), and money
is ``Decimal`` only, so the same code runs in a stream consumer, a Hatchet task, a replay and
a unit test. Enums shared with events (``Side``, ``OrderType``...) live in ``services.core.events``.
"""

from __future__ import annotations

from services.trading.funds import Hold, hold_for
from services.trading.money import DECIMAL_CONTEXT
from services.trading.orders import (
    TERMINAL,
    TRANSITIONS,
    InvalidFill,
    InvalidTransition,
    Order,
    OrderStatus,
)
from services.trading.positions import Position
from services.trading.risk import (
    Instrument,
    OrderIntent,
    RejectReason,
    RiskDecision,
    RiskLimits,
    check_order,
)
from services.trading.routing import NoVenueAvailable, RouteDecision, VenueOption, choose_venue

__all__ = [
    "DECIMAL_CONTEXT",
    "TERMINAL",
    "TRANSITIONS",
    "Hold",
    "Instrument",
    "InvalidFill",
    "InvalidTransition",
    "NoVenueAvailable",
    "Order",
    "OrderIntent",
    "OrderStatus",
    "Position",
    "RejectReason",
    "RiskDecision",
    "RiskLimits",
    "RouteDecision",
    "VenueOption",
    "check_order",
    "choose_venue",
    "hold_for",
]
