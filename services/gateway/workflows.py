"""Starting workflow runs from the API, and answering for them (``GET /v1/workflows/{id}``)."""

from __future__ import annotations

from typing import Any

from services.core.bus import Bus
from services.core.codec import encode
from services.core.events import Event
from services.gateway.deadline import outside_deadline
from services.workflows.client import hatchet_client
from services.workflows.contracts import PLACE_ORDER, REBALANCE, PlaceOrderInput, RebalanceInput
from services.workflows.runs import RETENTION_S, RunStore
from services.trading import Order
from services.workflows.settings import HatchetSettings

__all__ = ["WorkflowDesk"]


class WorkflowDesk:
    def __init__(self, bus: Bus, settings: HatchetSettings) -> None:
        self.bus = bus
        self.runs = RunStore(bus.redis, bus.keys)
        self.enabled = settings.token is not None
        self._place_order: Any = None
        if self.enabled:
            hatchet = hatchet_client(settings)
            # a stub: the worker holds the tasks; this side only starts runs by name and input
            self._place_order = hatchet.workflow(name=PLACE_ORDER, input_validator=PlaceOrderInput)
            self._rebalance: Any = hatchet.workflow(name=REBALANCE, input_validator=RebalanceInput)

    def _order_run_key(self, record: Order) -> str:
        keys = self.bus.keys
        return keys.state(keys.shard_of(record.portfolio_id), "wforder", record.order_id)

    async def run_of_order(self, record: Order) -> str | None:
        run_id: Any = await self.bus.redis.get(self._order_run_key(record))
        return run_id.decode() if isinstance(run_id, bytes) else run_id

    async def start_order(self, record: Order, event: Event[Any], *, faults: dict[str, int] | None = None) -> str:
        """Start ``trading.place_order`` for an accepted durable order; its run id.
        ``faults``: tests only (a worker honours them only with faults enabled)."""
        existing = await self.run_of_order(record)
        if existing:
            return existing
        with outside_deadline():  # the engine's own timeouts apply; a failure answers 503 "send again"
            ref = await self._place_order.aio_run_no_wait(
                PlaceOrderInput(portfolio_id=record.portfolio_id, order_id=record.order_id,
                                event=encode(event).decode(), faults=faults or {}),
                additional_metadata={"order_id": record.order_id, "portfolio_id": record.portfolio_id},
            )
        run_id = str(ref.workflow_run_id)
        await self.runs.queued(run_id, PLACE_ORDER, record.portfolio_id, record.correlation_id)
        await self.bus.redis.set(self._order_run_key(record), run_id, ex=RETENTION_S)
        return run_id

    async def start_rebalance(self, request: RebalanceInput) -> str:
        with outside_deadline():
            ref = await self._rebalance.aio_run_no_wait(
                request, additional_metadata={"portfolio_id": request.portfolio_id}
            )
        run_id = str(ref.workflow_run_id)
        await self.runs.queued(run_id, REBALANCE, request.portfolio_id, run_id)
        return run_id
