"""``portfolio.rebalance``: from target weights and current marks, child orders through the
fast path, a durable wait for their terminal events, and compensation on failure.

``plan → submit_children → await_children (durable) → finish``; on failure: cancel the
children still open, and with ``all_or_nothing`` unwind the filled legs with opposite market
orders; then ``workflow.failed``. On success ``portfolio.rebalanced``.

Children are ordinary orders (route ``stream``) with client order ids derived from the run,
so a retried ``submit_children`` finds the orders it placed instead of placing them twice.
They are accepted through the intake the gateway uses (``deps.intake``, the same
``IntakeSettings``: the portfolio's order index and idempotency window are the gateway's).
The wait wakes on the bridge's ``zvt:order.terminal`` Hatchet events (``bridge.py``), and
also every second to look at the records, so an event that came before the wait began is not
missed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

from hatchet_sdk import Context, DurableContext, Hatchet
from hatchet_sdk.conditions import SleepCondition, UserEventCondition, or_
from hatchet_sdk.exceptions import NonRetryableException

from services.core.events import (
    Event,
    PortfolioRebalanced,
    WorkflowFailed,
    WorkflowStarted,
    derive_event_id,
)
from services.core.hotstate import PositionRecord, StateReader, decode_balances, load, pairs
from services.core.marks import Marks
from services.core.telemetry import get_logger
from services.intake import ClientOrderIdConflict, InvalidOrder, OrderBody, PortfolioNotFound, validate
from services.trading import OrderType, Side, TimeInForce
from services.trading.money import ZERO, money_context
from services.trading.orders import Order, OrderStatus
from services.workflows.bridge import ORDER_TERMINAL
from services.workflows.contracts import CHILD_ORDER_PREFIX, REBALANCE, RebalanceInput
from services.workflows.deps import Deps, deps_of, failure_of, inject_fault

__all__ = ["ORDER_TERMINAL", "Leg", "define_rebalance", "plan_legs"]

log = get_logger("zvt.workflows.rebalance")
_WAIT_ROUNDS = 120  # one-second wakes at most, on top of the events
_FAILED = (OrderStatus.REJECTED, OrderStatus.FAILED)


class CatalogueMissing(RuntimeError):
    """No instrument catalogue in Redis yet: retried, as routing or the worker publishes one."""


@dataclass(frozen=True)
class Leg:
    symbol: str
    side: Side
    quantity: Decimal


def plan_legs(
    balances: Mapping[str, Decimal], positions: Mapping[str, Decimal], marks: Mapping[str, Decimal],
    targets: Mapping[str, Decimal], quote: str, steps: Mapping[str, Decimal], min_notional: Decimal = Decimal("10"),
) -> list[Leg]:
    """The market orders that move the portfolio to ``targets`` (weights of its equity, in
    ``quote``): equity is the quote balance plus every marked position; a symbol with a target
    moves to ``weight × equity / mark``, rounded down to its quantity step; legs under
    ``min_notional`` are skipped. Sells first, so their proceeds fund the buys."""
    with money_context():
        equity = balances.get(quote, ZERO)
        for symbol, quantity in positions.items():
            if quantity and symbol in marks:
                equity += quantity * marks[symbol]
        legs: list[Leg] = []
        for symbol, weight in sorted(targets.items()):
            mark = marks.get(symbol)
            if mark is None or mark <= 0:
                raise ValueError(f"no mark for {symbol}")
            step = steps.get(symbol, Decimal("0.0001"))
            delta = weight * equity / mark - positions.get(symbol, ZERO)
            quantity = (abs(delta) / step).to_integral_value(rounding=ROUND_DOWN) * step
            if quantity <= 0 or quantity * mark < min_notional:
                continue
            legs.append(Leg(symbol, Side.BUY if delta > 0 else Side.SELL, quantity))
    return sorted(legs, key=lambda leg: leg.side is Side.BUY)


def _weights(targets: Mapping[str, str]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for symbol, raw in targets.items():
        try:
            weight = Decimal(raw)
        except ArithmeticError:
            raise NonRetryableException(f"target weight of {symbol} is not a number: {raw!r}") from None
        if not 0 <= weight <= 1:
            raise NonRetryableException(f"target weight of {symbol} must be between 0 and 1")
        out[symbol] = weight
    if sum(out.values()) > 1:
        raise NonRetryableException("target weights add up to more than 1")
    return out


async def _children(deps: Deps, pid: str, order_ids: list[str]) -> list[Order]:
    sk = deps.stages.keys
    raws: list[Any] = [await deps.redis.get(sk.order(pid, oid)) for oid in order_ids]
    return [load(Order, raw) for raw in raws if raw]


async def _submit(deps: Deps, body: OrderBody, requested_by: str) -> str:
    """A child order, accepted (or found, when a retried task places it again); its id. What
    the intake refuses it refuses again: the task fails for good."""
    try:
        quantity, price = validate(body)
        submitted = await deps.intake.submit(body, quantity, price, requested_by)
    except (InvalidOrder, PortfolioNotFound, ClientOrderIdConflict) as exc:
        raise NonRetryableException(f"child order {body.client_order_id}: {exc}") from exc
    return submitted.record.order_id


def _event(ctx: Context, pid: str) -> Event[Any]:
    """The run's ``workflow.started``; its id is derived from the run id, so the events derived
    from it keep their ids when a task runs again."""
    return Event.new(WorkflowStarted(workflow=REBALANCE, run_id=ctx.workflow_run_id), portfolio_id=pid,
                     correlation_id=ctx.workflow_run_id, event_id=derive_event_id(ctx.workflow_run_id, REBALANCE))


def define_rebalance(hatchet: Hatchet) -> Any:
    wf = hatchet.workflow(name=REBALANCE, input_validator=RebalanceInput)

    @wf.task(execution_timeout=dt.timedelta(seconds=10), retries=2)
    async def plan(input: RebalanceInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "plan", ctx)
        pid = input.portfolio_id
        weights = _weights(input.targets)
        sk = deps.stages.keys
        pf, balances, positions = await StateReader(deps.redis).read(
            [("GET", sk.portfolio(pid)), ("HGETALL", sk.balances(pid)), ("HGETALL", sk.positions(pid))]
        )
        if not pf:
            raise NonRetryableException(f"portfolio {pid} does not exist")
        marks = await Marks(deps.redis, deps.bus.keys).current()
        catalogue = await deps.stages.instruments.current()
        if catalogue is None:
            raise CatalogueMissing("no instrument catalogue yet (routing publishes it from its venues)")
        try:
            legs = plan_legs(
                decode_balances(pairs(balances)),
                {k: load(PositionRecord, v).quantity for k, v in pairs(positions).items()},
                marks, weights, input.quote, catalogue.quantity_steps(),
            )
        except ValueError as exc:
            raise NonRetryableException(str(exc)) from exc
        await deps.runs.running(ctx.workflow_run_id, REBALANCE, pid, ctx.workflow_run_id)
        await deps.bus.publish(_event(ctx, pid))
        return {"legs": [{"symbol": leg.symbol, "side": str(leg.side), "quantity": str(leg.quantity)} for leg in legs]}

    @wf.task(parents=[plan], execution_timeout=dt.timedelta(seconds=15), retries=3)
    async def submit_children(input: RebalanceInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        inject_fault(deps, input.faults, "submit_children", ctx)
        order_ids: list[str] = []
        for i, leg in enumerate(ctx.task_output(plan)["legs"]):
            body = OrderBody(
                client_order_id=f"{CHILD_ORDER_PREFIX}{ctx.workflow_run_id}-{i}", portfolio_id=input.portfolio_id, symbol=leg["symbol"],
                side=Side(leg["side"]), type=OrderType.MARKET, quantity=leg["quantity"], time_in_force=TimeInForce.IOC,
            )
            order_ids.append(await _submit(deps, body, input.requested_by or f"workflow:{ctx.workflow_run_id}"))
        return {"order_ids": order_ids}

    @wf.durable_task(parents=[submit_children], execution_timeout=dt.timedelta(minutes=5))
    async def await_children(input: RebalanceInput, ctx: DurableContext) -> dict[str, Any]:
        deps = deps_of(ctx)
        order_ids: list[str] = ctx.task_output(submit_children)["order_ids"]
        for round_ in range(_WAIT_ROUNDS):
            records = await _children(deps, input.portfolio_id, order_ids)
            open_ids = [r.order_id for r in records if not r.is_terminal]
            if not open_ids:
                break
            await ctx.aio_wait_for(
                f"children-{round_}",
                or_(
                    UserEventCondition(event_key=ORDER_TERMINAL, expression=f"input.order_id == '{open_ids[0]}'"),
                    SleepCondition(dt.timedelta(seconds=1)),
                ),
            )
        records = await _children(deps, input.portfolio_id, order_ids)
        statuses = {r.order_id: str(r.status) for r in records}
        failed = [r for r in records if r.status in _FAILED]
        if failed:
            raise NonRetryableException(
                "child orders did not fill: " + ", ".join(f"{r.order_id} {r.status} {r.reject_code or ''}".strip()
                                                          for r in failed)
            )
        if any(not r.is_terminal for r in records):
            raise NonRetryableException("child orders still open when the wait ran out")
        return {"statuses": statuses}

    @wf.task(parents=[await_children], execution_timeout=dt.timedelta(seconds=10), retries=3)
    async def finish(input: RebalanceInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        order_ids = ctx.task_output(submit_children)["order_ids"]
        statuses = ctx.task_output(await_children)["statuses"]
        result = {"status": "rebalanced", "child_order_ids": order_ids, "statuses": statuses}
        origin = _event(ctx, input.portfolio_id)
        await deps.bus.publish(origin.derive(
            PortfolioRebalanced(run_id=ctx.workflow_run_id, target_weights=_weights(input.targets),
                                child_order_ids=tuple(order_ids), status="rebalanced"),
            "rebalance",
        ))
        await deps.runs.completed(ctx.workflow_run_id, result)
        return result

    @wf.on_failure_task(execution_timeout=dt.timedelta(seconds=60), retries=3)
    async def compensate(input: RebalanceInput, ctx: Context) -> dict[str, Any]:
        """Cancel the children still open; with ``all_or_nothing`` unwind the filled legs."""
        deps = deps_of(ctx)
        step, error = failure_of(ctx)
        order_ids: list[str] = []
        try:
            order_ids = ctx.task_output(submit_children)["order_ids"]
        except Exception:  # noqa: BLE001 - the run failed before it placed children
            order_ids = []
        canceled, unwound = [], []
        for record in await _children(deps, input.portfolio_id, order_ids):
            if not record.is_terminal:
                await deps.intake.request_cancel(record, f"workflow:{ctx.workflow_run_id}")
                canceled.append(record.order_id)
            filled = sum((f.quantity for f in record.fills), ZERO)
            if input.all_or_nothing and filled > 0:
                body = OrderBody(
                    client_order_id=f"{CHILD_ORDER_PREFIX}{ctx.workflow_run_id}-undo-{record.order_id[-12:]}",
                    portfolio_id=input.portfolio_id, symbol=record.symbol,
                    side=Side.SELL if record.side is Side.BUY else Side.BUY, type=OrderType.MARKET,
                    quantity=str(filled), time_in_force=TimeInForce.IOC,
                )
                unwound.append(await _submit(deps, body, f"workflow:{ctx.workflow_run_id}"))
        await deps.runs.failed(ctx.workflow_run_id, error, step)
        origin = _event(ctx, input.portfolio_id)
        try:
            weights = _weights(input.targets)
        except NonRetryableException:
            weights = {}
        await deps.bus.publish(origin.derive(
            WorkflowFailed(workflow=REBALANCE, run_id=ctx.workflow_run_id, error=error, step=step), "rebalance", index=1,
        ))
        await deps.bus.publish(origin.derive(
            PortfolioRebalanced(run_id=ctx.workflow_run_id, target_weights=weights,
                                child_order_ids=tuple(order_ids), status="failed"),
            "rebalance", index=2,
        ))
        log.warning("portfolio.rebalance failed and compensated", run_id=ctx.workflow_run_id, step=step,
                    canceled=canceled, unwound=unwound)
        return {"status": "compensated", "canceled": canceled, "unwound": unwound}

    return wf
