"""``python -m services.recorder``: consume every event type (both routes) as group
``recorder`` and append each batch to the event store in one transaction, in stream order.

The recorder is the bus's must-persist group: streams are never trimmed past what it has
acknowledged, and it acknowledges only what PostgreSQL has committed.

PostgreSQL down, unreachable or hung, for any length of time, loses nothing: a write that
finds it so (within ``ZVT_RECORDER_POOL_TIMEOUT_S`` / ``ZVT_RECORDER_WRITE_TIMEOUT_S``) raises
``Unavailable``, so the consumer pauses, reads nothing new and retries the batch in hand with
backoff, without spending the entries' delivery budget or dead-lettering them. ``/readyz``
reports ``event_store: false`` meanwhile (a probe every ``ZVT_RECORDER_HEALTH_INTERVAL_S``).
A recorder started while PostgreSQL is away waits for it, not ready, before it reads.

With ``ZVT_BUS_WAIT_REPLICAS`` it copies a batch only once the Redis replicas have it
(``replication_barrier``); until they do, the batch is held the same way.
"""

from __future__ import annotations

from typing import Any

import psycopg
from redis.exceptions import RedisError

from services.core.bus import Batch, Commit, Unavailable
from services.core.events import Event, EventType, Route
from services.core.redisconn import StartupError
from services.core.replication import ReplicaWait, replication_barrier
from services.core.runtime import Service, main
from services.core.settings import PostgresSettings, load
from services.core.telemetry import get_logger
from services.recorder.settings import RecorderSettings
from services.recorder.store import EventStore, StoreUnavailable

GROUP = "recorder"

log = get_logger("zvt.recorder")


class _Health:
    """Whether the event store answers: the last write's or probe's verdict."""

    def __init__(self) -> None:
        self.up = False

    def mark(self, up: bool, reason: str = "") -> None:
        if up != self.up:
            if up:
                log.info("event store available")
            else:
                log.warning("event store unavailable", error=reason[:500])
        self.up = up


def build(service: Service) -> None:
    settings = load(RecorderSettings)
    postgres = load(PostgresSettings)
    state: dict[str, EventStore] = {}
    health = _Health()

    async def open_store(service: Service) -> None:
        """Connect and migrate, waiting (not ready) while PostgreSQL is away; returns early on a stop."""
        assert service.bus is not None
        backoff = 0.5
        while True:
            try:
                store = await EventStore.open(
                    settings.postgres_dsn, max_size=settings.pool_size, namespace=service.bus.settings.namespace,
                    timeout=settings.pool_timeout_s, connect_timeout=settings.connect_timeout_s,
                    reconnect_timeout=_reconnect_timeout(settings), open_timeout=settings.connect_timeout_s + 1,
                    libpq=postgres.connect_kwargs(),
                )
            except StoreUnavailable as exc:
                health.mark(False, str(exc))
            else:
                try:
                    await store.migrate(reader_role=settings.reader_role)
                except psycopg.errors.UndefinedObject as exc:  # the reader role does not exist
                    await store.close()
                    raise StartupError(
                        f"ZVT_RECORDER_READER_ROLE {settings.reader_role!r}: {exc}; create the role first "
                        "(docs/operations.md, Secure the connections)"
                    ) from None
                except StoreUnavailable as exc:
                    await store.close()
                    health.mark(False, str(exc))
                else:
                    state["store"] = store
                    health.mark(True)
                    return
            log.warning("waiting for the event store", retry_in_s=backoff)
            if await service.sleep(backoff):
                return
            backoff = min(backoff * 2, 5.0)

    async def close_store(_: Service) -> None:
        if "store" in state:
            await state["store"].close()

    replica_wait = ReplicaWait.of(service.bus_settings)

    async def record(items: list[tuple[Event[Any], Commit]]) -> None:
        store = state.get("store")
        if store is None:
            raise Unavailable("event store not open")
        if replica_wait is not None:
            # Only what a failover cannot take back goes to the event store: with events
            # a master acknowledged but its replica never got, a stage would handle their
            # inputs again after the failover, maybe differently, and replay would differ.
            assert service.redis is not None and service.bus is not None
            try:
                await replication_barrier(
                    service.redis, replica_wait, service.bus.keys, (commit.shard for _, commit in items)
                )
            except RedisError as exc:
                raise Unavailable(f"events not confirmed by the Redis replicas: {exc}") from exc
        try:
            await store.append([event for event, _ in items], timeout=settings.write_timeout_s)
        except StoreUnavailable as exc:
            health.mark(False, str(exc))
            raise Unavailable(str(exc)) from exc
        health.mark(True)

    async def probe() -> None:
        """Keep ``/readyz`` true to the event store also while no events flow."""
        while not await service.sleep(settings.health_interval_s):
            store = state.get("store")
            if store is None:
                continue  # open_store is still trying, and says so
            try:
                up, reason = await store.ping(timeout=settings.connect_timeout_s + 1), "probe: no answer"
            except Exception as exc:  # refused for another reason (credentials...): not ready either
                up, reason = False, f"probe: {type(exc).__name__}: {exc}"
            health.mark(up, reason)

    async def store_ready() -> bool:
        return "store" in state and health.up

    service.on_startup(open_store)
    service.on_shutdown(close_store)
    service.readiness("event_store", store_ready)
    service.background(probe)
    recorder = Batch(record)
    service.consume(GROUP, dict.fromkeys(EventType, recorder), routes=frozenset(Route))


def _reconnect_timeout(settings: RecorderSettings) -> float:
    """How long the pool retries one lost connection in the background (backing off) before
    it gives up and the next write starts a fresh attempt: short, so that PostgreSQL back after
    a long outage is used within seconds, not after the pool's next, long-delayed attempt."""
    return float(settings.connect_timeout_s)


if __name__ == "__main__":
    main("recorder", build, __doc__ or "")
