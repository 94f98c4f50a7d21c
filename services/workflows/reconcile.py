"""``orders.reconcile``: compare the orders the store holds open with the venues, and correct
the store where the venue knows better.

On a schedule (and when started by hand), every order record of the deployment that is open
(created, routed, partially filled, unknown) and has not moved for ``grace_s`` is looked up at
its venue (or at every venue, when routing never named one) by our client order id, which is
the order id:

- the venue has fills the record lacks: one ``order.executed`` per missing venue fill. Fills
  are matched on the venue's own fill id, which routing stores with every fill
  (``Fill.venue_fill_id``), never on counts, and a missing fill gets the id routing gives the
  same execution (``platform_fill_id(order id, venue, venue fill id)``): if routing's own
  report of it is still on its way, the order stage and the portfolio take it once. Never more
  than the venue's filled quantity minus what the record holds there is added (a fill recorded
  before fills carried the venue's id, a venue that reports one aggregate fill);
- the venue finished the order and routing does not hold it as resting: ``order.canceled``
  for the rest (expired at the venue);
- no venue knows an order routing had sent (routed, or unknown outcome), routing does not hold
  it as resting, and every venue that could hold it was asked and answered: ``order.failed``
  (``NOT_AT_VENUE``).

Two things are never taken as "the order is gone":

- an order routing follows as resting (its shard's ``resting`` hash: a GTC limit working at
  the venue) is live: it may get missing fills (routing reports the same fills under the same
  ids), never a cancel or a failure: its end is routing's to report;
- an in-process venue (paper) lives inside each process, so the worker's paper venue is not
  the one routing placed the order at: it is never asked, and an order whose venue is one
  (or may be one) is left alone (``unverifiable`` in the result).

The open orders are found through each shard's ``open-orders`` index, which the order stage
keeps in the same commits as the records (added when created, removed when terminal), oldest
first: never by scanning keys, so a run costs the open orders, not every order Redis holds.

Corrections go through the order, portfolio and risk stages like any other event (``route:
workflow``, ids derived from the order and what the venue reported), so a second run, or one
racing a late venue report, changes nothing twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

from hatchet_sdk import Context, Hatchet
from pydantic import BaseModel

from services.core.events import (
    Event,
    EventType,
    OrderCanceled,
    OrderExecuted,
    OrderFailed,
    Route,
    derive_event_id,
    utcnow,
)
from services.core.hotstate import RestingOrder, StateKeys, load, order_requested
from services.core.telemetry import get_logger
from services.risk.stage import HANDLED as RISK_HANDLED
from services.trading.money import ZERO, money_context
from services.trading.orders import Order, OrderStatus
from services.venues.base import (
    OrderNotFound,
    Venue,
    VenueError,
    VenueFill,
    VenueOrder,
    VenueOrderStatus,
    in_process,
    platform_fill_id,
)
from services.workflows.contracts import RECONCILE
from services.workflows.deps import Deps, deps_of

__all__ = ["ReconcileInput", "corrections", "define_reconcile", "missing_fills", "open_orders", "venues_to_ask"]

log = get_logger("zvt.workflows.reconcile")
STAGE = "reconcile"
_OPEN = (OrderStatus.CREATED, OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN)
_SENT = (OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN)
_DONE = (VenueOrderStatus.FILLED, VenueOrderStatus.CANCELED, VenueOrderStatus.EXPIRED, VenueOrderStatus.REJECTED)


class ReconcileInput(BaseModel):
    grace_s: float = 60.0
    limit: int = 10_000


def _origin(record: Order) -> Event[Any]:
    """A stand-in for the order's request, that corrections are derived from (fixed id)."""
    return order_requested(record, route=Route.WORKFLOW, event_id=derive_event_id(record.order_id, STAGE))


