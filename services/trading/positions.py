"""A netting position per symbol: signed quantity, cost basis, realized PnL.

The position keeps its *cost basis* (the signed cost of the open quantity) rather than an
incrementally rounded average price. Adding quantity adds ``quantity * price`` exactly;
reducing removes a pro-rata share of the cost (the only rounding step) and realizes the
difference. That bookkeeping keeps the ledger identity exact for any sequence of fills:

    realized_pnl + unrealized_pnl(mark) == sell proceeds - buy cost + quantity * mark - fees

so a position rebuilt by replay equals the live one digit for digit.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from services.trading.money import ZERO, money_context
from services.trading.vocabulary import Side

__all__ = ["Position"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    symbol: str
    quantity: Decimal = ZERO
    """Signed base quantity: > 0 long, < 0 short."""
    cost_basis: Decimal = ZERO
    """Signed cost of the open quantity (same sign as ``quantity``; zero when flat)."""
    realized_pnl: Decimal = ZERO

    def __post_init__(self) -> None:
        if self.quantity == 0 and self.cost_basis != 0:
            raise ValueError(f"{self.symbol}: a flat position has no cost basis")

    @classmethod
    def from_average(
        cls, symbol: str, quantity: Decimal, average_price: Decimal, realized_pnl: Decimal = ZERO
    ) -> Position:
        """Rebuild a position from its reported average price (e.g. ``position.updated``)."""
        with money_context():
            return cls(symbol=symbol, quantity=quantity, cost_basis=quantity * average_price, realized_pnl=realized_pnl)

    @property
    def average_price(self) -> Decimal:
        """Average entry price of the open quantity; zero when flat."""
        if self.quantity == 0:
            return ZERO
        with money_context():
            return self.cost_basis / self.quantity

    @property
    def is_flat(self) -> bool:
        return self.quantity == 0

    def unrealized_pnl(self, mark: Decimal) -> Decimal:
        """What closing the open quantity at ``mark`` would realize (fees aside)."""
        with money_context():
            return self.quantity * mark - self.cost_basis

    def apply_fill(self, side: Side, quantity: Decimal, price: Decimal, fee: Decimal = ZERO) -> Position:
        """The position after one fill. ``fee`` is in the quote currency and reduces
        realized PnL; a negative fee is a rebate."""
        if not (quantity.is_finite() and quantity > 0):
            raise ValueError(f"{self.symbol}: fill quantity must be positive, got {quantity}")
        if not (price.is_finite() and price > 0):
            raise ValueError(f"{self.symbol}: fill price must be positive, got {price}")
        if not fee.is_finite():
            raise ValueError(f"{self.symbol}: fee must be finite, got {fee}")
        with money_context():
            delta = quantity if side is Side.BUY else -quantity
            new_quantity = self.quantity + delta
            realized = self.realized_pnl - fee
            if self.quantity == 0 or (self.quantity > 0) == (delta > 0):
                # Opening or adding: the cost grows by exactly what was paid (or received).
                cost = self.cost_basis + delta * price
            elif abs(delta) < abs(self.quantity):
                # Reducing: take the closed share of the cost out, realize the difference.
                removed = self.cost_basis * abs(delta) / abs(self.quantity)
                cost = self.cost_basis - removed
                realized += -delta * price - removed
            else:
                # Closing, and maybe flipping: the whole cost goes (no division, no rounding)
                # and any remainder opens a new position at the fill price.
                realized += self.quantity * price - self.cost_basis
                cost = new_quantity * price
        return Position(symbol=self.symbol, quantity=new_quantity, cost_basis=cost, realized_pnl=realized)
