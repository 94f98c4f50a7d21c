"""``python -m services.order``: the owner of order records.

Consumes risk's decisions and the venue's outcomes as the exclusive group ``order``, keeps
each order's record and status, and emits ``order.created`` for routing. A finished order's
record expires ``ZVT_ORDER_TERMINAL_RETENTION_S`` after it ended.
"""

from __future__ import annotations

from services.core.hotstate import StateKeys
from services.core.runtime import BatchFn, Service, main
from services.core.settings import load
from services.order.settings import OrderSettings
from services.order.stage import GROUP, HANDLED, OrderStage


def build(service: Service) -> None:
    async def open_stage(service: Service) -> BatchFn:
        assert service.redis is not None and service.bus is not None
        retention_s = load(OrderSettings).terminal_retention_s
        return OrderStage(service.redis, StateKeys(service.bus.keys), terminal_retention_s=retention_s).handle

    service.stage(GROUP, HANDLED, open_stage)


if __name__ == "__main__":
    main("order", build, __doc__ or "")
