"""The portfolio record's writes: creating or updating a portfolio (its record and, on
request, its balances) and setting its trading state, each one compare-and-set script in the
portfolio's slot that also emits ``portfolio.updated``.

Here rather than in the gateway because the gateway (the admin API: ``PUT /v1/portfolios/…``
and ``…/trading-state``) and the workflows (``risk.monitor`` tightening a portfolio's state)
both write the record, and the workflows import nothing of the gateway. The errors are domain
errors (``PortfolioNotFound``, ``ConcurrentUpdate``); the gateway answers them as problem
documents (``services.gateway.problems.problem_of``) and keeps the views (HTTP models)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec

from services.core.bus import Bus, with_trace
from services.core.codec import encode
from services.core.events import Event, EventType, PortfolioUpdated, utcnow
from services.core.hotstate import PortfolioRecord, StateKeys, decode_balances, dump, load
from services.intake.errors import ConcurrentUpdate, PortfolioNotFound
from services.trading import TradingState

__all__ = ["BALANCE_READERS", "PortfolioBook"]

BALANCE_READERS = ("portfolio", "risk")
"""The stages whose commits depend on the balances they read: an admin write of the balances
moves their state version, so a batch that read the old balances is refused and redone rather
than writing over the new ones (the portfolio stage writes balances it computed from them)."""

_ATTEMPTS = 10

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


class PortfolioBook:
    """Writes portfolio records (and their balances) with ``portfolio.updated``, retrying a
    compare-and-set that lost to a concurrent write a few times before ``ConcurrentUpdate``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.redis = bus.redis
        self.state = StateKeys(bus.keys)
        self._put: Callable[..., Awaitable[Any]] = bus.redis.register_script(_PUT_LUA)

    async def put(
        self,
        portfolio_id: str,
        record_of: Callable[[PortfolioRecord | None], PortfolioRecord],
        balances: dict[str, Decimal],
    ) -> tuple[bool, PortfolioRecord]:
        """Create or update the record (``record_of`` the current one, ``None`` if none) and
        replace the balances; returns (created, the record written). Raises
        ``ConcurrentUpdate`` when the record kept changing."""
        for _ in range(_ATTEMPTS):
            raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
            record = record_of(load(PortfolioRecord, raw) if raw else None)
            outcome = await self._write(portfolio_id, raw or b"", record, balances, replace=True)
            if outcome >= 0:
                return outcome == 0, record
        raise ConcurrentUpdate(portfolio_id)

    async def set_trading_state(
        self, portfolio_id: str, state: TradingState
    ) -> tuple[PortfolioRecord, dict[str, Decimal]]:
        """Set the trading state; returns the record written and the balances. Raises
        ``PortfolioNotFound`` (``for_order=False``) and ``ConcurrentUpdate``."""
        for _ in range(_ATTEMPTS):
            raw: Any = await self.redis.get(self.state.portfolio(portfolio_id))
            if not raw:
                raise PortfolioNotFound(portfolio_id, for_order=False)
            current = load(PortfolioRecord, raw)
            record = msgspec.structs.replace(current, trading_state=state, updated_at=utcnow())
            balances = decode_balances(await self.redis.hgetall(self.state.balances(portfolio_id)))
            if await self._write(portfolio_id, raw, record, balances, replace=False) >= 0:
                return record, balances
        raise ConcurrentUpdate(portfolio_id)

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
