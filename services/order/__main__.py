"""``python -m services.order``: the owner of order records.

Consumes risk's decisions and the venue's outcomes as the exclusive group ``order``, keeps
each order's record and status, and emits ``order.created`` for routing.
"""

from __future__ import annotations

from typing import Any

from services.core.bus import Batch, Commit
from services.core.events import Event
from services.core.hotstate import StateKeys
from services.core.runtime import Service, main
from services.order.stage import GROUP, HANDLED, OrderStage


def build(service: Service) -> None:
    stages: list[OrderStage] = []

    async def open_stage(service: Service) -> None:
        assert service.redis is not None and service.bus is not None
        stages.append(OrderStage(service.redis, StateKeys(service.bus.keys)))

    async def handle(items: list[tuple[Event[Any], Commit]]) -> None:
        await stages[0].handle(items)

    service.on_startup(open_stage)
    service.consume(GROUP, dict.fromkeys(HANDLED, Batch(handle)), exclusive=True, precheck=True)


if __name__ == "__main__":
    main("order", build, __doc__ or "")
