"""``orders.reconcile``: compare the orders the store holds open with the venues, and correct
the store where the venue knows better.

On a schedule (and when started by hand), every order record of the deployment that is open
(created, routed, partially filled, unknown) and has not moved for ``grace_s`` is looked up at
its venue (or at every venue, when routing never named one) by our client order id, which is
the order id:

- the venue has fills the record lacks: one ``order.executed`` per missing venue fill (fill
  id ``<order id>:v:<venue fill id>``), and ``order.canceled`` for the rest if the venue has
  finished with the order;
- the venue finished the order unfilled: ``order.canceled`` (expired at the venue);
- no venue knows an order routing had sent (routed, or unknown outcome): ``order.failed``.

Corrections go through the order, portfolio and risk stages like any other event (``route:
workflow``, ids derived from the order and what the venue reported), so a second run, or one
racing a late venue report, changes nothing twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from hatchet_sdk import Context, Hatchet
from pydantic import BaseModel

from services.core.events import (
    Event,
    EventType,
    OrderCanceled,
    OrderExecuted,
    OrderFailed,
    OrderRequested,
    Route,
    derive_event_id,
    utcnow,
)
from services.core.hotstate import OrderRecord, load
from services.core.redisconn import scan_keys
from services.core.telemetry import get_logger
from services.trading.money import ZERO, money_context
from services.trading.orders import OrderStatus
from services.venues.base import OrderNotFound, VenueError, VenueOrder, VenueOrderStatus
from services.workflows.contracts import RECONCILE
from services.workflows.deps import Deps, deps_of

__all__ = ["ReconcileInput", "define_reconcile"]

log = get_logger("zvt.workflows.reconcile")
STAGE = "reconcile"
_OPEN = (OrderStatus.CREATED, OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN)
_SENT = (OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN)
_DONE = (VenueOrderStatus.FILLED, VenueOrderStatus.CANCELED, VenueOrderStatus.EXPIRED, VenueOrderStatus.REJECTED)


class ReconcileInput(BaseModel):
    grace_s: float = 60.0
    limit: int = 10_000


def _origin(record: OrderRecord) -> Event[Any]:
    """A stand-in for the order's request, that corrections are derived from (fixed id)."""
    return Event.new(
        OrderRequested(
            order_id=record.order_id, client_order_id=record.client_order_id, symbol=record.symbol,
            side=record.side, order_type=record.order_type, quantity=record.quantity, price=record.price,
            time_in_force=record.time_in_force, venue=record.requested_venue,
        ),
        portfolio_id=record.portfolio_id, correlation_id=record.correlation_id,
        event_id=derive_event_id(record.order_id, STAGE), route=Route.WORKFLOW,
    )


def corrections(record: OrderRecord, found: VenueOrder | None) -> list[Event[Any]]:
    """What the store needs to agree with the venue (pure; ``found`` None: no venue has it)."""
    origin = _origin(record)
    if found is None:
        if record.status in _SENT:
            return [origin.derive(OrderFailed(
                order_id=record.order_id, client_order_id=record.client_order_id, reason_code="NOT_AT_VENUE",
                reason="reconcile: no venue knows this order", venue=record.venue,
            ), STAGE)]
        return []
    known = {f.fill_id for f in record.fills}
    out: list[Event[Any]] = []
    with money_context():
        cumulative = sum((f.quantity for f in record.fills), ZERO)
        for fill in found.fills:
            fill_id = f"{record.order_id}:v:{fill.fill_id}"
            if fill_id in known:
                continue
            if cumulative + fill.quantity > record.quantity:
                break  # the record already counts this execution under routing's own fill id
            cumulative += fill.quantity
            out.append(origin.derive(OrderExecuted(
                order_id=record.order_id, client_order_id=record.client_order_id, symbol=record.symbol,
                side=record.side, venue=found.venue, venue_order_id=found.venue_order_id, fill_id=fill_id,
                quantity=fill.quantity, price=fill.price, commission=fill.fee, commission_asset=fill.fee_asset,
                liquidity=fill.liquidity, cumulative_quantity=cumulative, leaves_quantity=record.quantity - cumulative,
            ), STAGE, index=len(out) + 1))
        rest = record.quantity - cumulative
    if found.status in _DONE and rest > 0:
        out.append(origin.derive(OrderCanceled(
            order_id=record.order_id, client_order_id=record.client_order_id,
            reason="expired" if found.status is not VenueOrderStatus.CANCELED else "canceled at the venue",
            filled_quantity=cumulative, canceled_quantity=rest,
        ), STAGE, index=len(out) + 1))
    return out


async def _lookup(deps: Deps, record: OrderRecord) -> tuple[VenueOrder | None, bool]:
    """(the venue's order, whether every venue asked answered)."""
    venues = [v for v in deps.stages.venues if record.venue in (None, v.name)] or deps.stages.venues
    answered = True
    for venue in venues:
        try:
            return await venue.fetch_order(record.symbol, client_order_id=record.order_id), True
        except OrderNotFound:
            continue
        except (VenueError, NotImplementedError) as exc:
            log.warning("reconcile: venue did not answer", venue=venue.name, order_id=record.order_id, error=str(exc))
            answered = False
    return None, answered


async def _apply(deps: Deps, event: Event[Any]) -> None:
    stages = deps.stages
    await stages.run("order", stages.order.handle, event)
    if event.event_type is EventType.ORDER_EXECUTED:
        await stages.run("portfolio", stages.portfolio.handle, event)
    await stages.run("risk", stages.risk.handle, event)


def define_reconcile(hatchet: Hatchet, cron: str) -> Any:
    wf = hatchet.workflow(name=RECONCILE, input_validator=ReconcileInput, on_crons=[cron] if cron else [])

    @wf.task(execution_timeout=dt.timedelta(minutes=4), retries=1)
    async def reconcile(input: ReconcileInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        cutoff = utcnow() - dt.timedelta(seconds=input.grace_s)
        checked, fixed = 0, []
        async for key in scan_keys(deps.redis, f"{deps.bus.keys.namespace}:{{*}}:order:*"):
            if checked >= input.limit:
                break
            raw: Any = await deps.redis.get(key)
            if not raw:
                continue
            record = load(OrderRecord, raw)
            if record.status not in _OPEN or record.updated_at > cutoff:
                continue
            checked += 1
            found, answered = await _lookup(deps, record)
            if found is None and not answered:
                continue  # cannot tell "not there" from "did not answer"
            events = corrections(record, found)
            for event in events:
                await _apply(deps, event)
            if events:
                fixed.append({"order_id": record.order_id, "corrections": [str(e.event_type) for e in events]})
                log.warning("reconcile corrected an order", order_id=record.order_id,
                            corrections=[str(e.event_type) for e in events])
        return {"checked": checked, "fixed": fixed}

    return wf
