"""``python -m services.risk``: pre-trade risk checks.

Consumes ``order.requested``, ``position.updated`` (fills the portfolio applied) and the events
that end an order, as the exclusive group ``risk``; emits ``order.validated`` or
``order.rejected`` with a reason code. The instruments come from routing's catalogue
(``services.core.catalogue``); until there is one, requests wait.
"""

from __future__ import annotations

from services.core.catalogue import Instruments
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.runtime import BatchFn, Service, main
from services.core.settings import load
from services.risk.settings import RiskSettings
from services.risk.stage import GROUP, HANDLED, RiskStage


def build(service: Service) -> None:
    settings = load(RiskSettings)

    async def open_stage(service: Service) -> BatchFn:
        assert service.redis is not None and service.bus is not None
        keys = service.bus.keys
        stage = RiskStage(
            service.redis, StateKeys(keys), Marks(service.redis, keys), Instruments(service.redis, keys),
            market_slippage=settings.market_slippage,
        )
        return stage.handle

    service.stage(GROUP, HANDLED, open_stage)


if __name__ == "__main__":
    main("risk", build, __doc__ or "")
