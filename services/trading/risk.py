"""Pre-trade risk: one pure function that approves an order or names why not.

``check_order`` applies the rules of ARCHITECTURE section 7 in a fixed order and stops at
the first that fails, so the same request in the same state always gets the same reason:

 1. UNKNOWN_SYMBOL        no instrument, or the request names another symbol
 2. INVALID_QUANTITY      quantity not a positive finite number, or outside the instrument's
                          [min_quantity, max_quantity]
 3. INVALID_PRICE         a limit order without a positive price, or a market order with one
 4. PRECISION             quantity not a multiple of quantity_step, or price of price_step
 5. TRADING_HALTED        the portfolio is HALTED: no new orders at all
 6. REDUCE_ONLY           the portfolio is REDUCING and the order does not shrink the
                          position without crossing zero
 7. NO_REFERENCE_PRICE    no reference price: the price band and a market order's notional
                          cannot be judged, so the check fails closed
 8. PRICE_BAND            a limit price further than ``price_band`` from the reference price
 9. MIN_NOTIONAL          notional below the instrument's minimum
10. MAX_NOTIONAL          notional above the per-order limit
11. MAX_POSITION          the resulting absolute position exceeds the per-symbol limit (an
                          order that shrinks the absolute position always passes this rule)
12. ORDER_RATE            max_orders_per_window orders already in the trailing window
13. INSUFFICIENT_BALANCE  a buy needs quote >= quantity * worst price * (1 + fee_rate); a sell
                          needs base >= quantity (spot: no borrowing)

The request's own shape (1-4) comes first, so a malformed order is reported as malformed in
any state; then the portfolio's state (5-6); then the checks against the market and limits.
Notional is quantity times the limit price, or the reference price for a market order.
The worst price a buy can fill at is its limit price, or for a market buy the reference price
plus the ``slippage`` allowance (routing caps the order there): that is what the balance must
cover, and what risk holds for the order (``services.trading.funds``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Protocol

from services.trading.money import ZERO, is_multiple, money_context
from services.trading.vocabulary import Instrument, OrderType, Side, TradingState

__all__ = [
    "OrderIntent",
    "RejectReason",
    "RiskDecision",
    "RiskLimits",
    "check_order",
]


class RejectReason(enum.StrEnum):
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    INVALID_QUANTITY = "INVALID_QUANTITY"
    INVALID_PRICE = "INVALID_PRICE"
    PRECISION = "PRECISION"
    TRADING_HALTED = "TRADING_HALTED"
    REDUCE_ONLY = "REDUCE_ONLY"
    NO_REFERENCE_PRICE = "NO_REFERENCE_PRICE"
    PRICE_BAND = "PRICE_BAND"
    MIN_NOTIONAL = "MIN_NOTIONAL"
    MAX_NOTIONAL = "MAX_NOTIONAL"
    MAX_POSITION = "MAX_POSITION"
    ORDER_RATE = "ORDER_RATE"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"


class OrderIntent(Protocol):
    """What risk reads from a request; ``OrderRequested`` and ``Order`` both fit."""

    @property
    def symbol(self) -> str: ...
    @property
    def side(self) -> Side: ...
    @property
    def order_type(self) -> OrderType: ...
    @property
    def quantity(self) -> Decimal: ...
    @property
    def price(self) -> Decimal | None: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RiskLimits:
    max_notional_per_order: Decimal
    """In the instrument's quote currency."""
    max_position_per_symbol: Decimal
    """Absolute base quantity, long or short."""
    price_band: Decimal
    """Largest allowed distance of a limit price from the reference, as a fraction (0.05 = 5%)."""
    max_orders_per_window: int
    window_seconds: int

    def __post_init__(self) -> None:
        if self.max_notional_per_order <= 0 or self.max_position_per_symbol <= 0:
            raise ValueError("notional and position limits must be positive")
        if not 0 < self.price_band < 1:
            raise ValueError("price_band must be a fraction in (0, 1)")
        if self.max_orders_per_window < 1 or self.window_seconds <= 0:
            raise ValueError("the order rate window must allow at least one order")


@dataclasses.dataclass(frozen=True, slots=True)
class RiskDecision:
    approved: bool
    reason: RejectReason | None
    message: str
    notional: Decimal | None
    """Quote-currency value of the order, once it could be computed."""
    worst_price: Decimal | None = None
    """An approved order's worst fill price: the limit, or a market order's reference price
    moved by the slippage allowance against it."""

    @classmethod
    def approve(cls, notional: Decimal, worst_price: Decimal) -> RiskDecision:
        return cls(True, None, "approved", notional, worst_price)

    @classmethod
    def reject(cls, reason: RejectReason, message: str, notional: Decimal | None = None) -> RiskDecision:
        return cls(False, reason, message, notional)


