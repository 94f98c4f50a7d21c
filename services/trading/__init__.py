"""The pure trading domain: its vocabulary, the order and its state machine, positions and
PnL, pre-trade risk, funds held for open orders, routing.

No I/O here: no Redis, no HTTP, no asyncio, no clock reads (time is a parameter), and money
is ``Decimal`` only, so the same code runs in a stream consumer, a Hatchet task, a replay and
a unit test. This package is the ground floor: it imports nothing of ours from outside it,
and the rest of the platform, the event catalog included, names orders with its vocabulary
(``Side``, ``OrderType``, ``TimeInForce``, ``TradingState``...).
"""

from __future__ import annotations

from services.trading.funds import Hold, hold_for
from services.trading.money import DECIMAL_CONTEXT
from services.trading.orders import (
    TERMINAL,
    TRANSITIONS,
    Fill,
    InvalidFill,
    InvalidTransition,
    Order,
    OrderStatus,
)
from services.trading.positions import Position
from services.trading.risk import (
    OrderIntent,
    RejectReason,
    RiskDecision,
    RiskLimits,
    check_order,
)
from services.trading.routing import NoVenueAvailable, RouteDecision, VenueOption, choose_venue
from services.trading.terms import OrderTerms
from services.trading.vocabulary import (
    Instrument,
    Liquidity,
    OrderType,
    Route,
    Side,
    TimeInForce,
    TradingState,
    UtcDatetime,
    VenueQuote,
)

__all__ = [
    "DECIMAL_CONTEXT",
    "TERMINAL",
    "TRANSITIONS",
    "Fill",
    "Hold",
    "Instrument",
    "InvalidFill",
    "InvalidTransition",
    "Liquidity",
    "NoVenueAvailable",
    "Order",
    "OrderIntent",
    "OrderStatus",
    "OrderTerms",
    "OrderType",
    "Position",
    "RejectReason",
    "RiskDecision",
    "RiskLimits",
    "Route",
    "RouteDecision",
    "Side",
    "TimeInForce",
    "TradingState",
    "UtcDatetime",
    "VenueOption",
    "VenueQuote",
    "check_order",
    "choose_venue",
    "hold_for",
]
