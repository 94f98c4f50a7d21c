"""Put orders on the bus the way the gateway does, without HTTP: for the pipeline benchmark,
the end-to-end tests and operators' smoke checks.

``seed_portfolio`` writes a portfolio's record and balances; ``inject_orders`` writes each
order's record and publishes its ``order.requested`` (one pipelined round trip for many
orders; not idempotent on client order id, which is the gateway's job).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.core.bus import DATA, Bus
from services.core.codec import encode
from services.core.events import EventType, utcnow
from services.core.hotstate import (
    DEFAULT_LIMITS,
    LimitsRecord,
    PortfolioRecord,
    StateKeys,
    dump,
    load,
    new_order_id,
    requested_order,
)
from services.trading import Order, OrderType, Side, TimeInForce, TradingState

__all__ = ["OrderSpec", "inject_orders", "read_orders", "seed_portfolio"]


@dataclass(frozen=True, slots=True)
class OrderSpec:
    portfolio_id: str
    symbol: str
    side: Side
    quantity: Decimal
    order_type: OrderType = OrderType.MARKET
    price: Decimal | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    client_order_id: str | None = None


async def seed_portfolio(
    bus: Bus,
    portfolio_id: str,
    balances: Mapping[str, Decimal],
    *,
    limits: LimitsRecord = DEFAULT_LIMITS,
    trading_state: TradingState = TradingState.ACTIVE,
) -> None:
    sk = StateKeys(bus.keys)
    now = utcnow()
    record = PortfolioRecord(
        portfolio_id=portfolio_id, limits=limits, trading_state=trading_state, created_at=now, updated_at=now
    )
    await bus.redis.set(sk.portfolio(portfolio_id), dump(record))
    await bus.redis.delete(sk.balances(portfolio_id))
    if balances:
        await bus.redis.hset(sk.balances(portfolio_id), mapping={k: str(v) for k, v in balances.items()})


async def inject_orders(bus: Bus, specs: Sequence[OrderSpec], *, at: dt.datetime | None = None) -> list[str]:
    """Write the records and publish the requests of ``specs``; returns the order ids."""
    sk = StateKeys(bus.keys)
    now = at or utcnow()
    pipe: Any = bus.redis.pipeline(transaction=False)
    ids = []
    for spec in specs:
        shard = bus.keys.shard_of(spec.portfolio_id)
        order_id = new_order_id(shard)
        ids.append(order_id)
        record, event = requested_order(
            order_id=order_id, portfolio_id=spec.portfolio_id, client_order_id=spec.client_order_id or order_id,
            symbol=spec.symbol, side=spec.side, order_type=spec.order_type, quantity=spec.quantity,
            price=spec.price, time_in_force=spec.time_in_force, venue=None, at=now,
        )
        pipe.set(sk.order(spec.portfolio_id, order_id), dump(record))
        pipe.xadd(bus.keys.stream(shard, EventType.ORDER_REQUESTED), {DATA: encode(event)})
    await pipe.execute()
    return ids


async def read_orders(bus: Bus, refs: Sequence[tuple[str, str]]) -> list[Order | None]:
    """The records of ``(portfolio_id, order_id)`` pairs."""
    sk = StateKeys(bus.keys)
    pipe: Any = bus.redis.pipeline(transaction=False)
    for pid, oid in refs:
        pipe.get(sk.order(pid, oid))
    return [load(Order, v) if v else None for v in await pipe.execute()]
