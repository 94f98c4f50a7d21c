"""The portfolio stage: apply each fill to the portfolio's position and balances.

Consumes ``order.executed``; owns ``positions:<portfolio>`` and ``balances:<portfolio>``
(after the admin API seeded them). For every fill it emits ``position.updated`` (with the
fill's sequence number in that position, which replay follows) and ``portfolio.updated``
(the balances after it). Positions net buys against sells at average cost
(``services.trading.positions``); fees are charged in the quote asset.
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
    Side,
    TradingState,
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
from services.core.telemetry import consumer_span
from services.trading.money import ZERO, money_context

__all__ = ["GROUP", "HANDLED", "PortfolioStage", "apply_fill_to_balances", "split_symbol"]

GROUP = "portfolio"
STAGE = "portfolio"
HANDLED = (EventType.ORDER_EXECUTED,)


@dataclass(slots=True)
class _State:
    trading_state: TradingState
    balances: dict[str, Decimal]
    positions: dict[str, PositionRecord]


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
    def __init__(self, redis: Any, state_keys: StateKeys, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.redis = redis
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.clock = clock

    async def load(self, portfolio_ids: set[str]) -> dict[str, _State]:
        pids = sorted(portfolio_ids)
        ops: list[tuple[str, ...]] = []
        for pid in pids:
            ops += [("GET", self.sk.portfolio(pid)), ("HGETALL", self.sk.balances(pid)), ("HGETALL", self.sk.positions(pid))]
        replies = await self.reader.read(ops)
        out: dict[str, _State] = {}
        for i, pid in enumerate(pids):
            pf, balances, positions = replies[3 * i : 3 * i + 3]
            record = load(PortfolioRecord, pf) if pf else None
            out[pid] = _State(
                trading_state=record.trading_state if record else TradingState.ACTIVE,
                balances=decode_balances(pairs(balances)),
                positions={k: load(PositionRecord, v) for k, v in pairs(positions).items()},
            )
        return out

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        states = await self.load({event.portfolio_id for event, _ in items})
        for event, commit in items:
            with consumer_span(event, GROUP):
                try:
                    self.apply(event, states[event.portfolio_id], commit)
                except Exception as exc:
                    commit.fail(exc)

    def apply(self, event: Event[OrderExecuted], state: _State, commit: Commit) -> None:
        fill = event.payload
        pid = event.portfolio_id
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
