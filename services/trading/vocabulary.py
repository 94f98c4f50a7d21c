"""The words every part of the platform trades in: sides, order types, time in force,
liquidity, a portfolio's trading state, the path that drives an order, the instrument, a
venue's quote, and the UTC timestamp every record and event carries.

They are the ground floor: the trading domain, the event catalog (``services.core.events``),
the venues and the services all name orders with them, and this module imports nothing else
of ours but ``services.trading.money``. The enums' values are what events carry on the wire.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from decimal import Decimal
from typing import Annotated

import msgspec

from services.trading.money import ZERO

__all__ = [
    "Instrument",
    "Liquidity",
    "OrderType",
    "Route",
    "Side",
    "TimeInForce",
    "TradingState",
    "UtcDatetime",
    "VenueQuote",
]

UtcDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]
"""A timestamp that must carry its time zone (msgspec refuses a naive one); UTC by convention."""


class Side(enum.StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(enum.StrEnum):
    MARKET = "market"
    LIMIT = "limit"


class TimeInForce(enum.StrEnum):
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"


class Liquidity(enum.StrEnum):
    """Whether a fill added liquidity to the book (maker) or took it (taker)."""

    MAKER = "maker"
    TAKER = "taker"


class TradingState(enum.StrEnum):
    """What a portfolio may do: ACTIVE trades freely, REDUCING only shrinks positions,
    HALTED places no new orders."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


class Route(enum.StrEnum):
    """Which path drives an event: stream stages act only on ``stream`` events."""

    STREAM = "stream"
    WORKFLOW = "workflow"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Instrument:
    """A spot pair as a venue trades it: ``BTC/USDT`` is base BTC, quote USDT."""

    symbol: str
    base: str
    quote: str
    quantity_step: Decimal
    price_step: Decimal
    min_quantity: Decimal
    max_quantity: Decimal
    min_notional: Decimal = ZERO

    def __post_init__(self) -> None:
        if not (self.quantity_step > 0 and self.price_step > 0):
            raise ValueError(f"{self.symbol}: steps must be positive")
        if not (0 < self.min_quantity <= self.max_quantity):
            raise ValueError(f"{self.symbol}: need 0 < min_quantity <= max_quantity")
        if self.min_notional < 0:
            raise ValueError(f"{self.symbol}: min_notional must not be negative")


class VenueQuote(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    """One venue a router considered: its expected price and fee, and whether it was healthy.

    ``exchange.routed`` carries these as its ``candidates``.
    """

    venue: str
    expected_price: Decimal | None
    fee_rate: Decimal
    healthy: bool
