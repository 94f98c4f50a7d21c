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
    decode_balances,
    dump,
    load,
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
    risk: RiskRecord
    dirty: bool = False
    reserved: dict[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reserved = _reserved(self.risk)


def _reserved(record: RiskRecord) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    with money_context():
        for r in record.open.values():
            out[r.asset] = out.get(r.asset, ZERO) + r.amount
    return out


class RiskStage:
    def __init__(
        self, redis: Any, state_keys: StateKeys, marks: Marks, *, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        self.redis = redis
        self.sk = state_keys
        self.marks = marks
        self.clock = clock

    async def load(self, portfolio_ids: set[str]) -> dict[str, PortfolioState]:
        sk = self.sk
        pids = sorted(portfolio_ids)
        pipe = self.redis.pipeline(transaction=False)
        for pid in pids:
            pipe.get(sk.portfolio(pid))
            pipe.hgetall(sk.balances(pid))
            pipe.hgetall(sk.positions(pid))
            pipe.get(sk.risk(pid))
        replies = await pipe.execute()
        states: dict[str, PortfolioState] = {}
        for i, pid in enumerate(pids):
            pf, balances, positions, risk = replies[4 * i : 4 * i + 4]
            states[pid] = PortfolioState(
                portfolio=load(PortfolioRecord, pf) if pf else None,
                balances=decode_balances(balances),
                positions={
                    (k.decode() if isinstance(k, bytes) else k): load(PositionRecord, v).quantity
                    for k, v in positions.items()
                },
                risk=load(RiskRecord, risk) if risk else RiskRecord(),
            )
        return states

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        """The batch handler: one state load for the batch, then each event in stream order."""
        states = await self.load({event.portfolio_id for event, _ in items})
        marks = await self.marks.current()
        for event, commit in items:
            with consumer_span(event, GROUP):
                state = states[event.portfolio_id]
                try:
                    if event.event_type is EventType.ORDER_REQUESTED:
                        self.assess(event, state, marks, commit)
                    else:
                        self.release(event, state)
                except Exception as exc:
                    commit.fail(exc)
                    continue
                if state.dirty:
                    commit.write("SET", self.sk.risk(event.portfolio_id), dump(state.risk))
                    state.dirty = False

    def assess(
        self, event: Event[OrderRequested], state: PortfolioState, marks: Mapping[str, Decimal], commit: Commit
    ) -> None:
        """Decide one order request; emit the decision and reserve funds for an approval."""
        request = event.payload
        now = self.clock()
        if request.order_id in state.risk.open:
            return  # decided before (a redelivered request): the decision stands
        portfolio = state.portfolio
        if portfolio is None:
            commit.emit(_rejected(event, RejectReason.TRADING_HALTED, f"portfolio {event.portfolio_id} does not exist"))
            return
        limits = portfolio.limits.to_limits()
        instrument = INSTRUMENTS.get(request.symbol)
        window_start_ms = int((now - dt.timedelta(seconds=limits.window_seconds)).timestamp() * 1000)
        recent = tuple(t for t in state.risk.recent if t > window_start_ms)
        with money_context():
            available = {a: b - state.reserved.get(a, ZERO) for a, b in state.balances.items()}
        reference = marks.get(request.symbol)
        decision = check_order(
            request,
            instrument=instrument,
            limits=limits,
            position_quantity=state.positions.get(request.symbol, ZERO),
            balances=available,
            reference_price=reference,
            trading_state=portfolio.trading_state,
            recent_order_times=[dt.datetime.fromtimestamp(t / 1000, dt.UTC) for t in recent],
            now=now,
            fee_rate=TAKER_FEE.get(request.symbol, ZERO),
        )
        if not decision.approved:
            assert decision.reason is not None
            commit.emit(_rejected(event, decision.reason, decision.message))
            if recent != state.risk.recent:
                state.risk = RiskRecord(recent=recent, open=state.risk.open)
                state.dirty = True
            return
        assert instrument is not None and decision.notional is not None
        with money_context():
            if request.side is Side.BUY:
                reservation = Reservation(
                    instrument.quote, decision.notional * (1 + TAKER_FEE.get(request.symbol, ZERO))
                )
            else:
                reservation = Reservation(instrument.base, request.quantity)
            state.reserved[reservation.asset] = state.reserved.get(reservation.asset, ZERO) + reservation.amount
        state.risk = RiskRecord(
            recent=(*recent, int(now.timestamp() * 1000)),
            open={**state.risk.open, request.order_id: reservation},
        )
        state.dirty = True
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

    def release(self, event: Event[Any], state: PortfolioState) -> None:
        """An order finished: give back what it had reserved."""
        payload = event.payload
        if isinstance(payload, OrderExecuted) and payload.leaves_quantity > 0:
            return
        assert isinstance(payload, OrderExecuted | OrderFailed | OrderCanceled)
        reservation = state.risk.open.get(payload.order_id)
        if reservation is None:
            return
        with money_context():
            left = state.reserved.get(reservation.asset, ZERO) - reservation.amount
        state.reserved[reservation.asset] = left
        state.risk = RiskRecord(
            recent=state.risk.recent,
            open={k: v for k, v in state.risk.open.items() if k != payload.order_id},
        )
        state.dirty = True


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