def missing_fills(record: Order, found: VenueOrder) -> list[tuple[str, VenueFill]]:
    """The venue's fills of ``found`` the record lacks, each with its platform fill id (pure).

    A venue fill is recorded when the record has a fill at that venue with its venue fill id
    (or, for a fill recorded before fills carried it, routing's ``<order id>:<n>``: the n-th of
    the venue's fills; reconcile's old ``<order id>:v:<venue fill id>``). Whatever the ids say,
    no more than the venue's filled quantity minus the record's quantity at that venue is
    returned, so nothing is counted twice; an aggregate fill is compared by quantity only."""
    at_venue = [f for f in record.fills if f.venue == found.venue]
    ids = {f.fill_id for f in record.fills}
    known: set[str] = set()
    unnamed = 0
    old_prefix = f"{record.order_id}:v:"
    for f in at_venue:
        if f.venue_fill_id is not None:
            known.add(f.venue_fill_id)
        elif f.fill_id.startswith(old_prefix):
            known.add(f.fill_id.removeprefix(old_prefix))
        else:
            unnamed += 1
    out: list[tuple[str, VenueFill]] = []
    with money_context():
        room = found.filled_quantity - sum((f.quantity for f in at_venue), ZERO)
        position = 0
        for fill in found.fills:
            fill_id = platform_fill_id(record.order_id, found.venue, fill.fill_id)
            if fill.aggregate:
                if room > 0 and fill_id not in ids and fill.quantity > 0:
                    part = min(room, fill.quantity)
                    out.append((fill_id, dataclasses.replace(fill, quantity=part, fee=fill.fee * part / fill.quantity)))
                    room -= part
                continue
            position += 1
            if fill.fill_id in known or fill_id in ids or position <= unnamed:
                continue
            if fill.quantity > room:
                log.warning("reconcile: a venue fill the record cannot name, its quantity recorded already",
                            order_id=record.order_id, venue=found.venue, venue_fill_id=fill.fill_id)
                continue
            out.append((fill_id, fill))
            room -= fill.quantity
    return out


def corrections(record: Order, found: VenueOrder | None, *, resting: RestingOrder | None = None
                ) -> list[Event[Any]]:
    """What the store needs to agree with the venue (pure). ``found``: the order at its venue,
    None when every venue that could hold it said it has none; ``resting``: routing's resting
    record of the order, if routing holds one (the order is live: never canceled or failed)."""
    origin = _origin(record)
    if found is None:
        if record.status in _SENT and resting is None:
            return [origin.derive(OrderFailed(
                order_id=record.order_id, client_order_id=record.client_order_id, reason_code="NOT_AT_VENUE",
                reason="reconcile: no venue knows this order", venue=record.venue,
                filled_quantity=record.filled_quantity,  # risk keeps holding what those fills cost
            ), STAGE)]
        return []
    out: list[Event[Any]] = []
    with money_context():
        cumulative = sum((f.quantity for f in record.fills), ZERO)
        for fill_id, fill in missing_fills(record, found):
            if cumulative + fill.quantity > record.quantity:
                log.warning("reconcile: the venue reports more than the order's quantity", order_id=record.order_id,
                            venue=found.venue, venue_fill_id=fill.fill_id)
                break
            cumulative += fill.quantity
            # one id per venue fill, whichever run finds it
            out.append(origin.derive(OrderExecuted(
                order_id=record.order_id, client_order_id=record.client_order_id, symbol=record.symbol,
                side=record.side, venue=found.venue, venue_order_id=found.venue_order_id, fill_id=fill_id,
                quantity=fill.quantity, price=fill.price, commission=fill.fee, commission_asset=fill.fee_asset,
                liquidity=fill.liquidity, cumulative_quantity=cumulative, leaves_quantity=record.quantity - cumulative,
                venue_fill_id=fill.fill_id,
            ), f"{STAGE}:{fill_id}"))
        rest = record.quantity - cumulative
    if resting is None and found.status in _DONE and rest > 0:
        out.append(origin.derive(OrderCanceled(
            order_id=record.order_id, client_order_id=record.client_order_id,
            reason="expired" if found.status is not VenueOrderStatus.CANCELED else "canceled at the venue",
            filled_quantity=cumulative, canceled_quantity=rest,
        ), STAGE, index=len(out) + 1))
    return out


