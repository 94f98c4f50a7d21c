"""``trading.place_order``: the seed's five steps, run in order inside one Hatchet task.

``validate_request → check_risk_limits → create_order_record → execute_order → update_portfolio``

The gateway writes the order's record and its ``order.requested`` (route ``workflow``) in one
script, as on the fast path, and starts the run; stream stages skip workflow events, so only
this run acts on the order. Each step hands the events of the step before to a stage
(``Stages.run``), whose commit is idempotent: a task retried after a crash or an error runs
its steps again from the first, and every step already committed writes nothing and hands
back the events of its first commit, so the run resumes after its last committed step.

One task instead of one task per step: each engine hop costs tens of milliseconds (queue
messages and transactions in the engine), more than the five step bodies together, and the
durability comes from the stages' commits, not from the hop. No concurrency key either: the
state version in ``Bus.apply`` already keeps two runs of one portfolio from overwriting each
other, and a key sends every run through the engine's polled concurrency path.

Each step's start, end, duration and the events it emitted are written to the run's record
(``GET /v1/workflows/{run_id}``, field ``steps``) as it goes, and are in the run's result and
in ``workflow.completed``. The on-failure task fails an order that never reached a venue
(``order.failed``), which releases what risk had reserved, and emits ``workflow.failed``
naming the step that failed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from hatchet_sdk import Context, Hatchet
from hatchet_sdk.exceptions import NonRetryableException

from services.core.bus import PermanentError
from services.core.codec import decode_any
from services.core.events import (
    Event,
    EventType,
    OrderFailed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    utcnow,
)
from services.core.hotstate import load
from services.core.telemetry import get_logger
from services.trading.orders import Order, OrderStatus
from services.workflows.contracts import PLACE_ORDER, PlaceOrderInput
from services.workflows.deps import Deps, deps_of, failure_of, inject_fault
from services.workflows.runs import RunStatus, StepRecord

__all__ = ["STEPS", "define_place_order"]

log = get_logger("zvt.workflows.place_order")
STAGE = "workflow"
FAILURE_STAGE = "workflow-failure"
STEPS = ("validate_request", "check_risk_limits", "create_order_record", "execute_order", "update_portfolio")
_ROUTING_OUTPUTS = (EventType.EXCHANGE_ROUTED, EventType.ORDER_EXECUTED, EventType.ORDER_CANCELED, EventType.ORDER_FAILED)
_RELEASES = (EventType.ORDER_CANCELED, EventType.ORDER_FAILED)

Step = Callable[[list[Event[Any]]], Awaitable[list[Event[Any]]]]
_PENDING: set[asyncio.Task[None]] = set()


async def _record(deps: Deps, event: Event[Any]) -> Order | None:
    raw: Any = await deps.redis.get(deps.stages.keys.order(event.portfolio_id, event.payload.order_id))
    return load(Order, raw) if raw else None


def _summary(record: Order) -> dict[str, Any]:
    return {
        "order_id": record.order_id,
        "client_order_id": record.client_order_id,
        "status": str(record.status),
        "filled_quantity": str(sum((f.quantity for f in record.fills), start=record.quantity * 0)),
        "fills": len(record.fills),
        "reject_code": record.reject_code,
    }


async def _stage(run: Awaitable[list[Event[Any]]]) -> list[Event[Any]]:
    """A stage's permanent refusal is not worth retrying."""
    try:
        return await run
    except PermanentError as exc:
        raise NonRetryableException(str(exc)) from exc


