"""Portfolios through the admin API: the record (limits, trading state), the balances the
paper venues fund it from, and what a client reads back (positions with unrealized PnL)."""

from __future__ import annotations


from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec

from services.core.bus import Bus, with_trace
from services.core.codec import encode
from services.core.events import Event, EventType, PortfolioUpdated, utcnow
from services.core.hotstate import (
    DEFAULT_LIMITS,
    LimitsRecord,
    PortfolioRecord,
    PositionRecord,
    StateKeys,
    decode_balances,
    dump,
    load,
)
from services.gateway.models import (
    LimitsBody,
    LimitsView,
    PortfolioBody,
    PortfolioView,
    PositionsView,
    PositionView,
    positive_decimal,
)
from services.gateway.problems import Problem
from services.trading import TradingState

__all__ = ["BALANCE_READERS", "Portfolios"]

BALANCE_READERS = ("portfolio", "risk")
"""The stages whose commits depend on the balances they read: an admin write of the balances
moves their state version, so a batch that read the old balances is refused and redone rather
than writing over the new ones (the portfolio stage writes balances it computed from them)."""

_PUT_LUA = """
-- KEYS: portfolio, balances, portfolio.updated stream, then the state versions of the stages
--       that read the balances (one slot)
-- ARGV: expected current record ('' if none), new record, event, replace balances ('1'/'0'),
--       then asset, amount, ...
-- returns 0 created, 1 updated, -1 the record changed meanwhile (retry)
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[2])
  if #ARGV > 4 then redis.call('HSET', KEYS[2], unpack(ARGV, 5)) end
  -- a stage batch that read the old balances cannot commit over the new ones: it is redone
  for i = 4, #KEYS do redis.call('INCR', KEYS[i]) end
end
redis.call('XADD', KEYS[3], '*', 'd', ARGV[3])
if cur then return 1 end
return 0
"""


def _limits(current: LimitsRecord, body: LimitsBody | None) -> LimitsRecord:
    if body is None:
        return current
    changes: dict[str, Any] = {}
    for name in ("max_notional_per_order", "max_position_per_symbol", "price_band"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = positive_decimal(value, f"limits.{name}")
    for name in ("max_orders_per_window", "window_seconds"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    return msgspec.structs.replace(current, **changes)


def _limits_view(limits: LimitsRecord) -> LimitsView:
    return LimitsView(
        max_notional_per_order=limits.max_notional_per_order, max_position_per_symbol=limits.max_position_per_symbol,
        price_band=limits.price_band, max_orders_per_window=limits.max_orders_per_window,
        window_seconds=limits.window_seconds,
    )


class Portfolios:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.redis = bus.redis
        self.state = StateKeys(bus.keys)
        self._put: Callable[..., Awaitable[Any]] = bus.redis.register_script(_PUT_LUA)

    async def record(self, portfolio_id: str) -> PortfolioRecord | None:
        raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
        return load(PortfolioRecord, raw) if raw else None

    async def put(self, portfolio_id: str, body: PortfolioBody) -> tuple[bool, PortfolioView]:
        """Create or update; returns (created, the portfolio now)."""
        balances = {asset: positive_decimal(v, f"balances.{asset}", allow_zero=True) for asset, v in body.balances.items()}
        if body.limits is not None:
            _limits(DEFAULT_LIMITS, body.limits)  # 422 before anything is read or written
        for _ in range(10):
            raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
            current = load(PortfolioRecord, raw) if raw else None
            now = utcnow()
            record = PortfolioRecord(
                portfolio_id=portfolio_id,
                base_currency=body.base_currency,
                limits=_limits(current.limits if current else DEFAULT_LIMITS, body.limits),
                trading_state=current.trading_state if current else TradingState.ACTIVE,
                created_at=current.created_at if current else now,
                updated_at=now,
            )
            outcome = await self._write(portfolio_id, raw or b"", record, balances, replace=True)
            if outcome >= 0:
                return outcome == 0, self._view(record, balances)
        raise Problem(409, "concurrent_update", "the portfolio kept changing; try again")

    async def set_trading_state(self, portfolio_id: str, state: TradingState) -> PortfolioView:
        for _ in range(10):
            raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
            if not raw:
                raise Problem(404, "portfolio_not_found", f"portfolio {portfolio_id} does not exist")
            current = load(PortfolioRecord, raw)
            record = msgspec.structs.replace(current, trading_state=state, updated_at=utcnow())
            balances = decode_balances(await self.redis.hgetall(self.state.balances(portfolio_id)))
            if await self._write(portfolio_id, raw, record, balances, replace=False) >= 0:
                return self._view(record, balances)
        raise Problem(409, "concurrent_update", "the portfolio kept changing; try again")

    async def get(self, portfolio_id: str) -> PortfolioView | None:
        record = await self.record(portfolio_id)
        if record is None:
            return None
        balances = decode_balances(await self.redis.hgetall(self.state.balances(portfolio_id)))
        return self._view(record, balances)

    async def positions(self, portfolio_id: str) -> PositionsView:
        raw: Any = await self.redis.hgetall(self.state.positions(portfolio_id))
        records = sorted((load(PositionRecord, v) for v in raw.values()), key=lambda r: r.symbol)
        marks: list[Any] = (
            await self.redis.hmget(self.state.marks(), [r.symbol for r in records]) if records else []
        )
        out = []
        for record, mark_raw in zip(records, marks, strict=True):
            position = record.to_position()
            mark = Decimal(mark_raw.decode()) if mark_raw else None
            out.append(PositionView(
                symbol=record.symbol, quantity=record.quantity, average_price=position.average_price,
                realized_pnl=record.realized_pnl,
                unrealized_pnl=position.unrealized_pnl(mark) if mark is not None else None,
                mark=mark, updated_at=record.updated_at,
            ))
        return PositionsView(portfolio_id=portfolio_id, positions=out)

    async def _write(
        self, portfolio_id: str, expected: bytes, record: PortfolioRecord, balances: dict[str, Decimal], *, replace: bool
    ) -> int:
        event = Event.new(
            PortfolioUpdated(balances=balances, trading_state=record.trading_state),
            portfolio_id=portfolio_id, metadata={"source": "api"},
        )
        keys = self.bus.keys
        shard = keys.shard_of(portfolio_id)
        pairs = [x for asset, amount in balances.items() for x in (asset, str(amount))] if replace else []
        return int(await self._put(
            keys=[
                self.state.portfolio(portfolio_id), self.state.balances(portfolio_id),
                keys.stream(shard, EventType.PORTFOLIO_UPDATED),
                *(keys.version(shard, group) for group in BALANCE_READERS),
            ],
            args=[expected, dump(record), encode(with_trace(event)), "1" if replace else "0", *pairs],
        ))

    @staticmethod
    def _view(record: PortfolioRecord, balances: dict[str, Decimal]) -> PortfolioView:
        return PortfolioView(
            portfolio_id=record.portfolio_id, base_currency=record.base_currency, balances=balances,
            limits=_limits_view(record.limits), trading_state=record.trading_state,
            created_at=record.created_at, updated_at=record.updated_at,
        )


