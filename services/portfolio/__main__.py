"""``python -m services.portfolio``: positions and balances from fills.

Consumes ``order.executed`` as the exclusive group ``portfolio``; emits ``position.updated``
and ``portfolio.updated``.
"""

from __future__ import annotations

from typing import Any

from services.core.bus import Batch, Commit
from services.core.events import Event
from services.core.hotstate import StateKeys
from services.core.runtime import Service, main
from services.portfolio.stage import GROUP, HANDLED, PortfolioStage


def build(service: Service) -> None:
    stages: list[PortfolioStage] = []

    async def open_stage(service: Service) -> None:
        assert service.redis is not None and service.bus is not None
        stages.append(PortfolioStage(service.redis, StateKeys(service.bus.keys)))

    async def handle(items: list[tuple[Event[Any], Commit]]) -> None:
        await stages[0].handle(items)

    service.on_startup(open_stage)
    service.consume(GROUP, dict.fromkeys(HANDLED, Batch(handle)), exclusive=True, precheck=True)


if __name__ == "__main__":
    main("portfolio", build, __doc__ or "")
