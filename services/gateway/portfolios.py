"""Portfolios through the admin API: the record (limits, trading state), the balances the
paper venues fund it from, and what a client reads back (positions with unrealized PnL).

The writes are the intake's (``services.intake.portfolios.PortfolioBook``, which the
workflows share); this module builds the record from the request, answers the book's domain
errors as problems (``problem_of``) and returns the views."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from services.core.bus import Bus
from services.core.events import utcnow
from services.core.hotstate import (
    DEFAULT_LIMITS,
    LimitsRecord,
    PortfolioRecord,
    PositionRecord,
    StateKeys,
    decode_balances,
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
from services.gateway.problems import problem_of
from services.intake import IntakeError
from services.intake.portfolios import BALANCE_READERS, PortfolioBook
from services.trading import TradingState

__all__ = ["BALANCE_READERS", "Portfolios"]


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
        self.book = PortfolioBook(bus)

    async def record(self, portfolio_id: str) -> PortfolioRecord | None:
        raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
        return load(PortfolioRecord, raw) if raw else None

    async def put(self, portfolio_id: str, body: PortfolioBody) -> tuple[bool, PortfolioView]:
        """Create or update; returns (created, the portfolio now)."""
        balances = {asset: positive_decimal(v, f"balances.{asset}", allow_zero=True) for asset, v in body.balances.items()}
        if body.limits is not None:
            _limits(DEFAULT_LIMITS, body.limits)  # 422 before anything is read or written

        def record_of(current: PortfolioRecord | None) -> PortfolioRecord:
            now = utcnow()
            return PortfolioRecord(
                portfolio_id=portfolio_id,
                base_currency=body.base_currency,
                limits=_limits(current.limits if current else DEFAULT_LIMITS, body.limits),
                trading_state=current.trading_state if current else TradingState.ACTIVE,
                created_at=current.created_at if current else now,
                updated_at=now,
            )

        try:
            created, record = await self.book.put(portfolio_id, record_of, balances)
        except IntakeError as exc:
            raise problem_of(exc) from None
        return created, self._view(record, balances)

    async def set_trading_state(self, portfolio_id: str, state: TradingState) -> PortfolioView:
        try:
            record, balances = await self.book.set_trading_state(portfolio_id, state)
        except IntakeError as exc:
            raise problem_of(exc) from None
        return self._view(record, balances)

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

    @staticmethod
    def _view(record: PortfolioRecord, balances: dict[str, Decimal]) -> PortfolioView:
        return PortfolioView(
            portfolio_id=record.portfolio_id, base_currency=record.base_currency, balances=balances,
            limits=_limits_view(record.limits), trading_state=record.trading_state,
            created_at=record.created_at, updated_at=record.updated_at,
        )


