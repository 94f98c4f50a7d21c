"""The terms of an order as a client submits them (``OrderBody``: the body of
``POST /v1/orders``, and what a workflow builds for a child order), and the checks its schema
cannot express.

The field types are the platform's: the gateway's other bodies use them too."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated

import msgspec

from services.intake.errors import InvalidOrder
from services.trading import OrderType, Side, TimeInForce

__all__ = [
    "DECIMAL",
    "ID",
    "SYMBOL",
    "DecimalString",
    "Id",
    "OrderBody",
    "Symbol",
    "exact",
    "positive_decimal",
    "validate",
]

# Every pattern matches a value in full. Each is written twice from one body: ``^body$`` is
# the JSON Schema (ECMA-262) form, where ``$`` is the end of the input; it is what the OpenAPI
# document shows and what FastAPI's path and query parameters use (pydantic-core's regex
# engine also reads ``$`` as the end of the input). msgspec matches with Python's
# ``re.search``, where ``$`` also matches before a final newline (``"pf-1\n"`` would pass), so
# the bodies' structs use ``^body\Z`` (``exact``); the gateway's ``openapi_components`` writes
# those back as ``$``.
ID = r"[A-Za-z0-9._:-]{1,64}"
SYMBOL = r"[A-Z0-9]{2,12}/[A-Z0-9]{2,12}"
DECIMAL = r"[0-9]{1,20}(\.[0-9]{1,18})?"


def exact(body: str) -> str:
    """The body as a Python pattern that ``re.search`` (msgspec) only matches in full."""
    return f"^{body}\\Z"


Id = Annotated[str, msgspec.Meta(pattern=exact(ID), description="1 to 64 of `A-Z a-z 0-9 . _ : -`")]
Symbol = Annotated[str, msgspec.Meta(pattern=exact(SYMBOL), description="`BASE/QUOTE`, e.g. `BTC/USDT`")]
DecimalString = Annotated[
    str, msgspec.Meta(pattern=exact(DECIMAL), description="A non-negative decimal as a string, e.g. `\"0.25\"`")
]


class OrderBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A new order. `price` is required for `limit` orders and forbidden for `market` ones."""

    client_order_id: Id
    portfolio_id: Id
    symbol: Symbol
    side: Side
    type: OrderType
    quantity: DecimalString
    price: DecimalString | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    venue: Id | None = None


def positive_decimal(value: str, field: str, *, allow_zero: bool = False) -> Decimal:
    """``value`` as a finite decimal above zero (or at least zero); else ``InvalidOrder`` naming ``field``."""
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise InvalidOrder(field, "must be a decimal string") from None
    if not number.is_finite() or number < 0 or (number == 0 and not allow_zero):
        raise InvalidOrder(field, "must be a positive decimal" if not allow_zero else "must not be negative")
    return number


def validate(body: OrderBody) -> tuple[Decimal, Decimal | None]:
    """(quantity, price): the checks the schema cannot express; ``InvalidOrder`` naming the field."""
    quantity = positive_decimal(body.quantity, "quantity")
    price: Decimal | None = None
    if body.type is OrderType.LIMIT:
        if body.price is None:
            raise InvalidOrder("price", "is required for limit orders")
        price = positive_decimal(body.price, "price")
    elif body.price is not None:
        raise InvalidOrder("price", "is not allowed for market orders")
    return quantity, price