class _Steps:
    """Runs the steps of one attempt in order, recording each one's start and end on the run.

    The records are written behind the steps, one write at a time and in order, so a step
    never waits for its own bookkeeping; ``flush`` waits for them before the run's end is
    written. They are progress for people: a write that fails is logged, not retried."""

    def __init__(self, deps: Deps, ctx: Context, input: PlaceOrderInput, requested: Event[Any]) -> None:
        self.deps = deps
        self.ctx = ctx
        self.input = input
        self.requested = requested
        self.records: list[StepRecord] = []
        self._writes: asyncio.Task[None] | None = None

    async def run(self, name: str, body: Step, events: list[Event[Any]]) -> list[Event[Any]]:
        started_at, started = utcnow(), time.perf_counter()
        previous = self.records[-1] if self.records else None
        runs, run_id = self.deps.runs, self.ctx.workflow_run_id
        if previous is None:
            self._write(runs.running(run_id, PLACE_ORDER, self.requested.portfolio_id, self.requested.correlation_id,
                                     step=name, at=started_at))
        else:  # one write: the step before ended, this one started
            self._write(runs.step(run_id, ended=previous, started=name, at=started_at))
        inject_fault(self.deps, self.input.faults, name, self.ctx)
        try:
            emitted = await body(events)
        except NonRetryableException as exc:
            raise NonRetryableException(f"{name}: {exc}") from exc
        except Exception as exc:
            raise StepFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
        self.records.append(StepRecord(
            name=name, started_at=started_at, ended_at=utcnow(),
            ms=round((time.perf_counter() - started) * 1000, 3), events=[str(e.event_type) for e in emitted],
        ))
        return emitted

    def _write(self, write: Coroutine[Any, Any, None]) -> None:
        before = self._writes

        async def in_order() -> None:
            if before is not None:
                await before
            try:
                await write
            except Exception as exc:
                log.warning("a step's progress was not recorded", run_id=self.ctx.workflow_run_id, error=repr(exc))

        self._writes = task = asyncio.create_task(in_order())
        _PENDING.add(task)  # held until done, even after a failed attempt has let go of this object
        task.add_done_callback(_PENDING.discard)

    async def flush(self) -> None:
        if self._writes is not None:
            await self._writes


class StepFailed(RuntimeError):
    """A step's error, with the step's name in front (the task is retried)."""


