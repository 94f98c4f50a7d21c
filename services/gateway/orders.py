"""The order desk: accept an order (one script in the portfolio's slot), look orders up,
ask for a cancel, list a portfolio's orders."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec

from services.core.bus import Bus, with_trace
from services.core.codec import encode
from services.core.events import (
    Event,
    EventType,
    OrderCancelRequested,
    OrderType,
    Route,
    derive_event_id,
    utcnow,
)
from services.core.redisconn import ScriptBatcher
from services.core.replication import ReplicaWait, ReplicatedScriptBatcher
from services.core.hotstate import (
    OrderRecord,
    StateKeys,
    dump,
    load,
    new_order_id,
    requested_order,
    shard_of_order_id,
)
from services.gateway.models import FillView, OrderBody, OrderView, positive_decimal
from services.gateway.problems import Problem
from services.trading.orders import OrderStatus

__all__ = ["OrderDesk", "Submitted", "order_view"]

_SUBMIT_LUA = """
-- KEYS: portfolio, coid, order, orders index, order.requested stream (one slot)
-- ARGV: order id, record, score (ms), event, index size, coid ttl (s), order key prefix,
--       touch ('1': a replayed order rewrites its coid's TTL unchanged, so that the WAIT
--       after this script also covers the original write, whenever it was made)
-- returns {0}: no such portfolio; {1}: accepted; {2, existing order id, its record}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local existing = redis.call('GET', KEYS[2])
if existing then
  if ARGV[8] == '1' then
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
  return {2, existing, redis.call('GET', ARGV[7] .. existing) or ''}
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[6])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[5]) + 1))
redis.call('XADD', KEYS[5], '*', 'd', ARGV[4])
return {1}
"""


class Submitted(msgspec.Struct, frozen=True):
    record: OrderRecord
    created: bool
    event: Event[Any] | None = None  # the order.requested written, when created


DURABLE_REQUEST = "durable-request"
"""The stage name of a durable order's request id: derived from the order id, so the same
``order.requested`` can be rebuilt to start its workflow again (the stages' dedupe marks
then recognise it)."""


def body_hash(body: OrderBody, quantity: Decimal, price: Decimal | None, durable: bool = False) -> str:
    """What makes two submissions "the same order": every field, decimals compared by value,
    and the path (a durable order and a fast one are different orders)."""
    canon = "|".join((
        body.portfolio_id, body.client_order_id, body.symbol, body.side, body.type,
        str(quantity.normalize()), "" if price is None else str(price.normalize()), body.time_in_force, body.venue or "",
        *(("durable",) if durable else ()),
    ))
    return hashlib.blake2b(canon.encode(), digest_size=16).hexdigest()


class OrderDesk:
    def __init__(self, bus: Bus, index_max: int, coid_ttl_s: int) -> None:
        self.bus = bus
        self.redis = bus.redis
        self.keys = bus.keys
        self.state = StateKeys(bus.keys)
        self.index_max = index_max
        self.coid_ttl_s = coid_ttl_s
        # Concurrent submissions share round trips (one pipeline per batch). With
        # ZVT_BUS_WAIT_REPLICAS each round trip ends with WAIT on the same connection(s): an
        # order is reported accepted only once that many replicas have it.
        self.replica_wait = ReplicaWait.of(bus.settings)
        self._submit: ScriptBatcher = (
            ReplicatedScriptBatcher(bus.redis, _SUBMIT_LUA, self.replica_wait)
            if self.replica_wait is not None
            else ScriptBatcher(bus.redis, _SUBMIT_LUA)
        )

    @staticmethod
    def validate(body: OrderBody) -> tuple[Decimal, Decimal | None]:
        """Checks the schema cannot express; 422 naming the field."""
        quantity = positive_decimal(body.quantity, "quantity")
        price: Decimal | None = None
        if body.type is OrderType.LIMIT:
            if body.price is None:
                raise Problem.invalid("price", "is required for limit orders")
            price = positive_decimal(body.price, "price")
        elif body.price is not None:
            raise Problem.invalid("price", "is not allowed for market orders")
        return quantity, price

    async def submit(
        self, body: OrderBody, quantity: Decimal, price: Decimal | None, requested_by: str, *, durable: bool = False
    ) -> Submitted:
        """Accept the order (or find the one submitted before with its ``client_order_id``).
        ``durable``: the order is for a ``trading.place_order`` run (route ``workflow``).

        Raises ``NotReplicated`` (with ``ZVT_BUS_WAIT_REPLICAS``) when too few replicas confirmed
        the write in time: the order may exist, and the same request again finds it."""
        keys = self.keys
        p = body.portfolio_id
        shard = keys.shard_of(p)
        order_id = new_order_id(shard)
        now = utcnow()
        digest = body_hash(body, quantity, price, durable)
        record, event = requested_order(
            order_id=order_id, portfolio_id=p, client_order_id=body.client_order_id, symbol=body.symbol,
            side=body.side, order_type=body.type, quantity=quantity, price=price, time_in_force=body.time_in_force,
            venue=body.venue, at=now, requested_by=requested_by, body_hash=digest,
            route=Route.WORKFLOW if durable else Route.STREAM,
            event_id=derive_event_id(order_id, DURABLE_REQUEST) if durable else None,
        )
        state = keys.state
        reply = await self._submit(
            [
                state(shard, "portfolio", p), state(shard, "coid", p, body.client_order_id),
                state(shard, "order", order_id), state(shard, "orders", p),
                keys.stream(shard, EventType.ORDER_REQUESTED),
            ],
            [
                order_id, dump(record), int(now.timestamp() * 1000), encode(with_trace(event)), self.index_max,
                self.coid_ttl_s, state(shard, "order", ""), "1" if self.replica_wait is not None else "0",
            ],
        )
        outcome = int(reply[0])
        if outcome == 1:
            return Submitted(record, True, event)
        if outcome == 0:
            raise Problem(404, "portfolio_not_found", f"portfolio {p} does not exist (create it with PUT /v1/portfolios/{p})")
        existing = load(OrderRecord, reply[2]) if reply[2] else None
        if existing is None or existing.body_hash != digest:
            raise Problem(
                409, "client_order_id_conflict",
                f"client_order_id {body.client_order_id} was already used for a different order",
            )
        return Submitted(existing, False)

    @staticmethod
    def durable_request(record: OrderRecord) -> Event[Any]:
        """The ``order.requested`` of a durable order, rebuilt from its record (same id)."""
        _, event = requested_order(
            order_id=record.order_id, portfolio_id=record.portfolio_id, client_order_id=record.client_order_id,
            symbol=record.symbol, side=record.side, order_type=record.order_type, quantity=record.quantity,
            price=record.price, time_in_force=record.time_in_force, venue=record.requested_venue,
            at=record.created_at, requested_by=record.requested_by, body_hash=record.body_hash,
            route=Route.WORKFLOW, event_id=derive_event_id(record.order_id, DURABLE_REQUEST),
        )
        return event

    def record_key(self, order_id: str) -> str | None:
        shard = shard_of_order_id(order_id)
        if shard is None or shard >= self.keys.shards:
            return None
        return self.state.order_in_shard(shard, order_id)

    async def get(self, order_id: str) -> OrderRecord | None:
        key = self.record_key(order_id)
        if key is None:
            return None
        return await self.load(key)

    async def load(self, key: str) -> OrderRecord | None:
        raw: Any = await self.redis.get(key)
        return load(OrderRecord, raw) if raw else None

    async def request_cancel(self, record: OrderRecord, requested_by: str) -> None:
        event = Event.new(
            OrderCancelRequested(
                order_id=record.order_id, client_order_id=record.client_order_id, requested_by=requested_by
            ),
            portfolio_id=record.portfolio_id, correlation_id=record.correlation_id,
        )
        await self.bus.publish(event)

    async def recent(self, portfolio_id: str, status: OrderStatus | None, limit: int) -> list[OrderRecord]:
        """Newest first; with a status filter, pages through the index until ``limit`` match."""
        index = self.state.orders(portfolio_id)
        shard = self.keys.shard_of(portfolio_id)
        out: list[OrderRecord] = []
        start = 0
        page = limit if status is None else max(100, limit)
        while len(out) < limit:
            ids: Any = await self.redis.zrevrange(index, start, start + page - 1)
            if not ids:
                break
            raws: Any = await self.redis.mget([self.state.order_in_shard(shard, i.decode()) for i in ids])
            for raw in raws:
                if raw:
                    rec = load(OrderRecord, raw)
                    if status is None or rec.status == status:
                        out.append(rec)
                        if len(out) >= limit:
                            break
            start += page
        return out


def order_view(r: OrderRecord) -> OrderView:
    return OrderView(
        order_id=r.order_id, client_order_id=r.client_order_id, status=r.status, correlation_id=r.correlation_id,
        portfolio_id=r.portfolio_id, symbol=r.symbol, side=r.side, type=r.order_type, quantity=r.quantity,
        price=r.price, time_in_force=r.time_in_force, requested_venue=r.requested_venue, venue=r.venue,
        filled_quantity=r.filled_quantity, avg_fill_price=r.avg_fill_price, commission=r.commission,
        commission_asset=r.commission_asset, reject_code=r.reject_code, reject_reason=r.reject_reason,
        fills=[
            FillView(
                fill_id=f.fill_id, quantity=f.quantity, price=f.price, commission=f.commission,
                commission_asset=f.commission_asset, liquidity=f.liquidity, venue=f.venue, at=f.at,
            )
            for f in r.fills
        ],
        created_at=r.created_at, updated_at=r.updated_at,
    )


def now_ms() -> int:
    return int(time.time() * 1000)
