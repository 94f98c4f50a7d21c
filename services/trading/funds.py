"""Funds held for open orders: how much an approved order keeps out of its portfolio's
available balance, and when it lets go.

Risk approves an order against ``balance - held`` and holds what the order can cost at most:
a buy its worst notional plus the taker fee (the limit price, or for a market buy the
reference price plus a slippage allowance, which routing enforces as the order's price cap),
a sell its quantity of the base asset. The portfolio stage debits the balance fill by fill.

The hold shrinks only when the portfolio stage reports a fill applied (``confirm``), never
when the venue reports it: between the two, the fill's cost is in neither the balance nor the
hold, and a second order could spend it. An order that ends with a part unfilled (canceled,
expired, failed) gives up the unfilled part at once (``close``); the part that filled stays
held until the portfolio stage has applied it.

Each fill releases its pro-rata share of the hold (``amount * quantity / order quantity``),
which is never less than what the fill cost: a buy fills at or below the price its hold was
computed at, with at most the fee it allowed for.
"""

from __future__ import annotations

import dataclasses
import decimal
from decimal import Decimal

from services.trading.money import DECIMAL_CONTEXT, ZERO, money_context
from services.trading.vocabulary import Side

__all__ = ["Hold", "hold_for"]

_CEILING = DECIMAL_CONTEXT.copy()
_CEILING.rounding = decimal.ROUND_CEILING


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """What an open order holds of one asset."""

    asset: str
    amount: Decimal
    """Held at approval, for the whole order quantity."""
    quantity: Decimal
    """The order's quantity."""
    confirmed: Decimal = ZERO
    """How much of the quantity the portfolio stage has applied (its cost is in the balance)."""
    final: Decimal | None = None
    """Once the order is finished: how much of it filled (the rest will never cost anything)."""

    @property
    def limit(self) -> Decimal:
        """The quantity that can still cost funds: the whole order, or what filled once it ended."""
        return self.quantity if self.final is None else self.final

    @property
    def held(self) -> Decimal:
        """What is held now: the share of the amount for the quantity not yet applied, rounded up."""
        left = self.limit - self.confirmed
        if left <= 0:
            return ZERO
        if left == self.quantity:
            return self.amount
        return _CEILING.divide(_CEILING.multiply(self.amount, left), self.quantity)

    @property
    def done(self) -> bool:
        """Nothing left to hold: the portfolio has applied every fill the order had or can have."""
        return self.confirmed >= self.limit

    def confirm(self, quantity: Decimal) -> Hold:
        """The portfolio stage applied a fill of ``quantity``."""
        with money_context():
            return dataclasses.replace(self, confirmed=min(self.quantity, self.confirmed + quantity))

    def close(self, filled: Decimal) -> Hold:
        """The order ended having filled ``filled`` (at least what was already applied)."""
        return dataclasses.replace(self, final=max(min(filled, self.quantity), self.confirmed))


def hold_for(side: Side, quantity: Decimal, worst_price: Decimal, fee_rate: Decimal, base: str, quote: str) -> Hold:
    """What an approved order holds: a buy its quantity at ``worst_price`` plus the fee, in the
    quote asset; a sell its quantity of the base asset."""
    with money_context():
        if side is Side.BUY:
            return Hold(quote, quantity * worst_price * (1 + fee_rate), quantity)
        return Hold(base, quantity, quantity)
