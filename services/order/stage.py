"""The order stage: the one owner of order records after the gateway created them.

Consumes what risk decided (``order.validated``, ``order.rejected``) and what the venue did
(``exchange.routed``, ``order.executed``, ``order.failed``, ``order.canceled``), moves each
order by the event's own method on ``services.trading.Order`` (which checks the state
machine's one table) and writes the order as it is. Emits ``order.created`` for a validated
order, which routing acts on.

Events of one order travel on different streams (routing emits ``exchange.routed`` and the
fills together), so they can arrive in either order: a fill may come before the routing
acknowledgement, which then changes nothing. An event that no longer applies (a second
cancel, a late routing acknowledgement, a fill counted already) is logged and dropped, never
applied twice. A new fill on an order no venue can hold (finished, say) is a disagreement with
the venue: it is dead-lettered for an operator and reconciliation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

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
from services.core.hotstate import StateKeys, StateReader, dump, load
from services.core.telemetry import consumer_span, get_logger
from services.trading.orders import Fill, InvalidTransition, Order, OrderStatus
from services.trading.terms import carry

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

    async def load(self, keys: list[str]) -> dict[str, Order]:
        """The records behind these keys (one script call: a batch is one slot on a cluster)."""
        values = await self.reader.read([("GET", key) for key in keys])
        return {k: load(Order, v) for k, v in zip(keys, values, strict=True) if v}

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

    def write(self, commit: Commit, key: str, before: Order, after: Order) -> None:
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

    def apply(self, event: Event[Any], record: Order, commit: Commit) -> Order:
        """The record after ``event``; emits what the order does next."""
        p = event.payload
        try:
            updated = applied(event, record, self.clock())
        except InvalidTransition as exc:
            if isinstance(p, OrderExecuted):
                # A fill on an order no venue holds: the venue and the platform disagree. Keep
                # the event (dead-lettered, with the reason) for an operator and reconciliation.
                raise PermanentError(str(exc)) from exc
            return self._stale(event, record)
        if updated is record:
            return self._stale(event, record)  # this venue fill is counted already
        if isinstance(p, OrderValidated):
            commit.emit(event.derive(carry(p, OrderCreated, price_cap=p.price_cap), STAGE))
        return updated

    def _stale(self, event: Event[Any], record: Order) -> Order:
        log.info(
            "event no longer applies", event_type=str(event.event_type), order_id=record.order_id,
            status=str(record.status),
        )
        return record


def applied(event: Event[Any], order: Order, at: dt.datetime) -> Order:
    """``order`` after ``event``, by the event's own method (``InvalidTransition`` where the
    state machine's table refuses the move); ``at``: the time of the change."""
    p = event.payload
    if isinstance(p, OrderValidated):
        return order.validated_and_created(at)
    if isinstance(p, OrderRejected):
        return order.rejected(p.reason_code, p.reason, at)
    if isinstance(p, ExchangeRouted):
        if p.outcome_unknown:
            return order.outcome_unknown(p.venue, at)  # refused where the answer got here first
        return order.routed(p.venue, at)  # refused where the fills got here first
    if isinstance(p, OrderFailed):
        return order.failed(p.reason_code, p.reason, at)
    if isinstance(p, OrderCanceled):
        if p.reason == EXPIRED_REASON:
            return order.expired(p.reason, at)
        return order.canceled(p.reason, at)
    if isinstance(p, OrderExecuted):
        fill = Fill(
            fill_id=p.fill_id, quantity=p.quantity, price=p.price, commission=p.commission,
            commission_asset=p.commission_asset, liquidity=str(p.liquidity), venue=p.venue, at=event.occurred_at,
            venue_fill_id=p.venue_fill_id,
        )
        return order.filled(fill, at)
    raise PermanentError(f"order stage does not handle {event.event_type}")


def rebuild_order(events: Iterable[Event[Any]]) -> Order | None:
    """An order rebuilt from its stored events (its ``order.requested``, then what the order
    stage handles, in stored order) by the stage's own ``applied``: what the API serves once
    the live record has left Redis. ``None`` without the request. Its ``updated_at`` is the
    time of the last event that changed it (the live record has the time the stage handled
    it, a little later); ``body_hash`` is not rebuilt."""
    order: Order | None = None
    for event in events:
        p = event.payload
        if isinstance(p, OrderRequested):
            if order is None:
                order = Order.requested(
                    p, portfolio_id=event.portfolio_id, at=event.occurred_at, requested_by=p.requested_by,
                    route=event.route,
                )
            continue
        if order is None or event.event_type not in HANDLED:
            continue
        try:
            order = applied(event, order, event.occurred_at)
        except (InvalidTransition, PermanentError):
            continue  # the live stage dropped it, or dead-lettered it
    return order
