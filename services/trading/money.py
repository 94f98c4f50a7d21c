"""Decimal arithmetic for the trading domain: one fixed context, independent of the caller's.

Replay must reproduce live positions exactly, so every process has to round the same way
whatever its thread's ambient ``decimal`` context says. Additions and multiplications are
exact within 34 significant digits (IEEE decimal128); only divisions (average prices,
pro-rata cost) round, half-even.
"""

from __future__ import annotations

import decimal
from contextlib import AbstractContextManager
from decimal import Decimal

__all__ = ["DECIMAL_CONTEXT", "ZERO", "is_multiple", "money_context"]

DECIMAL_CONTEXT = decimal.Context(
    prec=34,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

ZERO = Decimal(0)


def money_context() -> AbstractContextManager[decimal.Context]:
    """A ``with`` block that computes in ``DECIMAL_CONTEXT``."""
    return decimal.localcontext(DECIMAL_CONTEXT)


def is_multiple(value: Decimal, step: Decimal) -> bool:
    """Whether ``value`` is a whole number of ``step``s (a tick or lot size)."""
    try:
        return DECIMAL_CONTEXT.remainder(value, step) == 0
    except decimal.InvalidOperation:
        # The quotient needs more than 34 digits: no real lot or tick size is that fine.
        return False
