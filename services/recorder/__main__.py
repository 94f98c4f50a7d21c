"""``python -m services.recorder``: consume every event type (both routes) as group
``recorder`` and append each batch to the event store in one transaction, in stream order.

The recorder is the bus's must-persist group: streams are never trimmed past what it has
acknowledged, and it acknowledges only what PostgreSQL has committed.
"""

from __future__ import annotations

from typing import Any

from services.core.bus import Batch, Commit
from services.core.events import Event, EventType, Route
from services.core.runtime import Service, main
from services.core.settings import load
from services.recorder.settings import RecorderSettings
from services.recorder.store import EventStore

GROUP = "recorder"


def build(service: Service) -> None:
    settings = load(RecorderSettings)
    state: dict[str, EventStore] = {}

    async def open_store(service: Service) -> None:
        assert service.bus is not None
        store = await EventStore.open(
            settings.postgres_dsn, max_size=settings.pool_size, namespace=service.bus.settings.namespace
        )
        await store.migrate()
        state["store"] = store

    async def close_store(_: Service) -> None:
        if "store" in state:
            await state["store"].close()

    async def record(items: list[tuple[Event[Any], Commit]]) -> None:
        await state["store"].append([event for event, _ in items])

    async def store_ready() -> bool:
        return "store" in state

    service.on_startup(open_store)
    service.on_shutdown(close_store)
    service.readiness("event_store", store_ready)
    recorder = Batch(record)
    service.consume(GROUP, dict.fromkeys(EventType, recorder), routes=frozenset(Route))


if __name__ == "__main__":
    main("recorder", build, __doc__ or "")
