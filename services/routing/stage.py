"""The routing stage: send each created order to a venue and report what the venue did.

Consumes ``order.created`` and ``order.cancel_requested``. For an order it picks a venue
(``services.trading.routing.choose_venue``: best expected price net of fees among healthy
venues listing the symbol), submits it, and emits ``exchange.routed`` with the decision and
its inputs, one ``order.executed`` per fill, and then what became of the rest:

- market, IOC and FOK orders: whatever did not fill at once expires
  (``order.canceled`` with reason ``expired``);
- a GTC limit order rests: its remainder is kept in ``resting:<portfolio>`` until a cancel.
  The local paper venue matches at submission only; resting orders filling later, as the
  market moves, come with the deeper venue simulation.

A refused submit becomes ``order.failed``. A cancel for an order routing has not seen yet is
remembered (``cancel:<order id>``, a day) and applied when the order arrives.

Every event is derived from the one that caused it and fill ids are ``<order id>:<n>``, so a
batch handled again after a crash emits the same ids, which every consumer drops.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.core.bus import Commit
from services.core.events import (
    Event,
    EventType,
    ExchangeRouted,
    OrderCanceled,
    OrderCancelRequested,
    OrderCreated,
    OrderExecuted,
    OrderFailed,
    OrderType,
    TimeInForce,
    utcnow,
)
from services.core.hotstate import OrderRecord, RestingOrder, StateKeys, StateReader, dump, load
from services.core.marks import Marks
from services.core.telemetry import consumer_span, get_logger
from services.trading.money import ZERO, money_context
from services.trading.orders import OrderStatus
from services.trading.routing import NoVenueAvailable, VenueOption, choose_venue
from services.venues.base import OrderRejected, VenueOrderRequest, VenueOrderStatus
from services.venues.paper import PaperVenue

__all__ = ["CANCEL_TTL_S", "GROUP", "HANDLED", "RoutingStage"]

log = get_logger("zvt.routing")

GROUP = "routing"
STAGE = "routing"
HANDLED = (EventType.ORDER_CREATED, EventType.ORDER_CANCEL_REQUESTED)
CANCEL_TTL_S = 86_400
EXPIRED = "expired"  # the order stage's reason for an expiry (services.order.stage.EXPIRED_REASON)
_FUNDS = Decimal("1000000000000")


@dataclass(slots=True)
class _Batch:
    resting: dict[tuple[str, str], RestingOrder | None] = field(default_factory=dict)
    cancels: dict[str, bool] = field(default_factory=dict)
    records: dict[str, OrderRecord | None] = field(default_factory=dict)


class RoutingStage:
    def __init__(
        self,
        redis: Any,
        state_keys: StateKeys,
        marks: Marks,
        venues: list[PaperVenue],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.marks = marks
        self.venues = {v.name: v for v in venues}
        self.clock = clock
        self._markets: dict[str, set[str]] = {}
        self._fees: dict[tuple[str, str], Decimal] = {}

    async def start(self) -> None:
        for name, venue in self.venues.items():
            markets = await venue.markets()
            # Balances are risk's business; the paper account never runs dry.
            venue.fund({asset: _FUNDS for m in markets.values() for asset in (m.base, m.quote)})
            self._markets[name] = set(markets)
            for symbol, market in markets.items():
                self._fees[(name, symbol)] = market.taker_fee

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> _Batch:
        batch = _Batch()
        ops: list[tuple[str, ...]] = []
        asked: list[tuple[str, Any]] = []
        for event, _ in items:
            pid, oid = event.portfolio_id, event.payload.order_id
            if event.event_type is EventType.ORDER_CREATED:
                ops.append(("EXISTS", self.sk.cancel(pid, oid)))
                asked.append(("cancel", oid))
            else:
                ops.append(("HGET", self.sk.resting(pid), oid))
                asked.append(("resting", (pid, oid)))
                ops.append(("GET", self.sk.order(pid, oid)))
                asked.append(("record", oid))
        replies = await self.reader.read(ops)
        for (kind, ref), reply in zip(asked, replies, strict=True):
            if kind == "cancel":
                batch.cancels[ref] = bool(reply)
            elif kind == "resting":
                batch.resting[ref] = load(RestingOrder, reply) if reply else None
            else:
                batch.records[ref] = load(OrderRecord, reply) if reply else None
        return batch

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        batch = await self.load(items)
        for event, commit in items:
            with consumer_span(event, GROUP):
                try:
                    if event.event_type is EventType.ORDER_CREATED:
                        await self.route(event, commit, batch)
                    else:
                        self.cancel(event, commit, batch)
                except Exception as exc:
                    commit.fail(exc)

    async def route(self, event: Event[OrderCreated], commit: Commit, batch: _Batch) -> None:
        order = event.payload
        pid = event.portfolio_id
        if batch.cancels.get(order.order_id):
            commit.emit(event.derive(_canceled(order, ZERO, order.quantity, "canceled before it reached a venue"), STAGE))
            commit.write("DEL", self.sk.cancel(pid, order.order_id))
            batch.cancels[order.order_id] = False
            return
        marks = await self.marks.current()
        options = [
            VenueOption(
                venue=name,
                healthy=True,
                lists_symbol=order.symbol in self._markets.get(name, ()),
                expected_price=marks.get(order.symbol) if order.order_type is OrderType.MARKET else order.price,
                fee_rate=self._fees.get((name, order.symbol), ZERO),
            )
            for name in self.venues
        ]
        try:
            decision = choose_venue(order.symbol, order.side, options, requested_venue=order.venue)
        except NoVenueAvailable as exc:
            commit.emit(event.derive(_failed(order, "NO_VENUE", str(exc), None), STAGE))
            return
        venue = self.venues[decision.venue]
        mark = marks.get(order.symbol)
        if mark is not None and venue.mid(order.symbol) != mark:
            venue.set_price(order.symbol, mark)
        # The venue matches what crosses now; a GTC limit's remainder rests with us.
        rests = order.order_type is OrderType.LIMIT and order.time_in_force is TimeInForce.GTC
        request = VenueOrderRequest(
            client_order_id=order.order_id,
            symbol=order.symbol,
            side=order.side,
            order_type=order.order_type,
            quantity=order.quantity,
            price=order.price,
            time_in_force=TimeInForce.IOC if rests else order.time_in_force,
        )
        try:
            placed = await venue.submit(request)
        except OrderRejected as exc:
            commit.emit(event.derive(_failed(order, "VENUE_REJECTED", str(exc), venue.name), STAGE))
            return
        finally:
            venue.forget(order.order_id)
        commit.emit(
            event.derive(
                ExchangeRouted(
                    order_id=order.order_id,
                    venue=decision.venue,
                    expected_price=decision.expected_price,
                    fee_rate=decision.fee_rate,
                    reason=decision.reason,
                    candidates=decision.quotes(),
                ),
                STAGE,
            )
        )
        cumulative = ZERO
        index = 0
        for index, fill in enumerate(placed.fills, start=1):
            with money_context():
                cumulative += fill.quantity
                leaves = order.quantity - cumulative
            commit.emit(
                event.derive(
                    OrderExecuted(
                        order_id=order.order_id,
                        client_order_id=order.client_order_id,
                        symbol=order.symbol,
                        side=order.side,
                        venue=venue.name,
                        venue_order_id=placed.venue_order_id,
                        fill_id=f"{order.order_id}:{index}",
                        quantity=fill.quantity,
                        price=fill.price,
                        commission=fill.fee,
                        commission_asset=fill.fee_asset,
                        liquidity=fill.liquidity,
                        cumulative_quantity=cumulative,
                        leaves_quantity=leaves,
                    ),
                    STAGE,
                    index=index,
                )
            )
        with money_context():
            remaining = order.quantity - cumulative
        if remaining <= 0:
            return
        if rests:
            assert order.price is not None
            resting = RestingOrder(
                order_id=order.order_id,
                client_order_id=order.client_order_id,
                symbol=order.symbol,
                side=order.side,
                price=order.price,
                quantity=order.quantity,
                filled_quantity=cumulative,
                venue=venue.name,
                venue_order_id=placed.venue_order_id,
                fills=index,
                since=self.clock(),
            )
            batch.resting[(pid, order.order_id)] = resting
            commit.write("HSET", self.sk.resting(pid), order.order_id, dump(resting))
            return
        assert placed.status in (VenueOrderStatus.EXPIRED, VenueOrderStatus.CANCELED, VenueOrderStatus.FILLED)
        commit.emit(event.derive(_canceled(order, cumulative, remaining, EXPIRED), STAGE, index=index + 1))

    def cancel(self, event: Event[OrderCancelRequested], commit: Commit, batch: _Batch) -> None:
        request = event.payload
        pid = event.portfolio_id
        resting = batch.resting.get((pid, request.order_id))
        if resting is not None:
            with money_context():
                left = resting.quantity - resting.filled_quantity
            commit.emit(
                event.derive(
                    OrderCanceled(
                        order_id=request.order_id,
                        client_order_id=request.client_order_id,
                        reason="canceled by client",
                        filled_quantity=resting.filled_quantity,
                        canceled_quantity=left,
                    ),
                    STAGE,
                )
            )
            commit.write("HDEL", self.sk.resting(pid), request.order_id)
            batch.resting[(pid, request.order_id)] = None
            return
        record = batch.records.get(request.order_id)
        if record is not None and record.is_terminal:
            return  # finished before the cancel got here: nothing to do
        if record is not None and record.status in (OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED):
            return  # at the venue and not resting: its outcome is already on its way
        # Not at routing yet (still at risk or the order stage): cancel it when it arrives.
        batch.cancels[request.order_id] = True
        commit.write("SET", self.sk.cancel(pid, request.order_id), b"1", "EX", CANCEL_TTL_S)


def _canceled(order: OrderCreated, filled: Decimal, canceled: Decimal, reason: str) -> OrderCanceled:
    return OrderCanceled(
        order_id=order.order_id,
        client_order_id=order.client_order_id,
        reason=reason,
        filled_quantity=filled,
        canceled_quantity=canceled,
    )


def _failed(order: OrderCreated, code: str, reason: str, venue: str | None) -> OrderFailed:
    return OrderFailed(
        order_id=order.order_id, client_order_id=order.client_order_id, reason_code=code, reason=reason, venue=venue
    )
