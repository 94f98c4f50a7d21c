"""The order's terms: what a client asked for, carried unchanged from request to venue.

``order.requested``, ``order.validated`` and ``order.created`` each carry the terms as their
first fields: their payloads subclass ``OrderTerms``, so the terms are declared once and
the three keep the wire format they had when each listed the fields itself (same names, same
order, same defaults). Adding a field here therefore changes three event schemas at once.
``carry`` passes the terms of one message on to the next; ``services.trading.Order`` keeps them
as fields of its own.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypeVar

import msgspec

from services.trading.vocabulary import OrderType, Side, TimeInForce

__all__ = ["OrderTerms", "carry"]


class OrderTerms(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    order_id: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    """The limit price; ``None`` for a market order."""
    time_in_force: TimeInForce = TimeInForce.GTC
    venue: str | None = None
    """The venue the client asked for; ``None`` lets routing choose."""


T = TypeVar("T", bound=OrderTerms)


def carry(terms: OrderTerms, into: type[T], **more: Any) -> T:
    """``terms`` as ``into`` (the next message that carries them), with ``more``: the fields
    ``into`` has of its own."""
    return into(**{name: getattr(terms, name) for name in OrderTerms.__struct_fields__}, **more)