def define_place_order(hatchet: Hatchet) -> Any:
    wf = hatchet.workflow(name=PLACE_ORDER, input_validator=PlaceOrderInput)

    @wf.task(execution_timeout=dt.timedelta(seconds=45), schedule_timeout=dt.timedelta(seconds=30), retries=3,
             backoff_factor=2.0, backoff_max_seconds=5)
    async def place_order(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        stages = deps.stages
        try:
            event = decode_any(input.event.encode())
        except Exception as exc:
            raise NonRetryableException(f"validate_request: input event does not decode: {exc}") from exc
        steps = _Steps(deps, ctx, input, event)

        async def validate_request(_: list[Event[Any]]) -> list[Event[Any]]:
            if event.event_type is not EventType.ORDER_REQUESTED or event.payload.order_id != input.order_id:
                raise NonRetryableException(f"input is not the order.requested of order {input.order_id}")
            if event.portfolio_id != input.portfolio_id:
                raise NonRetryableException("input portfolio_id differs from the event's")
            if await _record(deps, event) is None:
                raise NonRetryableException(f"order {input.order_id} has no record (the gateway writes it first)")
            await deps.bus.publish(event.derive(
                WorkflowStarted(workflow=PLACE_ORDER, run_id=ctx.workflow_run_id, input={"order_id": input.order_id}),
                STAGE,
            ))
            return [event]

        async def check_risk_limits(events: list[Event[Any]]) -> list[Event[Any]]:
            (requested,) = events
            return await _stage(stages.run("risk", stages.risk.handle, requested))

        async def handled(group: str, handle: Any, types: tuple[EventType, ...], events: list[Event[Any]]
                          ) -> list[Event[Any]]:
            """What stage ``group`` emits for each of ``events`` of ``types``, in order."""
            emitted: list[Event[Any]] = []
            for event in events:
                if event.event_type in types:
                    emitted += await _stage(stages.run(group, handle, event))
            return emitted

        async def create_order_record(events: list[Event[Any]]) -> list[Event[Any]]:
            return await handled("order", stages.order.handle, (EventType.ORDER_VALIDATED, EventType.ORDER_REJECTED),
                                 events)

        async def execute_order(events: list[Event[Any]]) -> list[Event[Any]]:
            # never blindly twice: a retry after the routing commit gets the first outcome back
            return await handled("routing", stages.routing.handle, (EventType.ORDER_CREATED,), events)

        async def update_portfolio(events: list[Event[Any]]) -> list[Event[Any]]:
            emitted: list[Event[Any]] = []
            for event in events:
                if event.event_type is EventType.ORDER_EXECUTED:
                    # the order's record and the portfolio are apart (two groups, two state
                    # versions), as on the fast path: both at once
                    recorded, applied = await asyncio.gather(
                        _stage(stages.run("order", stages.order.handle, event)),
                        _stage(stages.run("portfolio", stages.portfolio.handle, event)),
                    )
                    emitted += recorded + applied
                    # risk lets go of a fill's funds once the portfolio has debited them
                    for update in applied:
                        if update.event_type is EventType.POSITION_UPDATED:
                            emitted += await _stage(stages.run("risk", stages.risk.handle, update))
                elif event.event_type in _ROUTING_OUTPUTS:
                    emitted += await _stage(stages.run("order", stages.order.handle, event))
                if event.event_type in _RELEASES:
                    emitted += await _stage(stages.run("risk", stages.risk.handle, event))
            return emitted

        (requested,) = events = await steps.run("validate_request", validate_request, [])
        for name, body in (("check_risk_limits", check_risk_limits), ("create_order_record", create_order_record),
                           ("execute_order", execute_order), ("update_portfolio", update_portfolio)):
            events = await steps.run(name, body, events)
        record = await _record(deps, requested)
        if record is None:  # retention is hours; a run never outlives it
            raise NonRetryableException(f"order {input.order_id} has no record after its run")
        result = _summary(record)
        result["task_ms"] = {s.name: s.ms for s in steps.records}
        result["steps"] = [s.public() for s in steps.records]
        await steps.flush()
        await deps.runs.completed(ctx.workflow_run_id, result, last=steps.records[-1])
        await deps.bus.publish(requested.derive(
            WorkflowCompleted(workflow=PLACE_ORDER, run_id=ctx.workflow_run_id, result=result), STAGE, index=1,
        ))
        return result

    @wf.on_failure_task(execution_timeout=dt.timedelta(seconds=15), retries=3)
    async def on_failure(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        _, error = failure_of(ctx)
        run = await deps.runs.get(ctx.workflow_run_id)
        step = run.step if run is not None and run.step in STEPS else None
        requested = decode_any(input.event.encode())
        record = await _record(deps, requested)
        released = False
        if record is not None and not record.is_terminal and record.status in (
            OrderStatus.REQUESTED, OrderStatus.VALIDATED, OrderStatus.CREATED
        ):
            # Never reached a venue: the order fails, and risk lets go of its reservation.
            failed = requested.derive(
                OrderFailed(
                    order_id=requested.payload.order_id, client_order_id=requested.payload.client_order_id,
                    reason_code="WORKFLOW_FAILED", reason=f"trading.place_order failed at {step}: {error}"[:500],
                ),
                FAILURE_STAGE,
            )
            await deps.stages.run("order", deps.stages.order.handle, failed)
            await deps.stages.run("risk", deps.stages.risk.handle, failed)
            released = True
        await deps.runs.failed(ctx.workflow_run_id, error, step)
        await deps.bus.publish(requested.derive(
            WorkflowFailed(workflow=PLACE_ORDER, run_id=ctx.workflow_run_id, error=error, step=step), STAGE, index=2,
        ))
        log.warning("trading.place_order failed", run_id=ctx.workflow_run_id, step=step, error=error,
                    correlation_id=requested.correlation_id, order_failed=released)
        return {"status": RunStatus.FAILED, "step": step, "order_failed": released}

    return wf
