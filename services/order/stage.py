"""The order stage: the one owner of order records after the gateway created them.

Consumes what risk decided (``order.validated``, ``order.rejected``) and what the venue did
(``exchange.routed``, ``order.executed``, ``order.failed``, ``order.canceled``), moves each
order through the state machine of ``services.trading.orders`` and writes its
``OrderRecord``. Emits ``order.created`` for a validated order, which routing acts on.

Events of one order travel on different streams (routing emits ``exchange.routed`` and the
fills together), so they can arrive in either order: a fill may come before the routing
acknowledgement, which then changes nothing. An event that no longer applies (a second
cancel, a late routing acknowledgement) is logged and dropped, never applied twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from services.core.bus import Commit, PermanentError
from services.core.events import (
    Event,
    EventType,
    ExchangeRouted,
    OrderCanceled,
    OrderCreated,
    OrderExecuted,
    OrderFailed,
    OrderRejected,
    OrderRequested,
    OrderValidated,
    utcnow,
)
from services.core.hotstate import Fill, OrderRecord, StateKeys, StateReader, dump, load, requested_order
from services.core.keys import Keys
from services.core.telemetry import consumer_span, get_logger
from services.trading.orders import TRANSITIONS, InvalidTransition, OrderStatus

__all__ = ["EXPIRED_REASON", "GROUP", "HANDLED", "OrderStage", "rebuild_order"]

log = get_logger("zvt.order")

GROUP = "order"
STAGE = "order"
DEFAULT_RETENTION_S = 86_400
"""``ZVT_ORDER_TERMINAL_RETENTION_S``'s default (``services.order.settings``)."""
EXPIRED_REASON = "expired"
"""``order.canceled`` with this reason: the venue expired the rest (IOC, FOK, market)."""

HANDLED = (
    EventType.ORDER_VALIDATED,
    EventType.ORDER_REJECTED,
    EventType.EXCHANGE_ROUTED,
    EventType.ORDER_EXECUTED,
    EventType.ORDER_FAILED,
    EventType.ORDER_CANCELED,
)

S = OrderStatus
# A validated order is created at once: both moves must stay in the state machine's table.
assert {(S.REQUESTED, S.VALIDATED), (S.VALIDATED, S.CREATED)} <= TRANSITIONS


