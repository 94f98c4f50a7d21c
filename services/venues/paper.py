"""``PaperVenue``: an in-process simulated exchange for one account, with no I/O.

The market is a mid price per symbol, moved by ``set_price`` or by a seeded random walk
(``tick``), and an order book synthesized around it: ``book_levels`` levels each side,
``level_spacing`` apart (a fraction of the mid), each level ``level_notional * (i + 1)`` of
quote deep. Taking liquidity does not consume it: the book is rebuilt from the mid on every
read, so the venue's own orders never move the market.

Matching:

- a market order walks the book and fills as taker, level by level; what the book cannot
  fill expires (a market order is always immediate-or-cancel);
- a limit order fills as taker at every level up to its price; the rest rests as a maker
  order (GTC), or expires (IOC). A FOK order fills completely or expires with nothing filled;
- a resting limit order fills as maker at its own price once a price move puts the opposite
  best level at or through it, up to that level's depth: an order larger than the level
  fills over several moves (partial fills over time), each move taking at most one level.

Order and fill ids carry a token drawn when the venue is built, so two paper venues (two
processes, or one restarted) never give the same id to different orders or executions.

Funds: a buy reserves quote (its limit notional plus the worst fee rate, or a market order's
planned cost), a sell reserves base; fees are charged in the quote asset. A fill moves money
out of the reservation; whatever an order no longer needs goes back to ``free``.

``PaperFaults`` lets a test make the next submits fail, before or after the order lands, and
add latency to every call.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import itertools
import os
import random
from collections.abc import Callable, Iterable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import ClassVar

from services.core.events import utcnow
from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.money import ZERO, is_multiple, money_context
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
    VenueError,
    VenueFill,
    VenueOrder,
    VenueOrderRequest,
    VenueOrderStatus,
    VenueUnavailable,
)

__all__ = ["DEFAULT_MARKETS", "DEFAULT_PRICES", "PaperFaults", "PaperVenue"]


def _usdt_market(base: str, quantity_step: str) -> Market:
    return Market(
        symbol=f"{base}/USDT",
        base=base,
        quote="USDT",
        price_step=Decimal("0.01"),
        quantity_step=Decimal(quantity_step),
        min_quantity=Decimal(quantity_step),
        min_notional=Decimal("5"),
        maker_fee=Decimal("0.0008"),
        taker_fee=Decimal("0.001"),
    )


DEFAULT_MARKETS: Mapping[str, Market] = {
    m.symbol: m
    for m in (_usdt_market("BTC", "0.00001"), _usdt_market("ETH", "0.0001"), _usdt_market("SOL", "0.001"))
}
DEFAULT_PRICES: Mapping[str, Decimal] = {
    "BTC/USDT": Decimal("60000"),
    "ETH/USDT": Decimal("3000"),
    "SOL/USDT": Decimal("150"),
}

_WALK_RESOLUTION = 1000
"""A tick draws an integer in [-resolution, resolution], so the walk is exact in Decimal
and the same seed gives the same path on every platform."""


# ---------------------------------------------------------------------------------------------
# Fault injection


@dataclasses.dataclass(frozen=True, slots=True)
class _Fault:
    error: VenueError
    after_apply: bool


class PaperFaults:
    """What goes wrong next. Faults queue up and each submit takes the first one."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency
        """Seconds every call sleeps before it does anything."""
        self._pending: collections.deque[_Fault] = collections.deque()

    def unavailable(self, times: int = 1) -> None:
        """The next ``times`` submits raise ``VenueUnavailable`` without placing the order."""
        self._push(times, lambda: _Fault(VenueUnavailable("simulated outage"), after_apply=False))

    def rate_limited(self, times: int = 1, *, retry_after: float = 1.0) -> None:
        """The next ``times`` submits raise ``RateLimited`` without placing the order."""
        self._push(times, lambda: _Fault(RateLimited("simulated rate limit", retry_after=retry_after), False))

    def rejected(self, times: int = 1) -> None:
        """The next ``times`` submits raise ``OrderRejected`` without placing the order."""
        self._push(times, lambda: _Fault(OrderRejected("simulated rejection"), after_apply=False))

    def unknown_outcome(self, times: int = 1) -> None:
        """The next ``times`` submits place the order, then raise ``UnknownOutcome`` as if the
        response had been lost."""
        self._push(times, lambda: _Fault(UnknownOutcome("simulated timeout after the order landed"), True))

    def clear(self) -> None:
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _push(self, times: int, make: Callable[[], _Fault]) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        self._pending.extend(make() for _ in range(times))

    def _next(self) -> _Fault | None:
        return self._pending.popleft() if self._pending else None


