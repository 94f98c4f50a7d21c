"""The event store: every event, once, in PostgreSQL (psycopg 3).

It answers the audit trail (``events_for_correlation``) and feeds replay (``events_for_portfolio``).
Appends are idempotent on ``event_id``: a batch that is written again after a crash inserts
nothing twice. ``seq`` is the order in which the recorder stored events; within one
correlation it is causal order, because the recorder writes each batch in stream order and an
event is only ever published after its cause was read.

The schema is created and upgraded by ``migrate`` (numbered steps, applied once, under an
advisory lock so that several recorders starting together do not race).

When PostgreSQL is down, unreachable or hung, ``append`` and ``migrate`` raise
``StoreUnavailable`` within their timeouts (an error that says nothing about the events), and
``ping`` answers False: the recorder pauses and retries instead of giving up on the events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.core.codec import decode_any, encode
from services.core.events import Event

__all__ = ["MIGRATIONS", "EventStore", "StoreUnavailable", "StoredEvent", "is_unavailable"]

_LOCK = 0x7A7674  # advisory lock key of the migrations ("zvt")

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE zvt_events (
            seq            bigserial PRIMARY KEY,
            event_id       uuid        NOT NULL UNIQUE,
            event_type     text        NOT NULL,
            version        text        NOT NULL,
            occurred_at    timestamptz NOT NULL,
            recorded_at    timestamptz NOT NULL DEFAULT now(),
            portfolio_id   text        NOT NULL,
            correlation_id text        NOT NULL,
            causation_id   uuid,
            order_id       text,
            route          text        NOT NULL,
            envelope       jsonb       NOT NULL
        );
        CREATE INDEX zvt_events_correlation ON zvt_events (correlation_id, seq);
        CREATE INDEX zvt_events_order ON zvt_events (order_id, seq) WHERE order_id IS NOT NULL;
        CREATE INDEX zvt_events_portfolio ON zvt_events (portfolio_id, seq);
        CREATE INDEX zvt_events_type_time ON zvt_events (event_type, occurred_at);
        """,
    ),
    (
        2,
        # The bus namespace an event was recorded from: one database can hold several
        # platforms (environments, test runs) whose portfolio ids overlap.
        """
        ALTER TABLE zvt_events ADD COLUMN IF NOT EXISTS namespace text NOT NULL DEFAULT 'zvt';
        CREATE INDEX IF NOT EXISTS zvt_events_namespace_type ON zvt_events (namespace, event_type, seq);
        """,
    ),
    (
        3,
        # Every lookup is scoped to one namespace (two deployments sharing a database must not
        # see each other's audit trail), so the lookup indexes lead with it. Rows stored before
        # step 2 carry the default namespace 'zvt' (docs/api.md, Audit: moving them).
        """
        CREATE INDEX IF NOT EXISTS zvt_events_ns_correlation ON zvt_events (namespace, correlation_id, seq);
        CREATE INDEX IF NOT EXISTS zvt_events_ns_order ON zvt_events (namespace, order_id, seq)
            WHERE order_id IS NOT NULL;
        CREATE INDEX IF NOT EXISTS zvt_events_ns_portfolio ON zvt_events (namespace, portfolio_id, seq);
        DROP INDEX IF EXISTS zvt_events_correlation;
        DROP INDEX IF EXISTS zvt_events_order;
        DROP INDEX IF EXISTS zvt_events_portfolio;
        """,
    ),
]

_INSERT = """
    INSERT INTO zvt_events (event_id, event_type, version, occurred_at, portfolio_id,
                            correlation_id, causation_id, order_id, route, envelope, namespace)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (event_id) DO NOTHING
"""

_COLUMNS = "seq, event_id, recorded_at, envelope::text"


class StoreUnavailable(Exception):
    """PostgreSQL is down, unreachable, hung or out of resources: nothing is wrong with what
    was asked of it, so ask again later."""