def check_order(
    request: OrderIntent,
    *,
    instrument: Instrument | None,
    limits: RiskLimits,
    position_quantity: Decimal,
    balances: Mapping[str, Decimal],
    reference_price: Decimal | None,
    trading_state: TradingState,
    recent_order_times: Iterable[dt.datetime] | int,
    now: dt.datetime,
    fee_rate: Decimal = ZERO,
    slippage: Decimal = ZERO,
) -> RiskDecision:
    """Approve ``request`` or reject it with the first failing rule (module docstring).

    ``position_quantity`` is the signed position in the symbol; ``balances`` the available
    (free) balance per asset; ``recent_order_times`` when this portfolio's earlier accepted
    orders were checked (or how many of them fall in the rate window, counted by the caller);
    ``fee_rate`` the allowance a buy must also be able to pay; ``slippage`` how far past the
    reference price a market order may fill (a fraction).
    """
    reject = RiskDecision.reject
    R = RejectReason

    # 1-4: the request's own shape
    if instrument is None or instrument.symbol != request.symbol:
        return reject(R.UNKNOWN_SYMBOL, f"unknown symbol {request.symbol}")
    qty, price = request.quantity, request.price
    if not (qty.is_finite() and qty > 0):
        return reject(R.INVALID_QUANTITY, f"quantity must be positive, got {qty}")
    if not instrument.min_quantity <= qty <= instrument.max_quantity:
        return reject(
            R.INVALID_QUANTITY,
            f"quantity {qty} outside [{instrument.min_quantity}, {instrument.max_quantity}]",
        )
    if request.order_type is OrderType.LIMIT:
        if price is None or not (price.is_finite() and price > 0):
            return reject(R.INVALID_PRICE, f"a limit order needs a positive price, got {price}")
    elif price is not None:
        return reject(R.INVALID_PRICE, "a market order carries no price")
    if not is_multiple(qty, instrument.quantity_step):
        return reject(R.PRECISION, f"quantity {qty} is not a multiple of {instrument.quantity_step}")
    if price is not None and not is_multiple(price, instrument.price_step):
        return reject(R.PRECISION, f"price {price} is not a multiple of {instrument.price_step}")

    # 5-6: the portfolio's trading state
    with money_context():
        signed = qty if request.side is Side.BUY else -qty
        after = position_quantity + signed
    if trading_state is TradingState.HALTED:
        return reject(R.TRADING_HALTED, "trading is halted for this portfolio")
    if trading_state is TradingState.REDUCING and not _reduces(position_quantity, after):
        return reject(
            R.REDUCE_ONLY,
            f"portfolio is reducing: a {request.side} of {qty} does not shrink the position {position_quantity}",
        )

    # 7-13: against the market, the limits and the balances
    if reference_price is None or not (reference_price.is_finite() and reference_price > 0):
        return reject(R.NO_REFERENCE_PRICE, f"no reference price for {request.symbol}")
    with money_context():
        if price is not None:
            low = reference_price * (1 - limits.price_band)
            high = reference_price * (1 + limits.price_band)
            if not low <= price <= high:
                return reject(
                    R.PRICE_BAND,
                    f"price {price} outside the band [{low}, {high}] around {reference_price}",
                )
        notional = qty * (price if price is not None else reference_price)
        if notional < instrument.min_notional:
            return reject(R.MIN_NOTIONAL, f"notional {notional} below {instrument.min_notional}", notional)
        if notional > limits.max_notional_per_order:
            return reject(
                R.MAX_NOTIONAL, f"notional {notional} above {limits.max_notional_per_order}", notional
            )
        if abs(after) > limits.max_position_per_symbol and abs(after) > abs(position_quantity):
            return reject(
                R.MAX_POSITION,
                f"position would be {after}, beyond {limits.max_position_per_symbol}",
                notional,
            )
        window_start = now - dt.timedelta(seconds=limits.window_seconds)
        if isinstance(recent_order_times, int):  # the caller counted them already
            in_window = recent_order_times
        else:
            in_window = sum(1 for t in recent_order_times if window_start < t <= now)
        if in_window >= limits.max_orders_per_window:
            return reject(
                R.ORDER_RATE,
                f"{in_window} orders in the last {limits.window_seconds}s (limit {limits.max_orders_per_window})",
                notional,
            )
        if price is not None:
            worst = price
        elif request.side is Side.BUY:
            worst = _to_step(reference_price * (1 + slippage), instrument.price_step, ROUND_CEILING)
        else:
            worst = _to_step(reference_price * (1 - slippage), instrument.price_step, ROUND_FLOOR)
        if request.side is Side.BUY:
            needed, asset = qty * worst * (1 + fee_rate), instrument.quote
        else:
            needed, asset = qty, instrument.base
        available = balances.get(asset, ZERO)
        if available < needed:
            return reject(
                R.INSUFFICIENT_BALANCE, f"needs {needed} {asset}, {available} available", notional
            )
    return RiskDecision.approve(notional, worst)


def _to_step(price: Decimal, step: Decimal, rounding: str) -> Decimal:
    return (price / step).to_integral_value(rounding=rounding) * step


def _reduces(before: Decimal, after: Decimal) -> bool:
    """Whether moving from ``before`` to ``after`` shrinks the position without crossing zero."""
    if before > 0:
        return 0 <= after < before
    if before < 0:
        return before < after <= 0
    return False
