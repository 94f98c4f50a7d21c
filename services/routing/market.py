"""The market feed: the instrument catalogue and the marks, both from the venues.

One process at a time runs it (a Redis lock elects it, as the local price feed's did); every
``ZVT_ROUTING_FEED_INTERVAL_S`` it

- asks each venue for its prices of the symbols of the catalogue: a ccxt venue (a real
  exchange, a simulated venue server) its ticker; the in-process paper venue its own mid,
  after one step of its random walk (``PaperVenue.tick``, ``ZVT_ROUTING_FEED_VOLATILITY`` and
  ``_SEED``) from where the marks hash has it, so restarts and fail-overs keep prices
  continuous and volatility 0 keeps every mark still;
- combines them into each symbol's mark (``services.trading.catalogue.combine_prices``: the
  median of the venues' mids) and, for each mark that moved, emits ``price.updated`` (keyed
  ``market:<symbol>`` on the bus, as ``market_data.process`` does) and writes the marks hash;
- every ``ZVT_ROUTING_CATALOGUE_INTERVAL_S``, builds the catalogue from the venues' markets
  again and publishes it (``services.core.catalogue``).

Every routing process's paper venue follows the marks hash (``RoutingStage.follow``), so the
elected process's walk moves them all. ``open`` (every process that holds venues, once)
publishes the catalogue and puts a starting mark, from the venues' prices, for each symbol
that has none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from redis.exceptions import RedisError

from services.core.bus import Bus
from services.core.catalogue import publish_catalogue
from services.core.events import Event, PriceUpdated
from services.core.hotstate import StateKeys
from services.core.marks import parse_marks
from services.core.telemetry import get_logger
from services.trading.catalogue import Catalogue, MarketPrice, VenuePrice, combine_markets, combine_prices
from services.venues.base import Market, Venue, VenueError
from services.venues.paper import PaperVenue

__all__ = ["MarketFeed", "build_catalogue"]

log = get_logger("zvt.market")


async def build_catalogue(venues: Sequence[Venue], *, reload: bool = False) -> Catalogue | None:
    """The catalogue of the venues' markets; a venue that does not answer is left out (its
    symbols with it), ``None`` where none answers. ``reload``: ask the venues again rather
    than take the markets they loaded before."""
    by_venue: dict[str, dict[str, Market]] = {}
    for venue in venues:
        reloader = getattr(venue, "reload_markets", None)
        try:
            by_venue[venue.name] = await (reloader() if reload and reloader is not None else venue.markets())
        except VenueError as exc:
            log.warning("venue markets not loaded; its symbols are left out of the catalogue",
                        venue=venue.name, error=str(exc))
    return combine_markets(by_venue) if by_venue else None


class MarketFeed:
    def __init__(
        self, bus: Bus, venues: Sequence[Venue], *, owner: str, catalogue_interval_s: float = 300.0
    ) -> None:
        self.bus = bus
        self.redis: Any = bus.redis
        self.keys = bus.keys
        self.marks_key = StateKeys(bus.keys).marks()
        self.lock = bus.keys.global_key("price-feed-lock")
        self.venues = list(venues)
        self.owner = owner
        self.catalogue_interval_s = catalogue_interval_s
        self.catalogue: Catalogue | None = None
        self._catalogue_at = float("-inf")

    async def open(self, *, publish: bool = True) -> Catalogue | None:
        """Build the catalogue (and publish it, or with ``publish`` False only where there is
        none), and seed the marks missing from the venues' prices."""
        await self._refresh_catalogue(reload=False, only_if_absent=not publish)
        if self.catalogue is not None:
            for symbol, price in (await self._prices(self.catalogue, {}, walk=False)).items():
                await self.redis.hsetnx(self.marks_key, symbol, str(price.mark))
        return self.catalogue

    async def step(self, interval_s: float) -> bool:
        """One round, if this process holds the feed; True if it did."""
        try:
            if not await self._elected(interval_s):
                return False
            if time.monotonic() - self._catalogue_at >= self.catalogue_interval_s or self.catalogue is None:
                await self._refresh_catalogue(reload=True, only_if_absent=False)
            if self.catalogue is None:
                return True
            marks = parse_marks(await self.redis.hgetall(self.marks_key))
            prices = await self._prices(self.catalogue, marks, walk=True)
            moved = {s: p for s, p in prices.items() if marks.get(s) != p.mark}
            if moved:
                await self.bus.publish_many([_price_updated(s, p) for s, p in sorted(moved.items())])
                await self.redis.hset(self.marks_key, mapping={s: str(p.mark) for s, p in moved.items()})
            return True
        except RedisError as exc:
            log.warning("market feed step failed", error=str(exc))
            return False

    async def _elected(self, interval_s: float) -> bool:
        r = self.redis
        ttl_ms = max(int(interval_s * 3000), 1000)
        if await r.set(self.lock, self.owner, nx=True, px=ttl_ms):
            return True
        if await r.get(self.lock) != self.owner.encode():
            return False
        await r.pexpire(self.lock, ttl_ms)
        return True

    async def _refresh_catalogue(self, *, reload: bool, only_if_absent: bool) -> None:
        self._catalogue_at = time.monotonic()
        catalogue = await build_catalogue(self.venues, reload=reload)
        if catalogue is None:
            return
        self.catalogue = catalogue
        await publish_catalogue(self.redis, self.keys, catalogue, only_if_absent=only_if_absent)

    async def _prices(
        self, catalogue: Catalogue, marks: dict[str, Decimal], *, walk: bool
    ) -> dict[str, MarketPrice]:
        """Each listed symbol's price across the venues listing it. ``walk``: the paper venues
        start from ``marks`` and take one step of their walk first."""
        asked: list[tuple[str, Venue]] = []
        quotes: dict[str, list[VenuePrice]] = {}
        for venue in self.venues:
            symbols = [s for s, names in catalogue.venues.items() if venue.name in names]
            if isinstance(venue, PaperVenue):
                for symbol in symbols:
                    if walk:
                        mark = marks.get(symbol)
                        if mark is not None and venue.mid(symbol) != mark:
                            venue.set_price(symbol, mark)
                        venue.tick(symbol)
                    quotes.setdefault(symbol, []).append(VenuePrice(venue=venue.name, mid=venue.mid(symbol)))
            else:
                asked += [(s, venue) for s in symbols]
        tickers = await asyncio.gather(*(v.ticker(s) for s, v in asked), return_exceptions=True)
        for (symbol, venue), ticker in zip(asked, tickers, strict=True):
            if isinstance(ticker, BaseException):
                if not isinstance(ticker, VenueError | TimeoutError):
                    raise ticker
                continue  # no price from this venue this round; the others make the mark
            quotes.setdefault(symbol, []).append(
                VenuePrice(venue=venue.name, bid=ticker.bid, ask=ticker.ask, last=ticker.last)
            )
        out: dict[str, MarketPrice] = {}
        for symbol, venue_prices in quotes.items():
            instrument = catalogue.instrument(symbol)
            assert instrument is not None
            price = combine_prices(venue_prices, instrument.price_step)
            if price is not None:
                out[symbol] = price
        return out


def _price_updated(symbol: str, price: MarketPrice) -> Event[Any]:
    """``venue`` names the venues the mark combines, joined by ``+``."""
    return Event.new(
        PriceUpdated(
            symbol=symbol, venue="+".join(price.venues), bid=price.bid, ask=price.ask, last=price.last, mark=price.mark
        ),
        portfolio_id=f"market:{symbol}",
    )
