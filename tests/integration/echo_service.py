"""A real service on the runtime, used by the process-level bus tests.

It consumes ``order.requested`` as group ``echo``, re-emits a derived ``order.validated``, and
counts each committed handling per order id in a hash of the event's shard, inside the same
atomic commit, and which process handled it (its pid, in another hash: the failover tests
tell the heir's handlings from the old owner's). ``ZVT_ECHO_DELAY_MS`` makes every handling slow, so a test can kill it mid-batch;
``ZVT_ECHO_EXCLUSIVE=1`` makes it an exclusive (shard-leasing) consumer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from services.core.bus import Commit
from services.core.events import Event, EventType, OrderRequested, OrderValidated
from services.core.runtime import Service, main

PID = str(os.getpid())
DELAY = float(os.environ.get("ZVT_ECHO_DELAY_MS", "0")) / 1000
EXCLUSIVE = os.environ.get("ZVT_ECHO_EXCLUSIVE") == "1"


async def handle(event: Event[Any], commit: Commit) -> None:
    p: OrderRequested = event.payload
    if DELAY:
        await asyncio.sleep(DELAY)
    commit.emit(
        event.derive(
            OrderValidated(
                order_id=p.order_id, client_order_id=p.client_order_id, symbol=p.symbol, side=p.side,
                order_type=p.order_type, quantity=p.quantity, price=p.price,
            ),
            "echo",
        )
    )
    commit.write("HINCRBY", commit.key("echo", "handled"), p.order_id, 1)
    commit.write("HSET", commit.key("echo", "by"), p.order_id, PID)


def build(service: Service) -> None:
    service.consume("echo", {EventType.ORDER_REQUESTED: handle}, exclusive=EXCLUSIVE)


if __name__ == "__main__":
    main("echo", build)
