"""The risk stage: approve or reject each ``order.requested``, and set funds aside for it.

Consumes ``order.requested`` (decides), ``position.updated`` (the portfolio stage applied a
fill: the funds held for it are in the balance now) and the events that end an order with a
part unfilled (``order.failed``, ``order.canceled``) to release what the order had held
(``services.trading.funds``: never before the portfolio stage has debited it, so a portfolio
service that falls behind cannot let an order spend funds a filled one already used). Emits
``order.validated`` or ``order.rejected`` (reason codes of ``services.trading.risk.RejectReason``).

A request whose order has already left ``requested`` (redelivered after its dedupe window,
or published again) is dropped: the decision was made once, and its hold may be gone.

The decision itself is ``services.trading.risk.check_order``; this module only gathers its
inputs (the portfolio's limits and trading state, positions, balances less reservations,
the mark, recent orders, the instrument and its worst taker fee from the instrument catalogue)
and records the outcome. It owns ``risk:<portfolio>``.

The catalogue (``services.core.catalogue``) is routing's, built from the venues' markets: a
symbol it does not list is rejected ``UNKNOWN_SYMBOL``. Before routing has published one, a
batch with a request raises ``Unavailable``: the requests wait (the consumer pauses and retries)
rather than being decided without the instruments.

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

from services.core.bus import Commit, Unavailable
from services.core.catalogue import Instruments
from services.core.events import (
    Event,
    EventType,
    OrderCanceled,
    OrderFailed,
    OrderRejected,
    OrderRequested,
    OrderValidated,
    PositionUpdated,
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
from services.core.telemetry import consumer_span, get_logger
from services.risk.settings import DEFAULT_MARKET_SLIPPAGE
from services.trading import OrderType, Side
from services.trading.catalogue import Catalogue
from services.trading.funds import hold_for
from services.trading.money import ZERO, money_context
from services.trading.orders import Order, OrderStatus
from services.trading.risk import RejectReason, check_order

__all__ = ["GROUP", "HANDLED", "RiskStage"]

log = get_logger("zvt.risk")

GROUP = "risk"
STAGE = "risk"
HANDLED = (
    EventType.ORDER_REQUESTED,
    EventType.POSITION_UPDATED,
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
    decided: set[str] = field(default_factory=set)
    """The requested orders of this batch whose record has left ``requested``."""
    dirty: bool = False

    def record(self) -> RiskRecord:
        return RiskRecord(recent=tuple(self.recent), reserved={a: v for a, v in self.reserved.items() if v})


class RiskStage:
    def __init__(
        self, redis: Any, state_keys: StateKeys, marks: Marks, instruments: Instruments, *,
        clock: Callable[[], dt.datetime] = utcnow, market_slippage: Decimal = DEFAULT_MARKET_SLIPPAGE,
    ) -> None:
        self.market_slippage = market_slippage
        self.instruments = instruments
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.marks = marks
        self.clock = clock

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> dict[str, PortfolioState]:
        """The state of every portfolio in the batch, the reservation of every order it names
        and the status of every requested order: one script call."""
        sk = self.sk
        pids = sorted({event.portfolio_id for event, _ in items})
        orders = sorted({(e.portfolio_id, e.payload.order_id) for e, _ in items if e.payload.order_id is not None})
        requested = sorted(
            {(e.portfolio_id, e.payload.order_id) for e, _ in items if e.event_type is EventType.ORDER_REQUESTED}
        )
        ops: list[tuple[str, ...]] = []
        for pid in pids:
            ops += [("GET", sk.portfolio(pid)), ("HGETALL", sk.balances(pid)), ("HGETALL", sk.positions(pid)),
                    ("GET", sk.risk(pid))]
        ops += [("HGET", sk.reservations(pid), oid) for pid, oid in orders]
        ops += [("GET", sk.order(pid, oid)) for pid, oid in requested]
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
        start = 4 * len(pids)
        for (pid, oid), raw in zip(orders, replies[start : start + len(orders)], strict=True):
            states[pid].open[oid] = load(Reservation, raw) if raw else None
        for (pid, oid), raw in zip(requested, replies[start + len(orders) :], strict=True):
            if raw and load(Order, raw).status is not OrderStatus.REQUESTED:
                states[pid].decided.add(oid)
        return states

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        """The batch handler: one state load for the batch, then each event in stream order."""
        catalogue = await self.instruments.current()
        if catalogue is None and any(
            e.event_type is EventType.ORDER_REQUESTED and not c.duplicate for e, c in items
        ):
            raise Unavailable("no instrument catalogue yet (routing publishes it from its venues)")
        states = await self.load(items)
        marks = await self.marks.current()
        for event, commit in items:
            if commit.duplicate:
                continue
            with consumer_span(event, GROUP):
                state = states[event.portfolio_id]
                try:
                    if event.event_type is EventType.ORDER_REQUESTED:
                        assert catalogue is not None
                        self.assess(event, state, marks, catalogue, commit)
                    else:
                        self.release(event, state, commit)
                except Exception as exc:
                    commit.fail(exc)
                    continue
                if state.dirty:
                    commit.write("SET", self.sk.risk(event.portfolio_id), dump(state.record()))
                    state.dirty = False

    def assess(
        self, event: Event[OrderRequested], state: PortfolioState, marks: Mapping[str, Decimal],
        catalogue: Catalogue, commit: Commit,
    ) -> None:
        """Decide one order request; emit the decision and reserve funds for an approval."""
        request = event.payload
        now = self.clock()
        if state.open.get(request.order_id) is not None or request.order_id in state.decided:
            log.info("request already decided", order_id=request.order_id)
            return  # decided before (a redelivered request): the decision stands
        portfolio = state.portfolio
        if portfolio is None:
            commit.emit(_rejected(event, RejectReason.TRADING_HALTED, f"portfolio {event.portfolio_id} does not exist"))
            return
        limits = portfolio.limits.to_limits()
        instrument = catalogue.instrument(request.symbol)
        fee_rate = catalogue.taker_fee(request.symbol) or ZERO
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
            fee_rate=fee_rate,
            slippage=self.market_slippage,
        )
        if not decision.approved:
            assert decision.reason is not None
            commit.emit(_rejected(event, decision.reason, decision.message))
            return
        assert instrument is not None and decision.worst_price is not None
        hold = hold_for(
            request.side, request.quantity, decision.worst_price, fee_rate,
            instrument.base, instrument.quote,
        )
        reservation = Reservation.of(hold)
        with money_context():
            reserved[hold.asset] = reserved.get(hold.asset, ZERO) + hold.held
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
                    price_cap=(
                        decision.worst_price
                        if request.order_type is OrderType.MARKET and request.side is Side.BUY else None
                    ),
                ),
                STAGE,
            )
        )

    def release(self, event: Event[Any], state: PortfolioState, commit: Commit) -> None:
        """The portfolio applied a fill, or the order ended: give back what is no longer needed."""
        payload = event.payload
        if payload.order_id is None:
            return
        reservation = state.open.get(payload.order_id)
        if reservation is None:
            return
        hold = reservation.to_hold()
        if isinstance(payload, PositionUpdated):
            if payload.fill_quantity is None:
                return
            after = hold.confirm(payload.fill_quantity)
        elif isinstance(payload, OrderCanceled):
            after = hold.close(payload.filled_quantity)
        else:
            assert isinstance(payload, OrderFailed)
            after = hold.close(payload.filled_quantity or ZERO)
        if not reservation.quantity:
            # held before holds tracked fills: the whole amount, until the order's first news
            before_held, after_held, done = reservation.amount, ZERO, True
        else:
            before_held, after_held, done = hold.held, after.held, after.done
        with money_context():
            state.reserved[hold.asset] = state.reserved.get(hold.asset, ZERO) - (before_held - after_held)
        state.dirty = True
        if done:
            state.open[payload.order_id] = None
            commit.write("HDEL", self.sk.reservations(event.portfolio_id), payload.order_id)
        else:
            kept = Reservation.of(after)
            state.open[payload.order_id] = kept
            commit.write("HSET", self.sk.reservations(event.portfolio_id), payload.order_id, dump(kept))


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