# SQLSTATE classes that speak of the server, not of the statement: connection exception,
# insufficient resources (disk full, too many connections), operator intervention (shutdown,
# starting up, a query canceled by our own timeout), system error (I/O)
_DOWN_CLASSES = ("08", "53", "57", "58")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unavailable (rather than a bad statement or row)."""
    if isinstance(exc, StoreUnavailable | PoolTimeout | TimeoutError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state[:2] in _DOWN_CLASSES  # None: raised by the client (connection lost)
    return False


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    recorded_at: dt.datetime
    event: Event[Any]


class EventStore:
    """Append-only store of events over a psycopg connection pool."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Any]], namespace: str = "zvt") -> None:
        """``namespace``: the bus namespace appended events come from, and the only one every
        lookup reads: two deployments (or test runs) may share a database, and an id one of
        them chose (a workflow run id, a client's correlation id) may exist in the other."""
        self.pool = pool
        self.namespace = namespace
        self._probe: tuple[str, int | None] = (pool.conninfo if isinstance(pool.conninfo, str) else "", None)
        self._libpq: dict[str, str] = {}

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 4, namespace: str = "zvt", timeout: float = 30.0,
        connect_timeout: int | None = None, reconnect_timeout: float = 300.0, open_timeout: float = 30.0,
        libpq: Mapping[str, str] | None = None,
    ) -> EventStore:
        """A store over a new pool. ``timeout``: how long a call waits for a pooled connection;
        ``connect_timeout``: libpq's, for each new connection; ``reconnect_timeout``: how long
        the pool keeps retrying one lost connection in the background before it gives up and
        lets the next call start a fresh attempt (short: it notices a server back sooner);
        ``open_timeout``: how long to wait for the first connection (else ``StoreUnavailable``);
        ``libpq``: more connection parameters, winning over the DSN's (``sslmode``,
        ``sslrootcert``... from ``PostgresSettings``)."""
        kwargs: dict[str, Any] = {"autocommit": False, **(libpq or {})}
        if connect_timeout is not None:
            kwargs["connect_timeout"] = connect_timeout
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, kwargs=kwargs, timeout=timeout,
            reconnect_timeout=reconnect_timeout,
        )
        try:
            await pool.open(wait=True, timeout=open_timeout)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, Exception) and is_unavailable(exc):
                raise StoreUnavailable(f"event store unreachable: {exc}") from exc
            raise
        store = cls(pool, namespace)
        store._probe = (dsn, connect_timeout)
        store._libpq = dict(libpq or {})
        return store

    async def close(self) -> None:
        await self.pool.close()

    async def migrate(self, reader_role: str | None = None) -> list[int]:
        """Apply the migrations not applied yet; returns the versions applied now.

        ``reader_role``: an existing PostgreSQL role that may read the event store and nothing
        else (the gateway's): granted ``SELECT`` on the events table, on every start (idempotent;
        the table's owner may grant without any other privilege). The role itself, its login
        and password are the database administrator's (docs/operations.md, PostgreSQL roles)."""
        try:
            applied = await self._migrate()
            if reader_role is not None:
                await self.grant_reader(reader_role)
            return applied
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"event store unavailable: {type(exc).__name__}: {exc}") from exc
            raise

    async def grant_reader(self, role: str) -> None:
        """Let ``role`` read the events (``SELECT`` on ``zvt_events``), nothing more."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                sql.SQL("GRANT SELECT ON zvt_events TO {}").format(sql.Identifier(role))
            )

    async def _migrate(self) -> list[int]:
        applied: list[int] = []
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS zvt_schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM zvt_schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO zvt_schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
        return applied

    async def append(self, events: Sequence[Event[Any]], *, timeout: float | None = None) -> int:
        """Store events in the given order, in one transaction; returns how many were new.

        Raises ``StoreUnavailable`` when the database is down, unreachable or does not finish
        within ``timeout`` seconds (then nothing was committed, or all of it was: a retry
        inserts nothing twice)."""
        if not events:
            return 0
        rows = [(*_row(event), self.namespace) for event in events]
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.connection() as conn, conn.transaction():
                    async with conn.cursor() as cur:
                        await cur.executemany(_INSERT, rows, returning=False)
                        inserted = cur.rowcount
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"event store unavailable: {type(exc).__name__}: {exc}") from exc
            raise
        return max(inserted, 0)

    async def ping(self, timeout: float = 5.0) -> bool:
        """Whether the database answers ``SELECT 1`` on a new connection within ``timeout``
        seconds (a new one: a pooled connection to a hung server could hang the probe)."""
        try:
            async with asyncio.timeout(timeout):
                dsn, connect_timeout = self._probe
                conn = await AsyncConnection.connect(
                    make_conninfo(dsn, **self._libpq), autocommit=True,
                    connect_timeout=connect_timeout or max(2, int(timeout)),
                )
                async with conn:
                    await conn.execute("SELECT 1")
            return True
        except Exception as exc:
            if is_unavailable(exc):
                return False
            raise

    async def events_for_correlation(self, correlation_id: str, limit: int = 10_000) -> list[StoredEvent]:
        """The audit trail of one order or workflow run (of this store's namespace), in causal order."""
        return await self._select("namespace = %s AND correlation_id = %s", (self.namespace, correlation_id), limit)

    async def events_for_order(self, order_id: str, limit: int = 10_000) -> list[StoredEvent]:
        """The events of one order (of this store's namespace), in stored order."""
        return await self._select("namespace = %s AND order_id = %s", (self.namespace, order_id), limit)

    async def events_for_orders(self, order_ids: Sequence[str], limit: int = 100_000) -> list[StoredEvent]:
        """The events of several orders (of this store's namespace), in stored order."""
        if not order_ids:
            return []
        return await self._select("namespace = %s AND order_id = ANY(%s)", (self.namespace, list(order_ids)), limit)

    async def requests_of_portfolio(self, portfolio_id: str, before_seq: int | None = None, limit: int = 500
                                    ) -> list[StoredEvent]:
        """A portfolio's ``order.requested`` events (of this store's namespace), newest first,
        from before ``before_seq`` on: the orders the API lists once Redis has let them go."""
        where = "namespace = %s AND portfolio_id = %s AND event_type = 'order.requested'"
        params: tuple[Any, ...] = (self.namespace, portfolio_id)
        if before_seq is not None:
            where += " AND seq < %s"
            params = (*params, before_seq)
        return await self._select(where, params, limit, descending=True)

    async def events_for_portfolio(self, portfolio_id: str, after_seq: int = 0, limit: int = 100_000) -> list[StoredEvent]:
        """A portfolio's events (of this store's namespace) in stored order, from ``after_seq`` on."""
        return await self._select(
            "namespace = %s AND portfolio_id = %s AND seq > %s", (self.namespace, portfolio_id, after_seq), limit
        )

    async def events_of_types(self, event_types: Sequence[str], after_seq: int = 0, limit: int = 100_000) -> list[StoredEvent]:
        """Events of these types (of this store's namespace) in stored order: what replay reads,
        page by page."""
        return await self._select(
            "namespace = %s AND event_type = ANY(%s) AND seq > %s", (self.namespace, list(event_types), after_seq), limit
        )

    async def count(self) -> int:
        """How many events this store's namespace holds."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM zvt_events WHERE namespace = %s", (self.namespace,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def _select(self, where: str, params: tuple[Any, ...], limit: int, *, descending: bool = False
                      ) -> list[StoredEvent]:
        order = "seq DESC" if descending else "seq"
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM zvt_events WHERE {where} ORDER BY {order} LIMIT %s", (*params, limit)
            )
            rows = await cur.fetchall()
        return [StoredEvent(seq=row[0], recorded_at=row[2], event=decode_any(row[3].encode())) for row in rows]


def _row(event: Event[Any]) -> tuple[Any, ...]:
    return (
        event.event_id,
        str(event.event_type),
        event.version,
        event.occurred_at,
        event.portfolio_id,
        event.correlation_id,
        event.causation_id,
        getattr(event.payload, "order_id", None),
        str(event.route),
        Jsonb(encode(event).decode(), dumps=_identity),
    )


def _identity(text: str) -> str:
    return text
