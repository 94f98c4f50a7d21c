"""The instrument catalogue: what the platform trades, combined from what each venue lists,
and the mark of a symbol, combined from what each venue quotes.

Several venues may list one symbol with different terms. The catalogue's terms are the
strictest of them, so an order valid for the catalogue is valid at every venue listing it
(routing may send it to any of them):

- steps (price and quantity): the least common multiple of the venues' steps (the coarsest
  one where, as usual, steps are powers of ten);
- minimums (quantity and notional): the highest; a minimum quantity below one step is one step;
- the taker fee, which risk adds to what a buy must be able to pay: the highest.

A venue whose base or quote for a symbol differs from the first venue's (in name order) is
left out of that symbol: it names another pair.

A symbol's mark is the median of the mids of the venues quoting it (a venue's mid: its own
where it keeps one, the paper venue; else the middle of its best bid and ask; else its last
trade), rounded to the symbol's price step: one venue far off the others does not move it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from services.trading.money import money_context
from services.trading.vocabulary import Instrument

__all__ = [
    "MAX_QUANTITY",
    "Catalogue",
    "MarketPrice",
    "MarketTerms",
    "VenuePrice",
    "combine_markets",
    "combine_prices",
    "mid_of",
]

MAX_QUANTITY = Decimal("1000000")
"""The largest quantity of one order (venues' markets say none)."""


class MarketTerms(Protocol):
    """How one venue trades a symbol (``services.venues.base.Market`` is one)."""

    @property
    def symbol(self) -> str: ...
    @property
    def base(self) -> str: ...
    @property
    def quote(self) -> str: ...
    @property
    def price_step(self) -> Decimal: ...
    @property
    def quantity_step(self) -> Decimal: ...
    @property
    def min_quantity(self) -> Decimal: ...
    @property
    def min_notional(self) -> Decimal: ...
    @property
    def taker_fee(self) -> Decimal: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Catalogue:
    """Every symbol the venues list: its instrument, the worst taker fee among the venues
    listing it, and those venues (by name, sorted)."""

    instruments: dict[str, Instrument]
    taker_fees: dict[str, Decimal]
    venues: dict[str, tuple[str, ...]]

    def instrument(self, symbol: str) -> Instrument | None:
        return self.instruments.get(symbol)

    def taker_fee(self, symbol: str) -> Decimal | None:
        return self.taker_fees.get(symbol)

    def quantity_steps(self) -> dict[str, Decimal]:
        return {s: i.quantity_step for s, i in self.instruments.items()}

    def price_steps(self) -> dict[str, Decimal]:
        return {s: i.price_step for s, i in self.instruments.items()}


def combine_markets(
    by_venue: Mapping[str, Mapping[str, MarketTerms]], *, max_quantity: Decimal = MAX_QUANTITY
) -> Catalogue:
    """The catalogue of the markets each venue (by name) lists, by symbol."""
    listed: dict[str, list[tuple[str, MarketTerms]]] = {}
    for venue in sorted(by_venue):
        for symbol, market in by_venue[venue].items():
            listed.setdefault(symbol, []).append((venue, market))
    instruments: dict[str, Instrument] = {}
    fees: dict[str, Decimal] = {}
    venues: dict[str, tuple[str, ...]] = {}
    for symbol in sorted(listed):
        first = listed[symbol][0][1]
        same = [(v, m) for v, m in listed[symbol] if (m.base, m.quote) == (first.base, first.quote)]
        markets = [m for _, m in same]
        quantity_step = _lcm(m.quantity_step for m in markets)
        instruments[symbol] = Instrument(
            symbol=symbol,
            base=first.base,
            quote=first.quote,
            quantity_step=quantity_step,
            price_step=_lcm(m.price_step for m in markets),
            min_quantity=max(quantity_step, *(m.min_quantity for m in markets)),
            max_quantity=max_quantity,
            min_notional=max(m.min_notional for m in markets),
        )
        fees[symbol] = max(m.taker_fee for m in markets)
        venues[symbol] = tuple(v for v, _ in same)
    return Catalogue(instruments=instruments, taker_fees=fees, venues=venues)


def _lcm(steps: Iterable[Decimal]) -> Decimal:
    """The least common multiple of positive decimal steps (0.01 and 0.025: 0.05)."""
    values = list(steps)
    places = max(max(-_exponent(v) for v in values), 0)
    scale = Decimal(10) ** places
    with money_context():
        step = (Decimal(math.lcm(*(int(v * scale) for v in values))) / scale).normalize()
    return step if _exponent(step) <= 0 else step.quantize(Decimal(1))


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int), value  # finite: steps are positive numbers
    return exponent


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VenuePrice:
    """One venue's price of a symbol: its best bid and ask, its last trade, and its own mid
    where it keeps one (the paper venue's market is a mid price)."""

    venue: str
    bid: Decimal | None = None
    ask: Decimal | None = None
    last: Decimal | None = None
    mid: Decimal | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MarketPrice:
    """A symbol's price across the venues: the highest bid, the lowest ask, the median last
    trade, the mark, and the venues that gave a price (sorted)."""

    bid: Decimal | None
    ask: Decimal | None
    last: Decimal | None
    mark: Decimal
    venues: tuple[str, ...]


def mid_of(price: VenuePrice) -> Decimal | None:
    """The venue's own mid; else the middle of its best bid and ask; else its last trade;
    ``None`` where none of them is a positive price."""
    if price.mid is not None and price.mid > 0:
        return price.mid
    with money_context():
        if price.bid is not None and price.ask is not None and 0 < price.bid <= price.ask:
            return (price.bid + price.ask) / 2
    if price.last is not None and price.last > 0:
        return price.last
    return None


def combine_prices(prices: Iterable[VenuePrice], price_step: Decimal) -> MarketPrice | None:
    """The mark is the median of the venues' mids (the mean of the middle two for an even
    count) on the price step; ``None`` where no venue has a price."""
    quoting = [(p, m) for p in prices if (m := mid_of(p)) is not None]
    if not quoting:
        return None
    with money_context():
        mark = _median([m for _, m in quoting]).quantize(price_step, rounding=ROUND_HALF_EVEN)
    bids = [p.bid for p, _ in quoting if p.bid is not None]
    asks = [p.ask for p, _ in quoting if p.ask is not None]
    lasts = [p.last for p, _ in quoting if p.last is not None]
    return MarketPrice(
        bid=max(bids, default=None),
        ask=min(asks, default=None),
        last=_median(lasts) if lasts else None,
        mark=mark if mark > 0 else price_step,
        venues=tuple(sorted(p.venue for p, _ in quoting)),
    )


def _median(values: list[Decimal]) -> Decimal:
    ordered = sorted(values)
    half = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[half]
    with money_context():
        return (ordered[half - 1] + ordered[half]) / 2
