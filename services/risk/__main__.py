"""``python -m services.risk``: pre-trade risk checks.

Consumes ``order.requested`` and the events that finish an order, as the exclusive group
``risk``; emits ``order.validated`` or ``order.rejected`` with a reason code.
"""

from __future__ import annotations

from typing import Any

from services.core.bus import Batch, Commit
from services.core.events import Event
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.runtime import Service, main
from services.risk.stage import GROUP, HANDLED, RiskStage


def build(service: Service) -> None:
    stages: list[RiskStage] = []

    async def open_stage(service: Service) -> None:
        assert service.redis is not None and service.bus is not None
        marks = Marks(service.redis, service.bus.keys)
        stages.append(RiskStage(service.redis, StateKeys(service.bus.keys), marks))

    async def handle(items: list[tuple[Event[Any], Commit]]) -> None:
        await stages[0].handle(items)

    service.on_startup(open_stage)
    service.consume(GROUP, dict.fromkeys(HANDLED, Batch(handle)), exclusive=True, precheck=True)


if __name__ == "__main__":
    main("risk", build, __doc__ or "")