def venues_to_ask(record: Order, venues: Sequence[Venue]) -> tuple[list[Venue], bool]:
    """The venues to look the order up at, and whether "none of them has it" would mean the
    order is not at any venue: not when the order's venue (or, unrouted, any venue) is an
    in-process one, which this process cannot see into, or one this process does not trade on."""
    could_hold = [v for v in venues if v.name == record.venue] if record.venue is not None else list(venues)
    asked = [v for v in could_hold if not in_process(v)]
    return asked, bool(could_hold) and len(asked) == len(could_hold)


async def _lookup(deps: Deps, record: Order) -> tuple[VenueOrder | None, bool]:
    """(the venue's order, whether "None" means no venue has it)."""
    venues, conclusive = venues_to_ask(record, deps.stages.venues)
    for venue in venues:
        try:
            return await venue.fetch_order(record.symbol, client_order_id=record.order_id), True
        except OrderNotFound:
            continue
        except (VenueError, NotImplementedError) as exc:
            log.warning("reconcile: venue did not answer", venue=venue.name, order_id=record.order_id, error=str(exc))
            conclusive = False
    return None, conclusive


async def _apply(deps: Deps, event: Event[Any]) -> None:
    """A correction through the stages, as the streams would carry it: the order record; a
    fill to the portfolio, whose ``position.updated`` lets risk release that fill's funds; an
    end of the order to risk."""
    stages = deps.stages
    await stages.run("order", stages.order.handle, event)
    if event.event_type is EventType.ORDER_EXECUTED:
        for update in await stages.run("portfolio", stages.portfolio.handle, event):
            if update.event_type is EventType.POSITION_UPDATED:
                await stages.run("risk", stages.risk.handle, update)
    elif event.event_type in RISK_HANDLED:
        await stages.run("risk", stages.risk.handle, event)


async def open_orders(redis: Any, keys: StateKeys, cutoff: dt.datetime, *, page: int = 500
                      ) -> AsyncIterator[Order]:
    """The open orders that have not moved since ``cutoff``, shard by shard, oldest first, from
    the shards' ``open-orders`` indexes (in one slot each). An order created after ``cutoff``
    cannot qualify, so each index is read only up to it. A shard's ids are all read before its
    first record is yielded: corrections applied meanwhile take orders out of the index."""
    top = int(cutoff.timestamp() * 1000)
    for shard in range(keys.keys.shards):
        index = keys.open_orders(shard)
        names: list[str] = []
        while True:
            ids: Any = await redis.zrangebyscore(index, "-inf", top, start=len(names), num=page)
            names += [i.decode() if isinstance(i, bytes) else i for i in ids]
            if len(ids) < page:
                break
        for i in range(0, len(names), page):
            raws: Any = await redis.mget([keys.order_in_shard(shard, oid) for oid in names[i : i + page]])
            for raw in raws:
                if not raw:
                    continue
                record = load(Order, raw)
                if record.status in _OPEN and record.updated_at <= cutoff:
                    yield record


def define_reconcile(hatchet: Hatchet, cron: str) -> Any:
    wf = hatchet.workflow(name=RECONCILE, input_validator=ReconcileInput, on_crons=[cron] if cron else [])

    @wf.task(execution_timeout=dt.timedelta(minutes=4), retries=1)
    async def reconcile(input: ReconcileInput, ctx: Context) -> dict[str, Any]:
        deps = deps_of(ctx)
        cutoff = utcnow() - dt.timedelta(seconds=input.grace_s)
        checked, unverifiable, fixed = 0, 0, []
        async for record in open_orders(deps.redis, deps.stages.keys, cutoff):
            if checked >= input.limit:
                break
            checked += 1
            held: Any = await deps.redis.hget(deps.stages.keys.resting(record.portfolio_id), record.order_id)
            resting = load(RestingOrder, held) if held else None
            found, conclusive = await _lookup(deps, record)
            if found is None and not conclusive:
                unverifiable += 1
                continue  # cannot tell "not there" from "not asked" or "did not answer"
            events = corrections(record, found, resting=resting)
            for event in events:
                await _apply(deps, event)
            if events:
                fixed.append({"order_id": record.order_id, "corrections": [str(e.event_type) for e in events]})
                log.warning("reconcile corrected an order", order_id=record.order_id,
                            corrections=[str(e.event_type) for e in events])
        return {"checked": checked, "unverifiable": unverifiable, "fixed": fixed}

    return wf
