"""The bridge from the bus to Hatchet: every terminal order event, on either route, becomes a
``zvt:order.terminal`` Hatchet event (``{order_id, portfolio_id, status}``), which durable
waits (``portfolio.rebalance``) wake on.

A plain consumer group (``workflow-bridge``) in the workflows worker; at least once, which the
waits tolerate (they look at the order's record when they wake)."""

from __future__ import annotations

from typing import Any

from hatchet_sdk import Hatchet

from services.core.bus import Bus, Commit, Consumer
from services.core.events import Event, EventType, Route

__all__ = ["GROUP", "ORDER_TERMINAL", "bridge_consumer"]

GROUP = "workflow-bridge"
ORDER_TERMINAL = "zvt:order.terminal"
_STATUS = {
    EventType.ORDER_REJECTED: "rejected",
    EventType.ORDER_FAILED: "failed",
    EventType.ORDER_CANCELED: "canceled",
}


def bridge_consumer(bus: Bus, hatchet: Hatchet) -> Consumer:
    async def forward(event: Event[Any], commit: Commit) -> None:
        if event.event_type is EventType.ORDER_EXECUTED:
            if event.payload.leaves_quantity > 0:
                return
            status = "filled"
        else:
            status = _STATUS[event.event_type]
        await hatchet.event.aio_push(
            ORDER_TERMINAL,
            {"order_id": event.payload.order_id, "portfolio_id": event.portfolio_id, "status": status},
        )

    handlers = {t: forward for t in (*_STATUS, EventType.ORDER_EXECUTED)}
    return Consumer(bus, GROUP, handlers, routes=frozenset({Route.STREAM, Route.WORKFLOW}))
