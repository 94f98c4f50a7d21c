"""The bridge from the bus to Hatchet: the terminal event of a rebalance's child order, on
either route, becomes a ``zvt:order.terminal`` Hatchet event (``{order_id, portfolio_id,
status}``), which the rebalance's durable wait wakes on.

Only those orders: each Hatchet event is a gRPC call and writes in the engine's database, and
every other order's terminal event would cost that for nothing (the engine manages a few
hundred a second on a small machine, the fast path thousands of orders).

A plain consumer group (``workflow-bridge``) in the workflows worker; at least once, which the
waits tolerate (they look at the order's record when they wake)."""

from __future__ import annotations

from typing import Any

from hatchet_sdk import Hatchet

from services.core.bus import Bus, Commit, Consumer
from services.core.events import Event, EventType, Route
from services.workflows.contracts import CHILD_ORDER_PREFIX

__all__ = ["GROUP", "ORDER_TERMINAL", "bridge_consumer", "terminal_status"]

GROUP = "workflow-bridge"
ORDER_TERMINAL = "zvt:order.terminal"
_STATUS = {
    EventType.ORDER_REJECTED: "rejected",
    EventType.ORDER_FAILED: "failed",
    EventType.ORDER_CANCELED: "canceled",
}


def terminal_status(event: Event[Any]) -> str | None:
    """The status a waited-for order ended with, if ``event`` ends one; ``None`` otherwise."""
    if not event.payload.client_order_id.startswith(CHILD_ORDER_PREFIX):
        return None
    if event.event_type is EventType.ORDER_EXECUTED:
        return "filled" if event.payload.leaves_quantity <= 0 else None
    return _STATUS[event.event_type]


def bridge_consumer(bus: Bus, hatchet: Hatchet) -> Consumer:
    async def forward(event: Event[Any], commit: Commit) -> None:
        status = terminal_status(event)
        if status is None:
            return
        await hatchet.event.aio_push(
            ORDER_TERMINAL,
            {"order_id": event.payload.order_id, "portfolio_id": event.portfolio_id, "status": status},
        )

    handlers = {t: forward for t in (*_STATUS, EventType.ORDER_EXECUTED)}
    return Consumer(bus, GROUP, handlers, routes=frozenset({Route.STREAM, Route.WORKFLOW}))
