"""Choosing a venue: the best expected price net of fees among venues that can take the order.

A venue qualifies when it is healthy (its circuit breaker is closed), lists the symbol and
has an expected price. A buy goes where ``price * (1 + fee_rate)`` is lowest, a sell where
``price * (1 - fee_rate)`` is highest; equal effective prices go to the venue whose name
sorts first, so the same inputs always pick the same venue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from decimal import Decimal

from services.trading.money import money_context
from services.trading.vocabulary import Side, VenueQuote

__all__ = ["NoVenueAvailable", "RouteDecision", "VenueOption", "choose_venue"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VenueOption:
    """What the router knows about one venue for one order."""

    venue: str
    healthy: bool
    lists_symbol: bool
    expected_price: Decimal | None
    fee_rate: Decimal

    @property
    def qualifies(self) -> bool:
        return (
            self.healthy
            and self.lists_symbol
            and self.expected_price is not None
            and self.expected_price.is_finite()
            and self.expected_price > 0
        )

    def effective_price(self, side: Side) -> Decimal:
        """The expected price with the fee folded in; only for a qualifying venue."""
        assert self.expected_price is not None
        with money_context():
            if side is Side.BUY:
                return self.expected_price * (1 + self.fee_rate)
            return self.expected_price * (1 - self.fee_rate)

    def as_quote(self) -> VenueQuote:
        """As recorded in ``exchange.routed``; a venue that does not list the symbol is
        recorded as not healthy for this order."""
        return VenueQuote(
            venue=self.venue,
            expected_price=self.expected_price,
            fee_rate=self.fee_rate,
            healthy=self.healthy and self.lists_symbol,
        )


class NoVenueAvailable(Exception):
    """No healthy venue that lists the symbol has a price; the order fails."""

    def __init__(self, symbol: str, candidates: tuple[VenueOption, ...], requested: str | None = None) -> None:
        which = f"venue {requested}" if requested else "no venue"
        super().__init__(f"{which} can take {symbol}: {', '.join(_why(c) for c in candidates) or 'no venues'}")
        self.symbol = symbol
        self.candidates = candidates


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RouteDecision:
    venue: str
    expected_price: Decimal
    fee_rate: Decimal
    effective_price: Decimal
    reason: str
    candidates: tuple[VenueOption, ...]
    """Every venue considered, in the order given, chosen or not."""

    def quotes(self) -> tuple[VenueQuote, ...]:
        return tuple(c.as_quote() for c in self.candidates)


def choose_venue(
    symbol: str, side: Side, candidates: Iterable[VenueOption], *, requested_venue: str | None = None
) -> RouteDecision:
    """The venue for one order. ``requested_venue`` (the client named one) restricts the
    choice to that venue, which must still qualify. Raises ``NoVenueAvailable``."""
    considered = tuple(candidates)
    eligible = [
        c for c in considered if c.qualifies and (requested_venue is None or c.venue == requested_venue)
    ]
    if not eligible:
        raise NoVenueAvailable(symbol, considered, requested_venue)
    if side is Side.BUY:
        best = min(eligible, key=lambda c: (c.effective_price(side), c.venue))
    else:
        best = min(eligible, key=lambda c: (-c.effective_price(side), c.venue))
    assert best.expected_price is not None
    if requested_venue is not None:
        reason = "requested by the client"
    elif len(eligible) == 1:
        reason = "only qualifying venue"
    else:
        reason = f"best net {side} price of {len(eligible)} qualifying venues"
    return RouteDecision(
        venue=best.venue,
        expected_price=best.expected_price,
        fee_rate=best.fee_rate,
        effective_price=best.effective_price(side),
        reason=reason,
        candidates=considered,
    )


def _why(c: VenueOption) -> str:
    if not c.healthy:
        return f"{c.venue} unhealthy"
    if not c.lists_symbol:
        return f"{c.venue} does not list it"
    if not c.qualifies:
        return f"{c.venue} has no price"
    return f"{c.venue} not requested"
