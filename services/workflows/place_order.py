"""``trading.place_order``: the seed's five steps as Hatchet tasks, each calling a stream stage.

``validate_request → check_risk_limits → create_order_record → execute_order → update_portfolio``

The gateway writes the order's record and its ``order.requested`` (route ``workflow``) in one
script, as on the fast path, and starts the run; stream stages skip workflow events, so only
this run acts on the order. Each task hands the events of the step before to a stage
(``Stages.run``), whose commit is idempotent: a task retried after its commit, or a run
started twice, changes nothing twice. The on-failure task fails an order that never reached
a venue (``order.failed``), which releases what risk had reserved, and emits
``workflow.failed``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from hatchet_sdk import ConcurrencyExpression, ConcurrencyLimitStrategy, Context, Hatchet
from hatchet_sdk.exceptions import NonRetryableException

from services.core.bus import PermanentError
from services.core.codec import decode_any, encode
from services.core.events import (
    Event,
    EventType,
    OrderFailed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from services.core.hotstate import OrderRecord, load
from services.core.telemetry import get_logger
from services.trading.orders import OrderStatus
from services.workflows.contracts import PLACE_ORDER, PlaceOrderInput
from services.workflows.deps import Deps, deps_of, failure_of, inject_fault
from services.workflows.runs import RunStatus

__all__ = ["define_place_order"]

log = get_logger("zvt.workflows.place_order")
STAGE = "workflow"
FAILURE_STAGE = "workflow-failure"
_ROUTING_OUTPUTS = (EventType.EXCHANGE_ROUTED, EventType.ORDER_EXECUTED, EventType.ORDER_CANCELED, EventType.ORDER_FAILED)
_RELEASES = (EventType.ORDER_CANCELED, EventType.ORDER_FAILED)


def _events(output: Any) -> list[Event[Any]]:
    return [decode_any(e.encode()) for e in output["events"]]


def _out(events: list[Event[Any]], started: float) -> dict[str, Any]:
    """A task's output: the events it emitted, and how long its body took (benchmarks split a
    run's latency into task bodies and the engine's dispatch between them)."""
    return {"events": [encode(e).decode() for e in events], "ms": round((time.perf_counter() - started) * 1000, 3)}


async def _record(deps: Deps, event: Event[Any]) -> OrderRecord | None:
    raw: Any = await deps.redis.get(deps.stages.keys.order(event.portfolio_id, event.payload.order_id))
    return load(OrderRecord, raw) if raw else None


def _summary(record: OrderRecord) -> dict[str, Any]:
    return {
        "order_id": record.order_id,
        "client_order_id": record.client_order_id,
        "status": str(record.status),
        "filled_quantity": str(sum((f.quantity for f in record.fills), start=record.quantity * 0)),
        "fills": len(record.fills),
        "reject_code": record.reject_code,
    }


def define_place_order(hatchet: Hatchet, portfolio_concurrency: int) -> Any:
    wf = hatchet.workflow(
        name=PLACE_ORDER,
        input_validator=PlaceOrderInput,
        concurrency=ConcurrencyExpression(
            expression="input.portfolio_id",
            max_runs=portfolio_concurrency,
            limit_strategy=ConcurrencyLimitStrategy.GROUP_ROUND_ROBIN,
        ),
    )

    @wf.task(execution_timeout=dt.timedelta(seconds=5), schedule_timeout=dt.timedelta(seconds=30))
    async def validate_request(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        started = time.perf_counter()
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "validate_request", ctx)
        event = decode_any(input.event.encode())
        if event.event_type is not EventType.ORDER_REQUESTED or event.payload.order_id != input.order_id:
            raise NonRetryableException(f"input is not the order.requested of order {input.order_id}")
        if event.portfolio_id != input.portfolio_id:
            raise NonRetryableException("input portfolio_id differs from the event's")
        record = await _record(deps, event)
        if record is None:
            raise NonRetryableException(f"order {input.order_id} has no record (the gateway writes it first)")
        await deps.runs.running(ctx.workflow_run_id, PLACE_ORDER, event.portfolio_id, event.correlation_id)
        await deps.bus.publish(event.derive(
            WorkflowStarted(workflow=PLACE_ORDER, run_id=ctx.workflow_run_id, input={"order_id": input.order_id}),
            STAGE,
        ))
        return _out([event], started)

    @wf.task(parents=[validate_request], execution_timeout=dt.timedelta(seconds=10), retries=3,
             backoff_factor=2.0, backoff_max_seconds=5)
    async def check_risk_limits(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        started = time.perf_counter()
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "check_risk_limits", ctx)
        (requested,) = _events(ctx.task_output(validate_request))
        return _out(await _stage(deps.stages.run("risk", deps.stages.risk.handle, requested)), started)

    @wf.task(parents=[check_risk_limits], execution_timeout=dt.timedelta(seconds=5), retries=3)
    async def create_order_record(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        started = time.perf_counter()
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "create_order_record", ctx)
        emitted: list[Event[Any]] = []
        for event in _events(ctx.task_output(check_risk_limits)):
            if event.event_type in (EventType.ORDER_VALIDATED, EventType.ORDER_REJECTED):
                emitted += await _stage(deps.stages.run("order", deps.stages.order.handle, event))
        return _out(emitted, started)

    @wf.task(parents=[create_order_record], execution_timeout=dt.timedelta(seconds=15), retries=3,
             backoff_factor=2.0, backoff_max_seconds=5)
    async def execute_order(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        started = time.perf_counter()
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "execute_order", ctx)
        emitted: list[Event[Any]] = []
        for event in _events(ctx.task_output(create_order_record)):
            if event.event_type is EventType.ORDER_CREATED:
                # never blindly twice: a retry after the commit gets the first outcome back
                emitted += await _stage(deps.stages.run("routing", deps.stages.routing.handle, event))
        return _out(emitted, started)

    @wf.task(parents=[execute_order], execution_timeout=dt.timedelta(seconds=10), retries=3)
    async def update_portfolio(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        started = time.perf_counter()
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "update_portfolio", ctx)
        stages = deps.stages
        emitted: list[Event[Any]] = []
        for event in _events(ctx.task_output(execute_order)):
            if event.event_type in _ROUTING_OUTPUTS:
                emitted += await _stage(stages.run("order", stages.order.handle, event))
            if event.event_type is EventType.ORDER_EXECUTED:
                applied = await _stage(stages.run("portfolio", stages.portfolio.handle, event))
                emitted += applied
                # risk lets go of a fill's funds once the portfolio has debited them
                for update in applied:
                    if update.event_type is EventType.POSITION_UPDATED:
                        emitted += await _stage(stages.run("risk", stages.risk.handle, update))
            if event.event_type in _RELEASES:
                emitted += await _stage(stages.run("risk", stages.risk.handle, event))
        (requested,) = _events(ctx.task_output(validate_request))
        record = await _record(deps, requested)
        assert record is not None
        result = _summary(record)
        earlier = {"validate_request": validate_request, "check_risk_limits": check_risk_limits,
                   "create_order_record": create_order_record, "execute_order": execute_order}
        task_ms = {name: ctx.task_output(task)["ms"] for name, task in earlier.items()}
        task_ms["update_portfolio"] = round((time.perf_counter() - started) * 1000, 3)
        result["task_ms"] = task_ms
        await deps.runs.completed(ctx.workflow_run_id, result)
        await deps.bus.publish(requested.derive(
            WorkflowCompleted(workflow=PLACE_ORDER, run_id=ctx.workflow_run_id, result=result), STAGE, index=1,
        ))
        return result

    @wf.on_failure_task(execution_timeout=dt.timedelta(seconds=15), retries=3)
    async def on_failure(input: PlaceOrderInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        step, error = failure_of(ctx)
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


async def _stage(run: Any) -> list[Event[Any]]:
    """A stage's permanent refusal is not worth retrying."""
    try:
        result: list[Event[Any]] = await run
    except PermanentError as exc:
        raise NonRetryableException(str(exc)) from exc
    return result
