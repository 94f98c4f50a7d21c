"""The portfolio stage: apply each fill to the portfolio's position and balances.

Consumes ``order.executed``; owns ``positions:<portfolio>`` and ``balances:<portfolio>``
(after the admin API seeded them). For every fill it emits ``position.updated`` (with the
fill's sequence number in that position, which replay follows, and the fill's quantity, which
tells risk the funds it held for that fill are debited now) and ``portfolio.updated`` (the
balances after it). Positions net buys against sells at average cost
(``services.trading.positions``); fees are charged in the quote asset.

Each ``fill_id`` is applied once, whatever arrives twice: the bus drops a repeated event id
within its dedupe window, and the stage itself remembers the fill ids it applied to each order
(``applied:<order_id>``, for ``ZVT_ORDER_FILL_MEMORY_S``), so the same fill under another event id, or
redelivered after the window, changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.core.bus import Commit
from services.core.events import (
    Event,
    EventType,
    OrderExecuted,
    PortfolioUpdated,
    PositionUpdated,
    utcnow,
)
from services.core.hotstate import (
    PortfolioRecord,
    PositionRecord,
    StateKeys,
    StateReader,
    decode_balances,
    dump,
    load,
    pairs,
)
from services.core.telemetry import consumer_span, get_logger
from services.trading import Side, TradingState
from services.trading.money import ZERO, money_context

__all__ = ["FILL_MEMORY_S", "GROUP", "HANDLED", "PortfolioStage", "apply_fill_to_balances", "split_symbol"]

log = get_logger("zvt.portfolio")

FILL_MEMORY_S = 30 * 86_400
"""How long the applied fill ids of an order are remembered by default (a venue reports a fill
within minutes; reconciliation looks at orders younger than this); ``ZVT_ORDER_FILL_MEMORY_S``."""

GROUP = "portfolio"
STAGE = "portfolio"
HANDLED = (EventType.ORDER_EXECUTED,)


@dataclass(slots=True)
class _State:
    trading_state: TradingState
    balances: dict[str, Decimal]
    positions: dict[str, PositionRecord]
    applied: set[tuple[str, str]]
    """(order id, fill id) of the batch's fills already applied."""


def split_symbol(symbol: str) -> tuple[str, str]:
    base, _, quote = symbol.partition("/")
    return base, quote


def apply_fill_to_balances(balances: dict[str, Decimal], fill: OrderExecuted) -> dict[str, Decimal]:
    """The balances after one fill: the base asset moves by the quantity, the quote asset by
    the notional, and the fee comes out of the fee asset."""
    base, quote = split_symbol(fill.symbol)
    out = dict(balances)
    with money_context():
        notional = fill.quantity * fill.price
        if fill.side is Side.BUY:
            out[base] = out.get(base, ZERO) + fill.quantity
            out[quote] = out.get(quote, ZERO) - notional
        else:
            out[base] = out.get(base, ZERO) - fill.quantity
            out[quote] = out.get(quote, ZERO) + notional
        out[fill.commission_asset] = out.get(fill.commission_asset, ZERO) - fill.commission
    return out


class PortfolioStage:
    def __init__(
        self, redis: Any, state_keys: StateKeys, *, clock: Callable[[], dt.datetime] = utcnow,
        fill_memory_s: int = FILL_MEMORY_S,
    ) -> None:
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.clock = clock
        self.fill_memory_s = fill_memory_s

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> dict[str, _State]:
        """The balances and positions of the batch's portfolios and which of its fills were
        applied before: one script call."""
        sk = self.sk
        pids = sorted({event.portfolio_id for event, _ in items})
        fills = sorted({(e.portfolio_id, e.payload.order_id, e.payload.fill_id) for e, _ in items})
        ops: list[tuple[str, ...]] = []
        for pid in pids:
            ops += [("GET", sk.portfolio(pid)), ("HGETALL", sk.balances(pid)), ("HGETALL", sk.positions(pid))]
        ops += [("SISMEMBER", sk.applied_fills(pid, oid), fid) for pid, oid, fid in fills]
        replies = await self.reader.read(ops)
        out: dict[str, _State] = {}
        for i, pid in enumerate(pids):
            pf, balances, positions = replies[3 * i : 3 * i + 3]
            record = load(PortfolioRecord, pf) if pf else None
            out[pid] = _State(
                trading_state=record.trading_state if record else TradingState.ACTIVE,
                balances=decode_balances(pairs(balances)),
                positions={k: load(PositionRecord, v) for k, v in pairs(positions).items()},
                applied=set(),
            )
        for (pid, oid, fid), seen in zip(fills, replies[3 * len(pids) :], strict=True):
            if seen:
                out[pid].applied.add((oid, fid))
        return out

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        states = await self.load(items)
        for event, commit in items:
            if commit.duplicate:
                continue
            with consumer_span(event, GROUP):
                try:
                    self.apply(event, states[event.portfolio_id], commit)
                except Exception as exc:
                    commit.fail(exc)

    def apply(self, event: Event[OrderExecuted], state: _State, commit: Commit) -> None:
        fill = event.payload
        pid = event.portfolio_id
        if (fill.order_id, fill.fill_id) in state.applied:
            log.info("fill already applied", order_id=fill.order_id, fill_id=fill.fill_id)
            return
        state.applied.add((fill.order_id, fill.fill_id))
        at = self.clock()
        before = state.positions.get(fill.symbol) or PositionRecord(symbol=fill.symbol)
        base, quote = split_symbol(fill.symbol)
        fee = fill.commission if fill.commission_asset == quote else ZERO
        position = before.to_position().apply_fill(fill.side, fill.quantity, fill.price, fee)
        record = PositionRecord.of(position, before.fills + 1, at)
        balances = apply_fill_to_balances(state.balances, fill)
        state.positions[fill.symbol] = record
        state.balances = balances
        commit.write("HSET", self.sk.positions(pid), fill.symbol, dump(record))
        changed = {a: str(balances[a]) for a in {base, quote, fill.commission_asset}}
        commit.write("HSET", self.sk.balances(pid), *[x for kv in sorted(changed.items()) for x in kv])
        applied = self.sk.applied_fills(pid, fill.order_id)
        commit.write("SADD", applied, fill.fill_id)
        commit.write("EXPIRE", applied, self.fill_memory_s)
        commit.emit(
            event.derive(
                PositionUpdated(
                    symbol=fill.symbol,
                    quantity=position.quantity,
                    average_price=position.average_price,
                    realized_pnl=position.realized_pnl,
                    order_id=fill.order_id,
                    fill_id=fill.fill_id,
                    sequence=record.fills,
                    fill_quantity=fill.quantity,
                ),
                STAGE,
            )
        )
        commit.emit(
            event.derive(
                PortfolioUpdated(balances=dict(balances), trading_state=state.trading_state),
                STAGE,
                index=1,
            )
        )
