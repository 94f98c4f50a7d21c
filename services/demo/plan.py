"""What the demo sends: portfolios and a seeded, shuffled mix of orders, each with the
outcome it should have. Pure: no I/O, so the mix can be checked without a stack."""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Mapping, Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from services.client import OrderRequest
from services.venues.paper import DEFAULT_PRICES

__all__ = [
    "HALTED_SUFFIX",
    "MAX_NOTIONAL",
    "MIN_ORDERS",
    "PRICE_GUESS",
    "SYMBOLS",
    "Kind",
    "Plan",
    "Planned",
    "balances_for",
    "build_plan",
    "portfolio_ids",
    "seed_orders",
]

SYMBOLS: tuple[str, ...] = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
"""What the local stack's paper venue lists."""
UNKNOWN_SYMBOL = "DOGE/USDT"
"""A well-formed symbol no venue lists: risk rejects it with UNKNOWN_SYMBOL."""
SIZES: Mapping[str, tuple[Decimal, ...]] = {
    "BTC/USDT": (Decimal("0.001"), Decimal("0.002"), Decimal("0.005")),
    "ETH/USDT": (Decimal("0.01"), Decimal("0.05"), Decimal("0.1")),
    "SOL/USDT": (Decimal("0.5"), Decimal("1"), Decimal("2")),
}
"""Order sizes: every one above the venue's minimum notional and far below the limit."""
MAX_NOTIONAL = Decimal("25000")
"""The per-order notional limit the demo's portfolios get."""
OVERSIZED = ("BTC/USDT", Decimal("1"))
"""An order worth about 60,000 USDT: over ``MAX_NOTIONAL``."""
THROUGH = Decimal("0.01")
"""How far through the mark a marketable limit is priced (within the 5% price band)."""
AWAY = Decimal("0.03")
"""How far from the mark a resting limit is priced: it does not cross, and is in the band."""
PRICE_STEP = Decimal("0.01")
PRICE_GUESS: Mapping[str, Decimal] = dict(DEFAULT_PRICES)
"""Where the paper venue's prices (and so the marks) start: good enough to size balances
before any order has given the real marks (``balances_for`` funds twice what the orders need)."""
HALTED_SUFFIX = "halted"
MIN_ORDERS = 10
REJECT_SHARE = 0.09
RESTING_SHARE = 0.05
MARKET_SHARE = 0.55
BUY_SHARE = 0.55


class Kind(enum.StrEnum):
    """What an order is for; each kind has one expected outcome."""

    SEED = "seed"  # a market buy per symbol first: its fill and mark price the limits
    MARKET = "market"  # fills
    LIMIT = "limit"  # a marketable limit: fills
    RESTING = "resting"  # a limit away from the market: rests, then the demo cancels it
    REJECT_NOTIONAL = "reject:MAX_NOTIONAL"
    REJECT_SYMBOL = "reject:UNKNOWN_SYMBOL"
    REJECT_HALTED = "reject:TRADING_HALTED"

    @property
    def expected_status(self) -> str:
        if self is Kind.RESTING:
            return "canceled"
        if self.value.startswith("reject:"):
            return "rejected"
        return "filled"

    @property
    def expected_code(self) -> str | None:
        return self.value.partition(":")[2] or None

    @property
    def label(self) -> str:
        return {Kind.SEED: "market (first)", Kind.MARKET: "market", Kind.LIMIT: "limit (marketable)",
                Kind.RESTING: "limit (resting, canceled)"}.get(self, f"rejected by risk ({self.expected_code})")


REJECTS = (Kind.REJECT_NOTIONAL, Kind.REJECT_SYMBOL, Kind.REJECT_HALTED)


@dataclasses.dataclass(frozen=True)
class Planned:
    kind: Kind
    request: OrderRequest


@dataclasses.dataclass(frozen=True)
class Plan:
    active: tuple[str, ...]
    halted: str
    orders: tuple[Planned, ...]

    @property
    def portfolios(self) -> tuple[str, ...]:
        return (*self.active, self.halted)


def portfolio_ids(run_id: str, count: int) -> tuple[tuple[str, ...], str]:
    """``count`` active portfolios and one halted one, all named after the run."""
    return tuple(f"demo-{run_id}-{k}" for k in range(1, count + 1)), f"demo-{run_id}-{HALTED_SUFFIX}"


def seed_orders(run_id: str, portfolio: str) -> list[Planned]:
    """One small market buy per symbol: the first orders, which also give the reference prices."""
    return [
        Planned(Kind.SEED, OrderRequest(
            client_order_id=f"{run_id}-seed-{n}", portfolio_id=portfolio, symbol=symbol, side="buy",
            quantity=SIZES[symbol][0],
        ))
        for n, symbol in enumerate(SYMBOLS)
    ]