# ---------------------------------------------------------------------------------------------
# The venue


@dataclasses.dataclass(slots=True, kw_only=True)
class _WorkingOrder:
    """The venue's mutable record of one order; callers only ever see ``snapshot()``."""

    venue_order_id: str
    request: VenueOrderRequest
    market: Market
    status: VenueOrderStatus
    created_at: dt.datetime
    updated_at: dt.datetime
    filled: Decimal = ZERO
    notional: Decimal = ZERO
    fees: Decimal = ZERO
    fills: list[VenueFill] = dataclasses.field(default_factory=list)
    reserved: Decimal = ZERO
    """Quote (buy) or base (sell) held in ``used`` for this order."""

    @property
    def leaves(self) -> Decimal:
        return self.request.quantity - self.filled

    def snapshot(self, venue: str) -> VenueOrder:
        r = self.request
        with money_context():
            average = self.notional / self.filled if self.filled else None
        return VenueOrder(
            venue=venue,
            venue_order_id=self.venue_order_id,
            client_order_id=r.client_order_id,
            symbol=r.symbol,
            side=r.side,
            order_type=r.order_type,
            time_in_force=r.time_in_force,
            quantity=r.quantity,
            price=r.price,
            status=self.status,
            filled_quantity=self.filled,
            average_price=average,
            fees=self.fees,
            fee_asset=self.market.quote,
            fills=tuple(self.fills),
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class PaperVenue:
    """A simulated venue holding one account. Implements ``services.venues.Venue``.

    Deterministic for a given ``seed`` and ``clock``. Not thread-safe; safe under asyncio
    because no call awaits anything after its (optional) latency sleep.

    In-process (``IN_PROCESS``): its orders live in this object only, so another process's
    paper venue of the same name knows nothing of them (``services.venues.base.in_process``).
    """

    IN_PROCESS: ClassVar[bool] = True

    def __init__(
        self,
        name: str = "paper",
        *,
        markets: Mapping[str, Market] | Iterable[Market] | None = None,
        prices: Mapping[str, Decimal] | None = None,
        balances: Mapping[str, Decimal] | None = None,
        clock: Clock = utcnow,
        seed: int = 0,
        volatility: Decimal = Decimal("0.001"),
        book_levels: int = 5,
        level_spacing: Decimal = Decimal("0.0005"),
        level_notional: Decimal = Decimal("50000"),
        faults: PaperFaults | None = None,
    ) -> None:
        """``volatility`` is the largest move of one ``tick`` as a fraction of the mid;
        ``prices`` must give a starting mid for every market (defaults: ``DEFAULT_PRICES``)."""
        if markets is None:
            markets = DEFAULT_MARKETS
        market_list = list(markets.values()) if isinstance(markets, Mapping) else list(markets)
        if book_levels < 1:
            raise ValueError("book_levels must be at least 1")
        if not (level_spacing > 0 and level_notional > 0 and volatility >= 0):
            raise ValueError("level_spacing and level_notional must be positive, volatility not negative")
        self._name = name
        self._markets: dict[str, Market] = {m.symbol: m for m in market_list}
        self._clock = clock
        self._rng = random.Random(seed)
        self._volatility = volatility
        self._book_levels = book_levels
        self._level_spacing = level_spacing
        self._level_notional = level_notional
        self.faults = faults if faults is not None else PaperFaults()
        starting = DEFAULT_PRICES if prices is None else prices
        self._mid: dict[str, Decimal] = {}
        self._last: dict[str, Decimal] = {}
        for symbol in self._markets:
            if symbol not in starting:
                raise ValueError(f"no starting price for {symbol}")
            self._mid[symbol] = self._on_step(symbol, starting[symbol])
            self._last[symbol] = self._mid[symbol]
        self._free: dict[str, Decimal] = {}
        self._used: dict[str, Decimal] = {}
        self._orders: dict[str, _WorkingOrder] = {}
        self._by_client_id: dict[str, _WorkingOrder] = {}
        self._token = os.urandom(3).hex()
        """In every order and fill id: ids are unique across venues and restarts."""
        self._order_ids = itertools.count(1)
        self._books: dict[tuple[str, int], tuple[Decimal, tuple[BookLevel, ...], tuple[BookLevel, ...]]] = {}
        self._fill_ids = itertools.count(1)
        if balances:
            self.fund(balances)

    # -- the protocol ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    async def markets(self) -> dict[str, Market]:
        await self._latency()
        return dict(self._markets)

    async def submit(self, order: VenueOrderRequest) -> VenueOrder:
        await self._latency()
        fault = self.faults._next()
        if fault is not None and not fault.after_apply:
            raise _for_venue(fault.error, self._name)
        placed = self._submit(order)
        if fault is not None:
            error = fault.error
            if isinstance(error, UnknownOutcome):
                error.client_order_id = order.client_order_id
            raise _for_venue(error, self._name)
        return placed

    async def cancel(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        await self._latency()
        return self.cancel_now(symbol, venue_order_id=venue_order_id, client_order_id=client_order_id)

    async def fetch_order(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        await self._latency()
        return self.find_now(symbol, venue_order_id=venue_order_id, client_order_id=client_order_id)

    async def open_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        await self._latency()
        return self.open_orders_now(symbol)

    async def balances(self) -> dict[str, Balance]:
        await self._latency()
        return self.balances_now()

    async def ticker(self, symbol: str) -> Ticker:
        await self._latency()
        book = self.book_now(symbol, 1)
        return Ticker(
            symbol=symbol,
            bid=book.bids[0].price if book.bids else None,
            ask=book.asks[0].price if book.asks else None,
            last=self._last[symbol],
            at=self._clock(),
        )

    async def order_book(self, symbol: str, depth: int) -> OrderBook:
        await self._latency()
        return self.book_now(symbol, depth)

    # -- the same, synchronous and with no latency or faults (the venue server calls these) --

    def markets_now(self) -> dict[str, Market]:
        return dict(self._markets)

    def submit_now(self, order: VenueOrderRequest) -> VenueOrder:
        return self._submit(order)

    def cancel_now(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        working = self._find(symbol, venue_order_id, client_order_id)
        if not working.status.is_terminal:
            self._finish(working, VenueOrderStatus.CANCELED)
        return working.snapshot(self._name)

    def find_now(
        self, symbol: str, *, venue_order_id: str | None = None, client_order_id: str | None = None
    ) -> VenueOrder:
        return self._find(symbol, venue_order_id, client_order_id).snapshot(self._name)

    def open_orders_now(self, symbol: str | None = None) -> list[VenueOrder]:
        return [w.snapshot(self._name) for w in self._working(symbol)]

    def all_orders_now(self) -> list[VenueOrder]:
        """Every order still in memory, terminal ones too, oldest first."""
        return [w.snapshot(self._name) for w in self._orders.values()]

    def book_now(self, symbol: str, depth: int) -> OrderBook:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        return self._book(self._market(symbol), min(depth, self._book_levels))

    def last_now(self, symbol: str) -> Decimal:
        self._market(symbol)
        return self._last[symbol]

    # -- simulation controls -----------------------------------------------------------------

    def fund(self, balances: Mapping[str, Decimal]) -> None:
        """Set the free balance of each named asset; reservations of open orders stay."""
        for asset, amount in balances.items():
            if not (amount.is_finite() and amount >= 0):
                raise ValueError(f"{asset}: balance must be a non-negative number, got {amount}")
            self._free[asset] = amount
            self._used.setdefault(asset, ZERO)

    def forget(self, client_order_id: str) -> None:
        """Drop a finished order from memory (a long-running router submits millions)."""
        working = self._by_client_id.get(client_order_id)
        if working is not None and working.status.is_terminal:
            del self._by_client_id[client_order_id]
            self._orders.pop(working.venue_order_id, None)

    def balances_now(self) -> dict[str, Balance]:
        """``balances()`` without the latency, for tests and the synchronous feed."""
        return {a: Balance(free=self._free[a], used=self._used.get(a, ZERO)) for a in sorted(self._free)}

    def mid(self, symbol: str) -> Decimal:
        self._market(symbol)
        return self._mid[symbol]

    def set_price(self, symbol: str, price: Decimal) -> list[VenueOrder]:
        """Move the mid (rounded to the price step) and fill the resting orders it reaches.
        Returns those orders as they are after their fills."""
        self._market(symbol)
        if not (price.is_finite() and price > 0):
            raise ValueError(f"{symbol}: price must be positive, got {price}")
        self._mid[symbol] = self._on_step(symbol, price)
        self._last[symbol] = self._mid[symbol]
        return self._fill_resting(symbol)

    def tick(self, symbol: str | None = None) -> list[VenueOrder]:
        """One step of the random walk for one symbol or all (in symbol order); returns the
        resting orders it filled."""
        symbols = [symbol] if symbol is not None else sorted(self._markets)
        filled: list[VenueOrder] = []
        for s in symbols:
            step = self._market(s).price_step
            draw = self._rng.randint(-_WALK_RESOLUTION, _WALK_RESOLUTION)
            with money_context():
                moved = self._mid[s] * (1 + self._volatility * draw / _WALK_RESOLUTION)
            filled += self.set_price(s, max(moved, step))
        return filled

    # -- submit ------------------------------------------------------------------------------

    def _submit(self, request: VenueOrderRequest) -> VenueOrder:
        existing = self._by_client_id.get(request.client_order_id)
        if existing is not None:
            if existing.request != request:
                raise OrderRejected(
                    f"client order id {request.client_order_id} is already used by a different order",
                    venue=self._name,
                )
            return existing.snapshot(self._name)
        market = self._validate(request)
        buy = request.side is Side.BUY
        plan = self._plan_taker(market, request.side, request.quantity, request.price)
        with money_context():
            plannable = sum((q for _, q in plan), ZERO)
            if buy:
                reserve = (
                    request.quantity * request.price * (1 + _worst_fee(market))
                    if request.price is not None
                    else sum((q * p for p, q in plan), ZERO) * (1 + market.taker_fee)
                )
                asset = market.quote
            else:
                reserve = request.quantity
                asset = market.base
        free = self._free.get(asset, ZERO)
        if free < reserve:
            raise InsufficientFunds(
                f"{request.side} {request.quantity} {request.symbol} needs {reserve} {asset}, {free} free",
                venue=self._name,
            )
        now = self._clock()
        working = _WorkingOrder(
            venue_order_id=f"{self._name}-{self._token}-order-{next(self._order_ids)}",
            request=request,
            market=market,
            status=VenueOrderStatus.OPEN,
            created_at=now,
            updated_at=now,
        )
        self._orders[working.venue_order_id] = working
        self._by_client_id[request.client_order_id] = working
        if request.time_in_force is TimeInForce.FOK and plannable < request.quantity:
            self._finish(working, VenueOrderStatus.EXPIRED)
            return working.snapshot(self._name)
        self._reserve(working, reserve)
        for price, quantity in plan:
            self._fill(working, quantity, price, Liquidity.TAKER)
        immediate = request.order_type is OrderType.MARKET or request.time_in_force is not TimeInForce.GTC
        if working.leaves > 0 and immediate:
            self._finish(working, VenueOrderStatus.EXPIRED)
        return working.snapshot(self._name)

    def _validate(self, r: VenueOrderRequest) -> Market:
        market = self._markets.get(r.symbol)
        if market is None:
            raise OrderRejected(f"unknown symbol {r.symbol}", venue=self._name)
        if not r.client_order_id:
            raise OrderRejected("client_order_id is required", venue=self._name)
        q = r.quantity
        if not (q.is_finite() and q > 0):
            raise OrderRejected(f"quantity must be positive, got {q}", venue=self._name)
        if not is_multiple(q, market.quantity_step):
            raise OrderRejected(
                f"quantity {q} is not a multiple of the quantity step {market.quantity_step}", venue=self._name
            )
        if q < market.min_quantity:
            raise OrderRejected(f"quantity {q} is below the minimum {market.min_quantity}", venue=self._name)
        if r.order_type is OrderType.MARKET:
            if r.price is not None:
                raise OrderRejected("a market order takes no price", venue=self._name)
            reference = self._mid[r.symbol]
        else:
            p = r.price
            if p is None:
                raise OrderRejected("a limit order needs a price", venue=self._name)
            if not (p.is_finite() and p > 0):
                raise OrderRejected(f"price must be positive, got {p}", venue=self._name)
            if not is_multiple(p, market.price_step):
                raise OrderRejected(
                    f"price {p} is not a multiple of the price step {market.price_step}", venue=self._name
                )
            reference = p
        with money_context():
            notional = q * reference
        if notional < market.min_notional:
            raise OrderRejected(
                f"notional {notional} {market.quote} is below the minimum {market.min_notional}", venue=self._name
            )
        return market

    def _plan_taker(
        self, market: Market, side: Side, quantity: Decimal, limit: Decimal | None
    ) -> list[tuple[Decimal, Decimal]]:
        """The (price, quantity) fills taking liquidity would get, best level first."""
        book = self._book(market, self._book_levels)
        levels = book.asks if side is Side.BUY else book.bids
        plan: list[tuple[Decimal, Decimal]] = []
        remaining = quantity
        for level in levels:
            if remaining == 0:
                break
            if limit is not None and (level.price > limit if side is Side.BUY else level.price < limit):
                break
            take = min(level.quantity, remaining)
            plan.append((level.price, take))
            remaining -= take
        return plan

    # -- fills and funds ---------------------------------------------------------------------

    def _fill_resting(self, symbol: str) -> list[VenueOrder]:
        market = self._markets[symbol]
        book = self._book(market, 1)
        filled: list[VenueOrder] = []
        for working in self._working(symbol):
            limit = working.request.price
            assert limit is not None  # only limit orders rest
            if working.request.side is Side.BUY:
                best = book.asks[0] if book.asks else None
                reached = best is not None and best.price <= limit
            else:
                best = book.bids[0] if book.bids else None
                reached = best is not None and best.price >= limit
            if reached:
                assert best is not None
                self._fill(working, min(working.leaves, best.quantity), limit, Liquidity.MAKER)
                filled.append(working.snapshot(self._name))
        return filled

    def _fill(self, working: _WorkingOrder, quantity: Decimal, price: Decimal, liquidity: Liquidity) -> None:
        market = working.market
        rate = market.maker_fee if liquidity is Liquidity.MAKER else market.taker_fee
        now = self._clock()
        with money_context():
            notional = quantity * price
            fee = notional * rate
            if working.request.side is Side.BUY:
                self._take_reserved(working, market.quote, notional + fee)
                self._free[market.base] = self._free.get(market.base, ZERO) + quantity
            else:
                self._take_reserved(working, market.base, quantity)
                self._free[market.quote] = self._free.get(market.quote, ZERO) + notional - fee
            working.filled += quantity
            working.notional += notional
            working.fees += fee
        self._last[market.symbol] = price
        working.fills.append(
            VenueFill(
                fill_id=f"{self._name}-{self._token}-{next(self._fill_ids)}",
                venue_order_id=working.venue_order_id,
                quantity=quantity,
                price=price,
                fee=fee,
                fee_asset=market.quote,
                liquidity=liquidity,
                at=now,
            )
        )
        working.updated_at = now
        if working.leaves == 0:
            self._finish(working, VenueOrderStatus.FILLED)
        else:
            working.status = VenueOrderStatus.PARTIALLY_FILLED
            if working.request.side is Side.BUY and working.request.price is not None:
                # Keep only what the rest can still cost, so ``used`` never overstates.
                with money_context():
                    needed = working.leaves * working.request.price * (1 + _worst_fee(market))
                    excess = working.reserved - needed
                self._release(working, excess)

    def _finish(self, working: _WorkingOrder, status: VenueOrderStatus) -> None:
        self._release(working, working.reserved)
        working.status = status
        working.updated_at = self._clock()

    def _reserve(self, working: _WorkingOrder, amount: Decimal) -> None:
        asset = self._reserve_asset(working)
        with money_context():
            self._free[asset] = self._free.get(asset, ZERO) - amount
            self._used[asset] = self._used.get(asset, ZERO) + amount
            working.reserved += amount

    def _take_reserved(self, working: _WorkingOrder, asset: str, amount: Decimal) -> None:
        if amount > working.reserved:
            # Reservations are sized for the worst case, so this is a bug, not a market event.
            raise AssertionError(f"{working.venue_order_id}: fill needs {amount} {asset}, {working.reserved} reserved")
        with money_context():
            self._used[asset] -= amount
            working.reserved -= amount

    def _release(self, working: _WorkingOrder, amount: Decimal) -> None:
        if amount <= 0:
            return
        asset = self._reserve_asset(working)
        with money_context():
            self._used[asset] -= amount
            self._free[asset] = self._free.get(asset, ZERO) + amount
            working.reserved -= amount

    @staticmethod
    def _reserve_asset(working: _WorkingOrder) -> str:
        return working.market.quote if working.request.side is Side.BUY else working.market.base

    # -- lookups and the book ----------------------------------------------------------------

    def _market(self, symbol: str) -> Market:
        market = self._markets.get(symbol)
        if market is None:
            raise VenueError(f"unknown symbol {symbol}", venue=self._name)
        return market

    def _working(self, symbol: str | None) -> list[_WorkingOrder]:
        """Open orders, oldest first (dicts keep insertion order)."""
        return [
            w
            for w in self._orders.values()
            if not w.status.is_terminal and (symbol is None or w.request.symbol == symbol)
        ]

    def _find(self, symbol: str, venue_order_id: str | None, client_order_id: str | None) -> _WorkingOrder:
        if venue_order_id is None and client_order_id is None:
            raise ValueError("pass venue_order_id or client_order_id")
        by_venue = self._orders.get(venue_order_id) if venue_order_id is not None else None
        by_client = self._by_client_id.get(client_order_id) if client_order_id is not None else None
        found = by_venue or by_client
        if (
            found is None
            or found.request.symbol != symbol
            or (venue_order_id is not None and by_venue is not found)
            or (client_order_id is not None and by_client is not found)
        ):
            raise OrderNotFound(
                f"no {symbol} order with venue id {venue_order_id} / client id {client_order_id}", venue=self._name
            )
        return found

    def _book(self, market: Market, depth: int) -> OrderBook:
        mid = self._mid[market.symbol]
        cached = self._books.get((market.symbol, depth))
        if cached is not None and cached[0] == mid:  # the book is a function of the mid
            return OrderBook(symbol=market.symbol, bids=cached[1], asks=cached[2], at=self._clock())
        book = self._build_book(market, mid, depth)
        self._books[(market.symbol, depth)] = (mid, book.bids, book.asks)
        return book

    def _build_book(self, market: Market, mid: Decimal, depth: int) -> OrderBook:
        step = market.price_step
        bids: list[BookLevel] = []
        asks: list[BookLevel] = []
        with money_context():
            for i in range(depth):
                offset = self._level_spacing * (2 * i + 1) / 2
                ask = _to_step(mid * (1 + offset), step, ROUND_CEILING)
                ask = max(ask, (asks[-1].price if asks else mid) + step)
                asks.append(BookLevel(ask, self._level_quantity(market, ask, i)))
                bid = _to_step(mid * (1 - offset), step, ROUND_FLOOR)
                bid = min(bid, (bids[-1].price if bids else mid) - step)
                if bid > 0:
                    bids.append(BookLevel(bid, self._level_quantity(market, bid, i)))
        return OrderBook(symbol=market.symbol, bids=tuple(bids), asks=tuple(asks), at=self._clock())

    def _level_quantity(self, market: Market, price: Decimal, level: int) -> Decimal:
        with money_context():
            quantity = _to_step(self._level_notional * (level + 1) / price, market.quantity_step, ROUND_FLOOR)
        return max(quantity, market.min_quantity, market.quantity_step)

    def _on_step(self, symbol: str, price: Decimal) -> Decimal:
        step = self._markets[symbol].price_step
        return max(_to_step(price, step, ROUND_HALF_EVEN), step)

    async def _latency(self) -> None:
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)


def _to_step(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    with money_context():
        return (value / step).to_integral_value(rounding=rounding) * step


def _worst_fee(market: Market) -> Decimal:
    return max(market.maker_fee, market.taker_fee)


def _for_venue(error: VenueError, venue: str) -> VenueError:
    if error.venue is None:
        error.venue = venue
        error.args = (f"{venue}: {error.args[0]}",)
    return error
