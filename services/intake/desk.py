"""The order desk: accept an order (one script in the portfolio's slot), look orders up,
ask for a cancel, list a portfolio's orders. The gateway and the workflows (a rebalance's
child orders) accept orders through it alike, with the same ``IntakeSettings``.

A finished order's record leaves Redis ``ZVT_ORDER_TERMINAL_RETENTION_S`` after it ended (and
its entry in the portfolio's orders index once it is that old); from then on the desk rebuilds
it from the event store (``services.order.stage.rebuild_order``: the order stage's own fold of
the order's events), scoped to the store's namespace. The caller's grants are checked on the
rebuilt record like on a live one."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from services.core.bus import Bus, with_trace
from services.core.codec import encode
from services.core.events import (
    Event,
    EventType,
    OrderCancelRequested,
    Route,
    derive_event_id,
    utcnow,
)
from services.core.redisconn import ScriptBatcher
from services.core.replication import ReplicaWait, ReplicatedScriptBatcher
from services.core.telemetry import get_logger
from services.core.hotstate import (
    StateKeys,
    dump,
    load,
    new_order_id,
    order_requested,
    requested_order,
    shard_of_order_id,
)
from services.intake.errors import ClientOrderIdConflict, EventStoreUnavailable, PortfolioNotFound
from services.intake.settings import IntakeSettings
from services.intake.terms import OrderBody
from services.intake.terms import validate as validate_terms
from services.order.stage import rebuild_order
from services.recorder.store import EventStore, StoredEvent
from services.trading.orders import Order, OrderStatus

log = get_logger("zvt.intake")

Archive = Callable[[], Awaitable[EventStore]]
"""The event store, opened on first use (``Gateway.store``; raises ``EventStoreUnavailable``)."""

ARCHIVE_SCAN_MAX = 5_000
"""Most ``order.requested`` events one listing reads from the event store (past Redis's index)."""

__all__ = ["ARCHIVE_SCAN_MAX", "Archive", "DURABLE_REQUEST", "OrderDesk", "Submitted", "body_hash", "record_hash"]

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
    record: Order
    created: bool
    event: Event[Any] | None = None  # the order.requested written, when created


DURABLE_REQUEST = "durable-request"
"""The stage name of a durable order's request id: derived from the order id, so the same
``order.requested`` can be rebuilt to start its workflow again (the stages' dedupe marks
then recognise it)."""


def body_hash(body: OrderBody, quantity: Decimal, price: Decimal | None, durable: bool = False) -> str:
    """What makes two submissions "the same order": every field, decimals compared by value,
    and the path (a durable order and a fast one are different orders)."""
    return _hash(
        body.portfolio_id, body.client_order_id, body.symbol, body.side, body.type, quantity, price,
        body.time_in_force, body.venue, durable,
    )


def record_hash(record: Order) -> str:
    """``body_hash`` of the submission that made ``record`` (for a record rebuilt from the
    event store, which does not keep it)."""
    return _hash(
        record.portfolio_id, record.client_order_id, record.symbol, record.side, record.order_type,
        record.quantity, record.price, record.time_in_force, record.requested_venue, record.route is Route.WORKFLOW,
    )


def _hash(portfolio_id: str, client_order_id: str, symbol: str, side: str, order_type: str, quantity: Decimal,
          price: Decimal | None, time_in_force: str, venue: str | None, durable: bool) -> str:
    canon = "|".join((
        portfolio_id, client_order_id, symbol, side, order_type,
        str(quantity.normalize()), "" if price is None else str(price.normalize()), time_in_force, venue or "",
        *(("durable",) if durable else ()),
    ))
    return hashlib.blake2b(canon.encode(), digest_size=16).hexdigest()


class OrderDesk:
    def __init__(
        self, bus: Bus, settings: IntakeSettings, archive: Archive | None = None,
        outside: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        """``archive``: where orders that have left Redis are found (none: they are not).
        ``outside``: wraps each event store query (the gateway's: not counted against the
        request's deadline; the event store has its own timeouts)."""
        self.archive = archive
        self.outside = outside
        self.bus = bus
        self.redis = bus.redis
        self.keys = bus.keys
        self.state = StateKeys(bus.keys)
        self.index_max = settings.orders_index_max
        self.coid_ttl_s = settings.idempotency_ttl_s
        # Concurrent submissions share round trips (one pipeline per batch). With
        # ZVT_BUS_WAIT_REPLICAS each round trip ends with WAIT on the same connection(s): an
        # order is reported accepted only once that many replicas have it.
        self.replica_wait = ReplicaWait.of(bus.settings)
        self._submit: ScriptBatcher = (
            ReplicatedScriptBatcher(bus.redis, _SUBMIT_LUA, self.replica_wait)
            if self.replica_wait is not None
            else ScriptBatcher(bus.redis, _SUBMIT_LUA)
        )

    validate = staticmethod(validate_terms)

    async def submit(
        self, body: OrderBody, quantity: Decimal, price: Decimal | None, requested_by: str, *, durable: bool = False
    ) -> Submitted:
        """Accept the order (or find the one submitted before with its ``client_order_id``).
        ``durable``: the order is for a ``trading.place_order`` run (route ``workflow``).

        Raises ``PortfolioNotFound``, ``ClientOrderIdConflict`` (the id was used for other
        terms), ``EventStoreUnavailable`` (the earlier order has left Redis and cannot be read),
        and ``NotReplicated`` (with ``ZVT_BUS_WAIT_REPLICAS``) when too few replicas confirmed
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
            raise PortfolioNotFound(p)
        existing = load(Order, reply[2]) if reply[2] else None
        if existing is None:
            # the client order id outlives a finished order's record (the idempotency window
            # is longer than the retention): the order is in the event store
            existing_id = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
            existing = (await self.archived([existing_id])).get(existing_id)
            if existing is not None and existing.portfolio_id == p:
                existing = msgspec.structs.replace(existing, body_hash=record_hash(existing))
        if existing is None or existing.body_hash != digest:
            raise ClientOrderIdConflict(body.client_order_id)
        return Submitted(existing, False)

    @staticmethod
    def durable_request(record: Order) -> Event[Any]:
        """The ``order.requested`` of a durable order, rebuilt from its record (same id)."""
        return order_requested(record, route=Route.WORKFLOW, event_id=derive_event_id(record.order_id, DURABLE_REQUEST))

    def record_key(self, order_id: str) -> str | None:
        shard = shard_of_order_id(order_id)
        if shard is None or shard >= self.keys.shards:
            return None
        return self.state.order_in_shard(shard, order_id)

    async def get(self, order_id: str) -> Order | None:
        """The order: its live record, or rebuilt from the event store once it left Redis."""
        return (await self.find(order_id))[0]

    async def find(self, order_id: str) -> tuple[Order | None, bool]:
        """(the order, whether that is its live record). Only a finished order leaves Redis,
        so one that comes from the event store is over whatever its events say."""
        key = self.record_key(order_id)
        if key is None:
            return None, False
        record = await self.load(key)
        if record is not None:
            return record, True
        return (await self.archived([order_id])).get(order_id), False

    async def archived(self, order_ids: list[str], *, strict: bool = True) -> dict[str, Order]:
        """Orders rebuilt from their stored events, by id (those the store has a request of).
        ``strict``: an unavailable event store raises ``EventStoreUnavailable``; else it has
        nothing (logged)."""
        if not order_ids or self.archive is None:
            return {}
        stored = await self._query(lambda store: store.events_for_orders(order_ids), strict)
        by_order: dict[str, list[Event[Any]]] = {}
        for s in stored:
            oid = getattr(s.event.payload, "order_id", None)
            if oid is not None:
                by_order.setdefault(oid, []).append(s.event)
        out: dict[str, Order] = {}
        for oid, events in by_order.items():
            record = rebuild_order(events)
            if record is not None:
                out[oid] = record
        return out

    async def _query(self, query: Callable[[EventStore], Awaitable[list[StoredEvent]]], strict: bool
                     ) -> list[StoredEvent]:
        assert self.archive is not None
        try:
            with self.outside():
                return await query(await self.archive())
        except psycopg.errors.UndefinedTable:
            return []  # nothing recorded yet: the recorder creates the table
        except psycopg.Error as exc:
            log.warning("event store query failed", error=type(exc).__name__)
            if strict:
                raise EventStoreUnavailable("the event store cannot be queried") from None
            return []
        except EventStoreUnavailable:
            if strict:
                raise
            return []

    async def load(self, key: str) -> Order | None:
        raw: Any = await self.redis.get(key)
        return load(Order, raw) if raw else None

    async def request_cancel(self, record: Order, requested_by: str) -> None:
        event = Event.new(
            OrderCancelRequested(
                order_id=record.order_id, client_order_id=record.client_order_id, requested_by=requested_by
            ),
            portfolio_id=record.portfolio_id, correlation_id=record.correlation_id,
        )
        await self.bus.publish(event)

    async def recent(self, portfolio_id: str, status: OrderStatus | None, limit: int) -> list[Order]:
        """Newest first; with a status filter, pages through the index until ``limit`` match.
        Past the index (or for an entry whose record has expired) it goes on in the event store:
        the portfolio's requests, newest first, each order live if Redis still has it, else
        rebuilt (``ARCHIVE_SCAN_MAX`` requests at most). An unavailable event store leaves
        those out (logged) rather than failing the listing."""
        index = self.state.orders(portfolio_id)
        out: list[Order] = []
        seen: set[str] = set()
        start = 0
        page = limit if status is None else max(100, limit)
        while len(out) < limit:
            raw_ids: Any = await self.redis.zrevrange(index, start, start + page - 1)
            if not raw_ids:
                break
            ids = [i.decode() if isinstance(i, bytes) else i for i in raw_ids]
            seen.update(ids)
            if self._collect(out, await self._records(portfolio_id, ids), status, limit):
                break
            start += page
        scanned, before = 0, None
        while len(out) < limit and self.archive is not None and scanned < ARCHIVE_SCAN_MAX:
            size = min(max(100, limit), ARCHIVE_SCAN_MAX - scanned)
            requests = await self._query(
                lambda store: store.requests_of_portfolio(portfolio_id, before, size), strict=False
            )
            if not requests:
                break
            scanned += len(requests)
            before = requests[-1].seq
            ids = [oid for r in requests if (oid := getattr(r.event.payload, "order_id", None)) and oid not in seen]
            seen.update(ids)
            if self._collect(out, await self._records(portfolio_id, ids), status, limit) or len(requests) < size:
                break
        return out

    async def _records(self, portfolio_id: str, ids: list[str]) -> list[Order | None]:
        """The orders ``ids`` of a portfolio, in that order: live, else from the event store."""
        if not ids:
            return []
        raws: Any = await self.redis.mget([self.state.order(portfolio_id, i) for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if not raw]
        archived = await self.archived(gone, strict=False) if gone else {}
        out: list[Order | None] = []
        for i, raw in zip(ids, raws, strict=True):
            rec = load(Order, raw) if raw else archived.get(i)
            out.append(rec if rec is not None and rec.portfolio_id == portfolio_id else None)
        return out

    @staticmethod
    def _collect(out: list[Order], records: list[Order | None], status: OrderStatus | None,
                 limit: int) -> bool:
        """Add the records that match to ``out``; whether it is full."""
        for rec in records:
            if rec is not None and (status is None or rec.status == status):
                out.append(rec)
                if len(out) >= limit:
                    return True
        return False
