"""Exchanges behind one protocol: ``Venue``, its domain types and errors, and the paper venue.

An adapter's library types and exceptions stop inside the adapter: callers see only what
this package exports.
"""

from __future__ import annotations

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
    Venue,
    VenueError,
    VenueFill,
    VenueOrder,
    VenueOrderRequest,
    VenueOrderStatus,
    VenueUnavailable,
    in_process,
    platform_fill_id,
)
from services.venues.paper import DEFAULT_MARKETS, DEFAULT_PRICES, PaperFaults, PaperVenue

__all__ = [
    "DEFAULT_MARKETS",
    "DEFAULT_PRICES",
    "Balance",
    "BookLevel",
    "Clock",
    "InsufficientFunds",
    "Market",
    "OrderBook",
    "OrderNotFound",
    "OrderRejected",
    "PaperFaults",
    "PaperVenue",
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
