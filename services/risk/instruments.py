"""The instruments the platform trades, as the risk rules see them.

The local stack's venues list ``BTC/USDT``, ``ETH/USDT`` and ``SOL/USDT`` (the paper venue's
markets); their steps and minimums are the ones risk checks before an order reaches a venue.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from services.trading import Instrument
from services.venues.paper import DEFAULT_MARKETS

__all__ = ["INSTRUMENTS", "TAKER_FEE"]

MAX_QUANTITY = Decimal("1000000")

INSTRUMENTS: Mapping[str, Instrument] = {
    m.symbol: Instrument(
        symbol=m.symbol,
        base=m.base,
        quote=m.quote,
        quantity_step=m.quantity_step,
        price_step=m.price_step,
        min_quantity=m.min_quantity,
        max_quantity=MAX_QUANTITY,
        min_notional=m.min_notional,
    )
    for m in DEFAULT_MARKETS.values()
}

TAKER_FEE: Mapping[str, Decimal] = {m.symbol: m.taker_fee for m in DEFAULT_MARKETS.values()}
"""The worst fee a buy must be able to pay on top of its notional."""
