"""The risk stage: approve or reject each ``order.requested``, and set funds aside for it.

Consumes ``order.requested`` (decides), and the events that finish an order
(``order.executed`` with nothing left, ``order.failed``, ``order.canceled``) to release what
the order had reserved. Emits ``order.validated`` or ``order.rejected`` (reason codes of
``services.trading.risk.RejectReason``).

The decision itself is ``services.trading.risk.check_order``; this module only gathers its
inputs (the portfolio's limits and trading state, positions, balances less reservations,
the mark, recent orders) and records the outcome. It owns ``risk:<portfolio>``.

Runs as an exclusive consumer: one process handles a shard at a time, in order, so the state
it reads at the start of a batch is the state its previous batch committed. Within a batch,
the events of one portfolio see each other's effects through ``PortfolioState``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.core.bus import Commit
from services.core.events import (
    Event,
    EventType,
    OrderCanceled,
    OrderExecuted,
    OrderFailed,
    OrderRejected,
    OrderRequested,
    OrderValidated,
    Side,
    utcnow,
)
from services.core.hotstate import (
    PortfolioRecord,
    PositionRecord,
    Reservation,
    RiskRecord,
    StateKeys,
    StateReader,
    decode_balances,
    dump,
    load,
    pairs,
)
from services.core.marks import Marks
from services.core.telemetry import consumer_span
from services.risk.instruments import INSTRUMENTS, TAKER_FEE
from services.trading.money import ZERO, money_context
from services.trading.risk import RejectReason, check_order

__all__ = ["GROUP", "HANDLED", "RiskStage"]

GROUP = "risk"
STAGE = "risk"
HANDLED = (
    EventType.ORDER_REQUESTED,
    EventType.ORDER_EXECUTED,
    EventType.ORDER_FAILED,
    EventType.ORDER_CANCELED,
)


@dataclass(slots=True)
class PortfolioState:
    portfolio: PortfolioRecord | None
    balances: dict[str, Decimal]
    positions: dict[str, Decimal]
    recent: list[int] = field(default_factory=list)
    reserved: dict[str, Decimal] = field(default_factory=dict)
    open: dict[str, Reservation | None] = field(default_factory=dict)
    """The reservations of the orders this batch names (``None``: none, or released)."""
    dirty: bool = False

    def record(self) -> RiskRecord:
        return RiskRecord(recent=tuple(self.recent), reserved={a: v for a, v in self.reserved.items() if v})


class RiskStage:
    def __init__(
        self, redis: Any, state_keys: StateKeys, marks: Marks, *, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.marks = marks
        self.clock = clock

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> dict[str, PortfolioState]:
        """The state of every portfolio in the batch, and the reservation of every order it
        names: one pipelined round trip."""
        sk = self.sk
        pids = sorted({event.portfolio_id for event, _ in items})
        orders = sorted({(event.portfolio_id, event.payload.order_id) for event, _ in items})
        ops: list[tuple[str, ...]] = []
        for pid in pids:
            ops += [("GET", sk.portfolio(pid)), ("HGETALL", sk.balances(pid)), ("HGETALL", sk.positions(pid)),
                    ("GET", sk.risk(pid))]
        ops += [("HGET", sk.reservations(pid), oid) for pid, oid in orders]
        replies = await self.reader.read(ops)
        states: dict[str, PortfolioState] = {}
        for i, pid in enumerate(pids):
            pf, balances, positions, risk = replies[4 * i : 4 * i + 4]
            record = load(RiskRecord, risk) if risk else RiskRecord()
            states[pid] = PortfolioState(
                portfolio=load(PortfolioRecord, pf) if pf else None,
                balances=decode_balances(pairs(balances)),
                positions={k: load(PositionRecord, v).quantity for k, v in pairs(positions).items()},
                recent=list(record.recent),
                reserved=dict(record.reserved),
            )
        for (pid, oid), raw in zip(orders, replies[4 * len(pids) :], strict=True):
            states[pid].open[oid] = load(Reservation, raw) if raw else None
        return states

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        """The batch handler: one state load for the batch, then each event in stream order."""
        states = await self.load(items)
        marks = await self.marks.current()
        for event, commit in items:
            with consumer_span(event, GROUP):
                state = states[event.portfolio_id]
                try:
                    if event.event_type is EventType.ORDER_REQUESTED:
                        self.assess(event, state, marks, commit)
                    else:
                        self.release(event, state, commit)
                except Exception as exc:
                    commit.fail(exc)
                    continue
                if state.dirty:
                    commit.write("SET", self.sk.risk(event.portfolio_id), dump(state.record()))
                    state.dirty = False

    def assess(
        self, event: Event[OrderRequested], state: PortfolioState, marks: Mapping[str, Decimal], commit: Commit
    ) -> None:
        """Decide one order request; emit the decision and reserve funds for an approval."""
        request = event.payload
        now = self.clock()
        if state.open.get(request.order_id) is not None:
            return  # decided before (a redelivered request): the decision stands
        portfolio = state.portfolio
        if portfolio is None:
            commit.emit(_rejected(event, RejectReason.TRADING_HALTED, f"portfolio {event.portfolio_id} does not exist"))
            return
        limits = portfolio.limits.to_limits()
        instrument = INSTRUMENTS.get(request.symbol)
        now_ms = int(now.timestamp() * 1000)
        window_start_ms = now_ms - limits.window_seconds * 1000
        if state.recent and state.recent[0] <= window_start_ms:
            state.recent = [t for t in state.recent if t > window_start_ms]
            state.dirty = True
        reserved = state.reserved
        with money_context():
            available = {a: b - reserved.get(a, ZERO) for a, b in state.balances.items()}
        reference = marks.get(request.symbol)
        decision = check_order(
            request,
            instrument=instrument,
            limits=limits,
            position_quantity=state.positions.get(request.symbol, ZERO),
            balances=available,
            reference_price=reference,
            trading_state=portfolio.trading_state,
            recent_order_times=len(state.recent),
            now=now,
            fee_rate=TAKER_FEE.get(request.symbol, ZERO),
        )
        if not decision.approved:
            assert decision.reason is not None
            commit.emit(_rejected(event, decision.reason, decision.message))
            return
        assert instrument is not None and decision.notional is not None
        with money_context():
            if request.side is Side.BUY:
                reservation = Reservation(
                    instrument.quote, decision.notional * (1 + TAKER_FEE.get(request.symbol, ZERO))
                )
            else:
                reservation = Reservation(instrument.base, request.quantity)
            reserved[reservation.asset] = reserved.get(reservation.asset, ZERO) + reservation.amount
        state.open[request.order_id] = reservation
        state.recent.append(now_ms)
        state.dirty = True
        commit.write("HSET", self.sk.reservations(event.portfolio_id), request.order_id, dump(reservation))
        commit.emit(
            event.derive(
                OrderValidated(
                    order_id=request.order_id,
                    client_order_id=request.client_order_id,
                    symbol=request.symbol,
                    side=request.side,
                    order_type=request.order_type,
                    quantity=request.quantity,
                    price=request.price,
                    time_in_force=request.time_in_force,
                    venue=request.venue,
                    reference_price=reference,
                ),
                STAGE,
            )
        )

    def release(self, event: Event[Any], state: PortfolioState, commit: Commit) -> None:
        """An order finished: give back what it had reserved."""
        payload = event.payload
        if isinstance(payload, OrderExecuted) and payload.leaves_quantity > 0:
            return
        assert isinstance(payload, OrderExecuted | OrderFailed | OrderCanceled)
        reservation = state.open.get(payload.order_id)
        if reservation is None:
            return
        with money_context():
            state.reserved[reservation.asset] = state.reserved.get(reservation.asset, ZERO) - reservation.amount
        state.open[payload.order_id] = None
        state.dirty = True
        commit.write("HDEL", self.sk.reservations(event.portfolio_id), payload.order_id)


def _rejected(event: Event[OrderRequested], reason: RejectReason, message: str) -> Event[Any]:
    return event.derive(
        OrderRejected(
            order_id=event.payload.order_id,
            client_order_id=event.payload.client_order_id,
            reason_code=str(reason),
            reason=message,
            stage=STAGE,
        ),
        STAGE,
    )

