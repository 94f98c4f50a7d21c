"""What tasks share in a worker process: Redis, the bus, the stages, the run store, the intake.
Built in the worker's own event loop (Hatchet's lifespan) and reached from a task's context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from hatchet_sdk import Context, Hatchet

from services.core.bus import Bus
from services.core.redisconn import open_redis
from services.core.settings import BusSettings, CoreSettings, load
from services.intake import IntakeSettings, OrderDesk
from services.routing.market import MarketFeed
from services.routing.settings import RoutingSettings
from services.routing.venues import build_venues
from services.venues.ccxt import close_shared_clients
from services.workflows.bridge import bridge_consumer
from services.workflows.runs import RunStore
from services.workflows.settings import WorkflowSettings
from services.workflows.stages import Stages

__all__ = ["Deps", "InjectedFault", "deps_of", "failure_of", "inject_fault", "make_lifespan", "order_desk"]


class InjectedFault(RuntimeError):
    """A task failing on purpose (``faults`` in a workflow's input, tests only)."""


@dataclass
class Deps:
    core: CoreSettings
    settings: WorkflowSettings
    redis: Any
    bus: Bus
    stages: Stages
    runs: RunStore
    intake: OrderDesk


def deps_of(ctx: Context) -> Deps:
    deps = ctx.lifespan
    assert isinstance(deps, Deps), "the worker was started without its lifespan"
    return deps


def inject_fault(deps: Deps, faults: Mapping[str, int], task: str, ctx: Context) -> None:
    if deps.settings.faults_enabled and ctx.retry_count < faults.get(task, 0):
        raise InjectedFault(f"{task}: injected fault, attempt {ctx.retry_count + 1}")


def failure_of(ctx: Context) -> tuple[str | None, str]:
    """For an on-failure task: the task that failed first, and every task's error, joined."""
    errors = ctx.task_run_errors
    step = next(iter(errors), None)
    return step, "; ".join(f"{k}: {v}" for k, v in errors.items())[:2000] or "the run failed"


def order_desk(bus: Bus) -> OrderDesk:
    """The worker's intake (a rebalance's child orders): ``IntakeSettings`` from the same
    environment as the gateway's, so both keep a portfolio's order index and its client order
    ids alike. No event store: an order that has left Redis is not looked for."""
    return OrderDesk(bus, load(IntakeSettings))


def make_lifespan(core: CoreSettings, bus_settings: BusSettings, settings: WorkflowSettings, hatchet: Hatchet) -> Any:
    async def lifespan() -> AsyncIterator[Deps]:
        redis = await open_redis(core)
        bus = Bus(redis, bus_settings)
        routing = load(RoutingSettings)
        venues = build_venues(routing, redis, bus.keys)
        stages = Stages(bus, venues)
        await stages.start()
        # The instrument catalogue and the marks that risk and the paper venue need, where
        # routing has not put them yet. No feed runs here: routing's moves the marks.
        await MarketFeed(bus, venues, owner="workflows").open(publish=False)
        bridge = bridge_consumer(bus, hatchet)
        await bridge.start()
        try:
            yield Deps(core, settings, redis, bus, stages, RunStore(redis, bus.keys), order_desk(bus))
        finally:
            bridge.stop()
            await bridge.wait(5)
            await close_shared_clients()
            await redis.aclose()

    return lifespan


