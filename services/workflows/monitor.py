"""``risk.monitor`` (on a schedule) and ``market_data.process`` (on venue snapshots).

``risk.monitor`` values every portfolio at the current marks (each balance in its quote
asset: positions live in the balances the portfolio stage keeps), keeps each portfolio's peak
equity, and on a drawdown past ``ZVT_WORKFLOWS_REDUCING_DRAWDOWN`` moves it to REDUCING, past
``ZVT_WORKFLOWS_MAX_DRAWDOWN`` to HALTED, emitting ``risk.breached`` (notifications deliver it).
It only ever tightens a portfolio's state; an operator loosens it (``PUT …/trading-state``).

``market_data.process`` turns a venue's ticker and order book snapshot into ``price.updated``
and ``orderbook.updated`` and moves the mark (the mid, else the last trade) that risk's price
band and unrealized PnL use. Market events are keyed ``market:<symbol>`` on the bus.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from hatchet_sdk import Context, EmptyModel, Hatchet
from pydantic import BaseModel

from services.core.events import (
    Event,
    OrderbookUpdated,
    PriceLevel,
    PriceUpdated,
    RiskBreached,
    derive_event_id,
)
from services.core.hotstate import PortfolioRecord, decode_balances, load
from services.core.marks import Marks
from services.core.redisconn import scan_keys
from services.core.telemetry import get_logger
from services.intake import PortfolioBook
from services.trading import TradingState
from services.trading.money import ZERO, money_context
from services.workflows.contracts import MARKET_DATA, RISK_MONITOR
from services.workflows.deps import Deps, deps_of

__all__ = ["MARKET_SNAPSHOT", "MarketSnapshot", "define_market_data", "define_risk_monitor", "equity"]

log = get_logger("zvt.workflows.monitor")
MARKET_SNAPSHOT = "zvt:market.snapshot"
_SEVERITY = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}


def equity(balances: dict[str, Decimal], marks: dict[str, Decimal], quote: str) -> tuple[Decimal, Decimal]:
    """(equity, gross exposure) in ``quote``: each balance at its ``ASSET/quote`` mark."""
    with money_context():
        total, gross = ZERO, ZERO
        for asset, amount in balances.items():
            if asset == quote:
                total += amount
                continue
            mark = marks.get(f"{asset}/{quote}")
            if mark is None:
                continue
            total += amount * mark
            gross += abs(amount * mark)
    return total, gross


async def _monitor_one(deps: Deps, run_id: str, pid: str, marks: dict[str, Decimal]) -> dict[str, Any] | None:
    sk = deps.stages.keys
    raw: Any = await deps.redis.get(sk.portfolio(pid))
    if not raw:
        return None
    record = load(PortfolioRecord, raw)
    balances = decode_balances(await deps.redis.hgetall(sk.balances(pid)))
    value, gross = equity(balances, marks, record.base_currency)
    peak_key = deps.bus.keys.state(deps.bus.keys.shard_of(pid), "riskmon", "peak", pid)
    peak_raw: Any = await deps.redis.get(peak_key)
    peak = max(Decimal(peak_raw.decode()) if peak_raw else value, value)
    await deps.redis.set(peak_key, str(peak))
    with money_context():
        drawdown = (peak - value) / peak if peak > 0 else ZERO
    settings = deps.settings
    action = TradingState.ACTIVE
    limit = ZERO
    if drawdown >= Decimal(str(settings.max_drawdown)):
        action, limit = TradingState.HALTED, Decimal(str(settings.max_drawdown))
    elif drawdown >= Decimal(str(settings.reducing_drawdown)):
        action, limit = TradingState.REDUCING, Decimal(str(settings.reducing_drawdown))
    out: dict[str, Any] = {"portfolio_id": pid, "equity": str(value), "peak": str(peak), "drawdown": str(drawdown),
           "gross_exposure": str(gross), "state": str(record.trading_state)}
    if _SEVERITY[action] > _SEVERITY[record.trading_state]:
        await PortfolioBook(deps.bus).set_trading_state(pid, action)
        origin = derive_event_id(run_id, f"{RISK_MONITOR}:{pid}")
        await deps.bus.publish(Event.new(
            RiskBreached(rule="max_drawdown", value=drawdown, limit=limit, action=action,
                         message=f"drawdown {drawdown:.4f} of peak equity {peak} is at or past {limit}: {action}"),
            portfolio_id=pid, correlation_id=run_id, event_id=origin,
        ))
        log.warning("risk breached", portfolio_id=pid, drawdown=str(drawdown), action=str(action))
        out["state"] = str(action)
        out["breached"] = True
    return out


def define_risk_monitor(hatchet: Hatchet, cron: str) -> Any:
    wf = hatchet.workflow(name=RISK_MONITOR, on_crons=[cron] if cron else [])

    @wf.task(execution_timeout=dt.timedelta(seconds=50), retries=1)
    async def assess_portfolios(input: EmptyModel, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        marks = await Marks(deps.redis, deps.bus.keys).current()
        prefix = deps.bus.keys.namespace
        seen: list[dict[str, Any]] = []
        async for key in scan_keys(deps.redis, f"{prefix}:{{*}}:portfolio:*"):
            pid = key.rsplit(":portfolio:", 1)[1]
            one = await _monitor_one(deps, ctx.workflow_run_id, pid, marks)
            if one is not None:
                seen.append(one)
        return {"portfolios": len(seen), "breaches": [p for p in seen if p.get("breached")]}

    return wf


class MarketSnapshot(BaseModel):
    venue: str
    symbol: str
    bid: str | None = None
    ask: str | None = None
    last: str | None = None
    bids: list[tuple[str, str]] = []
    asks: list[tuple[str, str]] = []
    sequence: str = ""  # the venue's update id: the same snapshot twice gives the same events


def define_market_data(hatchet: Hatchet) -> Any:
    wf = hatchet.workflow(name=MARKET_DATA, input_validator=MarketSnapshot, on_events=[MARKET_SNAPSHOT])

    @wf.task(execution_timeout=dt.timedelta(seconds=10), retries=2)
    async def process(input: MarketSnapshot, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        bid = Decimal(input.bid) if input.bid else None
        ask = Decimal(input.ask) if input.ask else None
        last = Decimal(input.last) if input.last else None
        with money_context():
            mark = (bid + ask) / 2 if bid is not None and ask is not None else last
        if mark is None or mark <= 0:
            return {"skipped": "no price in the snapshot"}
        key = f"market:{input.symbol}"
        origin = derive_event_id(f"{input.venue}|{input.symbol}|{input.sequence or ctx.workflow_run_id}", MARKET_DATA)
        events: list[Event[Any]] = [Event.new(
            PriceUpdated(symbol=input.symbol, venue=input.venue, bid=bid, ask=ask, last=last, mark=mark),
            portfolio_id=key, event_id=origin,
        )]
        if input.bids or input.asks:
            events.append(events[0].derive(OrderbookUpdated(
                symbol=input.symbol, venue=input.venue,
                bids=tuple(PriceLevel(Decimal(p), Decimal(q)) for p, q in input.bids),
                asks=tuple(PriceLevel(Decimal(p), Decimal(q)) for p, q in input.asks),
            ), MARKET_DATA))
        await deps.bus.publish_many(events)
        await deps.redis.hset(deps.stages.keys.marks(), input.symbol, str(mark))
        return {"symbol": input.symbol, "mark": str(mark), "events": len(events)}

    return wf
