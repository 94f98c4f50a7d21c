"""``python -m services.portfolio``: positions and balances from fills.

Consumes ``order.executed`` as the exclusive group ``portfolio``; emits ``position.updated``
and ``portfolio.updated``.
"""

from __future__ import annotations

from services.core.hotstate import StateKeys
from services.core.runtime import BatchFn, Service, main
from services.core.settings import load
from services.order.settings import OrderSettings
from services.portfolio.stage import GROUP, HANDLED, PortfolioStage


def build(service: Service) -> None:
    async def open_stage(service: Service) -> BatchFn:
        assert service.redis is not None and service.bus is not None
        fill_memory_s = load(OrderSettings).fill_memory_s
        return PortfolioStage(service.redis, StateKeys(service.bus.keys), fill_memory_s=fill_memory_s).handle

    service.stage(GROUP, HANDLED, open_stage)


if __name__ == "__main__":
    main("portfolio", build, __doc__ or "")