def _counts(orders: int) -> tuple[int, int]:
    rejects = len(REJECTS) * max(1, round(orders * REJECT_SHARE / len(REJECTS)))  # as many of each
    resting = max(1, round(orders * RESTING_SHARE))
    return rejects, resting


def build_plan(run_id: str, orders: int, portfolios: int, marks: Mapping[str, Decimal], *, seed: int = 0) -> Plan:
    """The orders after the seed orders (``orders`` counts those too), shuffled with ``seed``.

    ``marks`` (a price per symbol) sets the limit prices: marketable limits ``THROUGH`` the
    mark, resting ones ``AWAY`` from it.
    """
    if orders < MIN_ORDERS:
        raise ValueError(f"at least {MIN_ORDERS} orders")
    if portfolios < 1:
        raise ValueError("at least 1 portfolio")
    rng = random.Random(f"{run_id}/{seed}")
    active, halted = portfolio_ids(run_id, portfolios)
    rejects, resting = _counts(orders)
    rest = orders - len(SYMBOLS) - rejects - resting
    kinds = [REJECTS[i % len(REJECTS)] for i in range(rejects)] + [Kind.RESTING] * resting
    market = round(rest * MARKET_SHARE)
    kinds += [Kind.MARKET] * market + [Kind.LIMIT] * (rest - market)
    rng.shuffle(kinds)
    planned = []
    for n, kind in enumerate(kinds):
        coid = f"{run_id}-{n:05d}"
        portfolio = active[rng.randrange(len(active))]
        symbol = SYMBOLS[rng.randrange(len(SYMBOLS))]
        side = "buy" if rng.random() < BUY_SHARE else "sell"
        quantity = rng.choice(SIZES[symbol])
        request: OrderRequest
        if kind is Kind.MARKET:
            request = OrderRequest(client_order_id=coid, portfolio_id=portfolio, symbol=symbol, side=side,
                                   quantity=quantity)
        elif kind in (Kind.LIMIT, Kind.RESTING):
            away = THROUGH if kind is Kind.LIMIT else -AWAY
            price = _limit_price(marks[symbol], side, away)
            request = OrderRequest(client_order_id=coid, portfolio_id=portfolio, symbol=symbol, side=side,
                                   quantity=quantity, order_type="limit", price=price)
        elif kind is Kind.REJECT_NOTIONAL:
            symbol, quantity = OVERSIZED
            request = OrderRequest(client_order_id=coid, portfolio_id=portfolio, symbol=symbol, side="buy",
                                   quantity=quantity)
        elif kind is Kind.REJECT_SYMBOL:
            request = OrderRequest(client_order_id=coid, portfolio_id=portfolio, symbol=UNKNOWN_SYMBOL, side="buy",
                                   quantity=Decimal("1"))
        else:
            request = OrderRequest(client_order_id=coid, portfolio_id=halted, symbol=symbol, side="buy",
                                   quantity=quantity)
        planned.append(Planned(kind, request))
    return Plan(active, halted, tuple(planned))


def _limit_price(mark: Decimal, side: str, through: Decimal) -> Decimal:
    """``through`` > 0: a price that crosses the market by that fraction; < 0: one that stays
    away from it by that fraction. Rounded to the price step, away from the mark."""
    if side == "buy":
        return (mark * (1 + through)).quantize(PRICE_STEP, rounding=ROUND_CEILING if through > 0 else ROUND_FLOOR)
    return (mark * (1 - through)).quantize(PRICE_STEP, rounding=ROUND_FLOOR if through > 0 else ROUND_CEILING)


def balances_for(portfolio: str, orders: Sequence[Planned], marks: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Funds for every order of ``portfolio`` to pass the balance check even if all of its
    buys and sells were open at once, twice over, plus a round amount."""
    quote = Decimal("100000")
    base = {symbol.split("/")[0]: Decimal(0) for symbol in SYMBOLS}
    for item in orders:
        r = item.request
        if r.portfolio_id != portfolio or item.kind.expected_status == "rejected" or r.symbol not in marks:
            continue
        asset = r.symbol.split("/")[0]
        if r.side == "buy":
            quote += 2 * r.quantity * (r.price or marks[r.symbol] * (1 + THROUGH))
        else:
            base[asset] += 2 * r.quantity
    balances = {asset: amount + 10 * SIZES[f"{asset}/USDT"][-1] for asset, amount in base.items()}
    balances["USDT"] = quote.quantize(Decimal(1), rounding=ROUND_CEILING)
    return balances