class OrderStage:
    def __init__(
        self, redis: Any, state_keys: StateKeys, *, clock: Callable[[], dt.datetime] = utcnow,
        terminal_retention_s: int = DEFAULT_RETENTION_S,
    ) -> None:
        """``terminal_retention_s``: how long a record stays once terminal
        (``ZVT_ORDER_TERMINAL_RETENTION_S``)."""
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.clock = clock
        self.retention_s = terminal_retention_s

    async def load(self, keys: list[str]) -> dict[str, OrderRecord]:
        """The records behind these keys (one script call: a batch is one slot on a cluster)."""
        values = await self.reader.read([("GET", key) for key in keys])
        return {k: load(OrderRecord, v) for k, v in zip(keys, values, strict=True) if v}

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        keyed = [(self.sk.order(e.portfolio_id, e.payload.order_id), e, c) for e, c in items]
        records = await self.load(sorted({key for key, _, _ in keyed}))
        for key, event, commit in keyed:
            if commit.duplicate:
                continue
            with consumer_span(event, GROUP):
                record = records.get(key)
                try:
                    if record is None:
                        # The gateway writes the record before it publishes the request, so
                        # every later event finds it; one that does not is not ours to guess.
                        raise PermanentError(f"no record for order {event.payload.order_id}")
                    updated = self.apply(event, record, commit)
                except Exception as exc:
                    commit.fail(exc)
                    continue
                if updated is not record:
                    records[key] = updated
                    self.write(commit, key, record, updated)

    def write(self, commit: Commit, key: str, before: OrderRecord, after: OrderRecord) -> None:
        """The record's new state, with the shard's open-order index and, for an order that
        has just ended, its expiry and the trim of the portfolio's orders index (one commit)."""
        oid = after.order_id
        open_index = self.sk.open_orders(commit.shard)
        if after.is_terminal and not before.is_terminal:
            commit.write("SET", key, dump(after), "EX", self.retention_s)
            commit.write("ZREM", open_index, oid)
            # entries as old as the retention: their records are gone or about to be; the API
            # finds those orders in the event store
            cutoff_ms = int(self.clock().timestamp() * 1000) - self.retention_s * 1000
            commit.write("ZREMRANGEBYSCORE", self.sk.orders(after.portfolio_id), "-inf", cutoff_ms)
            return
        commit.write("SET", key, dump(after))
        if after.status is S.CREATED and before.status is not S.CREATED:
            commit.write("ZADD", open_index, int(after.created_at.timestamp() * 1000), oid)

    def apply(self, event: Event[Any], record: OrderRecord, commit: Commit) -> OrderRecord:
        """The record after ``event``; emits what the order does next."""
        p = event.payload
        at = self.clock()
        status = record.status
        # Status moves straight on the record, checked against the state machine's one table
        # (a rejected request may not even make a valid ``Order``: risk is where a negative
        # price is caught). Fills go through ``Order.apply_fill`` for the arithmetic.
        if isinstance(p, OrderRejected):
            if (status, S.REJECTED) not in TRANSITIONS:
                return self._stale(event, record)
            return msgspec.structs.replace(
                record, status=S.REJECTED, reject_code=p.reason_code, reject_reason=p.reason, updated_at=at
            )
        if isinstance(p, OrderValidated):
            if status is not S.REQUESTED:
                return self._stale(event, record)
            commit.emit(
                event.derive(
                    OrderCreated(
                        order_id=p.order_id,
                        client_order_id=p.client_order_id,
                        symbol=p.symbol,
                        side=p.side,
                        order_type=p.order_type,
                        quantity=p.quantity,
                        price=p.price,
                        time_in_force=p.time_in_force,
                        venue=p.venue,
                        price_cap=p.price_cap,
                    ),
                    STAGE,
                )
            )
            return msgspec.structs.replace(record, status=S.CREATED, updated_at=at)
        if isinstance(p, ExchangeRouted) and p.outcome_unknown:
            if (status, S.UNKNOWN) not in TRANSITIONS:
                return self._stale(event, record)  # routing's answer (or the fills) got here first
            return msgspec.structs.replace(record, status=S.UNKNOWN, venue=p.venue, updated_at=at)
        if isinstance(p, ExchangeRouted):
            if (status, S.ROUTED) not in TRANSITIONS:
                return self._stale(event, record)  # the fills got here first
            return msgspec.structs.replace(record, status=S.ROUTED, venue=p.venue, updated_at=at)
        if isinstance(p, OrderFailed):
            if (status, S.FAILED) not in TRANSITIONS:
                return self._stale(event, record)
            return msgspec.structs.replace(
                record, status=S.FAILED, reject_code=p.reason_code, reject_reason=p.reason, updated_at=at
            )
        if isinstance(p, OrderCanceled):
            target = S.EXPIRED if p.reason == EXPIRED_REASON else S.CANCELED
            if (status, target) not in TRANSITIONS:
                return self._stale(event, record)
            return msgspec.structs.replace(record, status=target, reject_reason=p.reason, updated_at=at)
        if isinstance(p, OrderExecuted):
            if any(
                f.fill_id == p.fill_id
                or (p.venue_fill_id is not None and (f.venue, f.venue_fill_id) == (p.venue, p.venue_fill_id))
                for f in record.fills
            ):
                return self._stale(event, record)  # this venue fill is counted already
            order = record.to_order()
            try:
                filled = order.apply_fill(p.fill_id, p.quantity, p.price, p.commission, at)
            except InvalidTransition as exc:
                # A fill on a finished order: the venue and the platform disagree. Keep the
                # event (dead-lettered, with the reason) for an operator and reconciliation.
                raise PermanentError(str(exc)) from exc
            fill = Fill(
                fill_id=p.fill_id,
                quantity=p.quantity,
                price=p.price,
                commission=p.commission,
                commission_asset=p.commission_asset,
                liquidity=str(p.liquidity),
                venue=p.venue,
                at=event.occurred_at,
                venue_fill_id=p.venue_fill_id,
            )
            return record.with_order(
                filled, fills=(*record.fills, fill), commission_asset=p.commission_asset, venue=record.venue or p.venue
            )
        raise PermanentError(f"order stage does not handle {event.event_type}")

    def _stale(self, event: Event[Any], record: OrderRecord) -> OrderRecord:
        log.info(
            "event no longer applies", event_type=str(event.event_type), order_id=record.order_id,
            status=str(record.status),
        )
        return record


def rebuild_order(events: Iterable[Event[Any]], keys: Keys) -> OrderRecord | None:
    """An order's record rebuilt from its stored events (its ``order.requested``, then what the
    order stage handles, in stored order) by the stage's own ``apply``: what the API serves
    once the live record has left Redis. ``None`` without the request. The record's
    ``updated_at`` is the time of the last event that changed it (the live record has the time
    the stage handled it, a little later); ``body_hash`` is not rebuilt."""
    record: OrderRecord | None = None
    now = [utcnow()]
    stage = OrderStage(None, StateKeys(keys), clock=lambda: now[0])
    for event in events:
        p = event.payload
        if isinstance(p, OrderRequested):
            if record is None:
                record, _ = requested_order(
                    order_id=p.order_id, portfolio_id=event.portfolio_id, client_order_id=p.client_order_id,
                    symbol=p.symbol, side=p.side, order_type=p.order_type, quantity=p.quantity, price=p.price,
                    time_in_force=p.time_in_force, venue=p.venue, at=event.occurred_at,
                    requested_by=p.requested_by, route=event.route, event_id=event.event_id,
                )
                record = msgspec.structs.replace(record, route=event.route)
            continue
        if record is None or event.event_type not in HANDLED:
            continue
        now[0] = event.occurred_at
        try:
            record = stage.apply(event, record, Commit(keys, keys.shard_of(event.portfolio_id)))
        except PermanentError:
            continue  # the live stage dead-lettered it too
    return record
