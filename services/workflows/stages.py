"""The stream stages, driven one event at a time by workflow tasks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from services.core.bus import Bus, Commit, VersionedRead, current_state_read
from services.core.events import Event
from services.core.catalogue import Instruments
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.replication import ReplicaWait
from services.order.settings import OrderSettings
from services.order.stage import OrderStage
from services.portfolio.stage import PortfolioStage
from services.core.settings import load
from services.risk.settings import RiskSettings
from services.risk.stage import RiskStage
from services.routing.stage import RoutingStage
from services.venues.base import Venue

__all__ = ["StateKeptMoving", "Stages"]

Handle = Callable[[list[tuple[Event[Any], Commit]]], Awaitable[None]]
_ATTEMPTS = 50


class StateKeptMoving(RuntimeError):
    """The stage's state changed under every attempt to commit (the task is retried)."""


class Stages:
    def __init__(self, bus: Bus, venues: Sequence[Venue]) -> None:
        redis = bus.redis
        sk = StateKeys(bus.keys)
        marks = Marks(redis, bus.keys)
        self.bus = bus
        self.keys = sk
        self.instruments = Instruments(redis, bus.keys)
        self.risk = RiskStage(
            redis, sk, marks, self.instruments, market_slippage=load(RiskSettings).market_slippage
        )
        orders = load(OrderSettings)
        self.order = OrderStage(redis, sk, terminal_retention_s=orders.terminal_retention_s)
        self.portfolio = PortfolioStage(redis, sk, fill_memory_s=orders.fill_memory_s)
        self.venues = list(venues)
        self.routing = RoutingStage(
            redis, sk, marks, self.venues, replica_wait=ReplicaWait.of(bus.settings), follows=False, bus=bus
        )

    async def start(self) -> None:
        await self.routing.start()

    async def run(self, group: str, handle: Handle, event: Event[Any]) -> list[Event[Any]]:
        """Handle ``event`` as stage ``group`` would and commit it; the events it emitted.

        Idempotent: run again for the same event, it writes nothing and returns the events of
        the first commit. A stage's permanent refusal (``PermanentError``) propagates.

        The stages load their state through ``StateReader`` before they decide: the version of
        the state that ``apply`` checks comes with that first read (``VersionedRead``), not in
        a round trip of its own."""
        bus = self.bus
        shard = bus.keys.shard_of(event.portfolio_id)
        for _ in range(_ATTEMPTS):
            commit = Commit(bus.keys, shard)
            reading = VersionedRead(bus, group, shard)
            token = current_state_read.set(reading)
            try:
                await handle([(event, commit)])
            finally:
                current_state_read.reset(token)
            if commit.error is not None:
                raise commit.error
            # a handler that decided without reading any state depends on none: the version
            # as it is now serves (none of today's stages does that)
            version = reading.version if reading.done else await bus.state_version(group, shard)
            emitted = await bus.apply(group, event, commit, version)
            if emitted is not None:
                return emitted
        raise StateKeptMoving(f"{group}: the state of shard {shard} moved under {_ATTEMPTS} attempts")
