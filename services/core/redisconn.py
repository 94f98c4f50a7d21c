"""One way to open Redis for every process: a single node or a cluster, same API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from services.core.redact import redact
from services.core.settings import CoreSettings

__all__ = [
    "MAX_CONNECTIONS", "AnyRedis", "ConnectionGate", "Lane", "RedisStartupError", "WaitingRedisCluster", "ScriptBatcher", "StartupError", "connect", "connection_options",
    "open_checked", "open_redis", "scan_keys", "startup_problem",
]

AnyRedis: TypeAlias = Redis | RedisCluster

MAX_CONNECTIONS = 512
"""Connections per process (on a cluster: per node). The default 100 is less than a cold
start fans out."""


class HiredisPackingConnection(Connection):
    """redis-py's connection with commands packed by hiredis (C) instead of pure Python,
    and transport errors on write reported as ``ConnectionError``.

    Packing is a large share of the client's CPU per event on the bus's hot path (a commit
    script carries a whole batch; a publish pipeline carries one XADD per event).
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "CONFIG GET" and the like
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        # A write on a connection that was torn down under it (a peer reset, or a cluster
        # client dropping a dead node's connections during a failover) leaks the transport's
        # internal AttributeError/TypeError (redis/redis-py#4287), or under uvloop a
        # RuntimeError ("the handler is closed"). None is a RedisError, so it would bypass
        # every retry layer (and the gateway's 503): turn it into the ConnectionError it is.
        try:
            await super().send_packed_command(command, check_health)
        except (AttributeError, TypeError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                raise
            await self.disconnect(nowait=True)
            raise ConnectionError(f"connection lost while writing: {exc}") from exc


class HiredisPackingSSLConnection(HiredisPackingConnection, SSLConnection):
    """The same over TLS (a ``rediss://`` URL)."""


def connection_options(settings: CoreSettings) -> dict[str, Any]:
    """What every Redis connection is made with besides its address: the ACL user and password
    (the settings win over the URL's userinfo), TLS (CA, client certificate, hostname check)
    for a ``rediss://`` URL, timeouts and retries."""
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "retry": Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=3, supported_errors=(ConnectionError, TimeoutError)),
    }
    if settings.redis_username is not None:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls:
        options.update(
            ssl_cert_reqs="required",
            ssl_ca_certs=settings.redis_tls_ca_file,
            ssl_certfile=settings.redis_tls_cert_file,
            ssl_keyfile=settings.redis_tls_key_file,
            ssl_check_hostname=settings.redis_tls_check_hostname,
        )
    return options


class ConnectionGate:
    """At most ``limit`` commands (or pipelines) of one client in flight; the next waits up to
    ``timeout`` seconds for one to finish, then fails with a ``ConnectionError``.

    A command or pipeline holds at most one connection per node, so this keeps every node's
    pool of a cluster client within ``limit`` without redis-py's ``MaxConnectionsError`` at
    once, as ``BlockingConnectionPool`` does for a single node."""

    __slots__ = ("_semaphore", "limit", "timeout")

    def __init__(self, limit: int, timeout: float) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self.limit = limit
        self.timeout = timeout

    async def __aenter__(self) -> None:
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # free: no timer on the hot path
            return
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(
                f"no free Redis connection within {self.timeout} s: all {self.limit} in use"
            ) from None

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()


class WaitingRedisCluster(RedisCluster):
    """A cluster client whose commands wait for a free connection (``ConnectionGate``)."""

    def __init__(self, *args: Any, pool_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = ConnectionGate(kwargs.get("max_connections", MAX_CONNECTIONS), pool_timeout)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        gate: ConnectionGate = self.cluster_client.gate  # type: ignore[attr-defined]
        async with gate:
            return await super().execute(raise_on_error, allow_redirections)


_WRITE_HIGH_WATER = 1 << 20
"""Bytes a lane leaves in its socket's write buffer before it waits for them to drain."""


class Lane:
    """Connections of its own (one per node) for one loop that sends the same few commands all
    the time: a consumer's read, state load and commit.

    redis-py's path for each command checks a connection out of the pool under a lock, probes
    it for stray data, awaits its observability hooks and wraps the call in its retry logic:
    about 60 µs of client CPU per command on a 2-vCPU VM, a third of a whole round trip
    (``docs/benchmarks.md``). A lane writes the command and reads the reply. Anything out of
    the ordinary goes through the client's own path instead, which has the retries, the
    reconnects and, on a cluster, the redirects and the slot-map refresh: a broken or timed-out
    connection (dropped first: a reply half read would poison it), a redirect, a node that is
    down, loading or read-only, a script the server lost.

    A lane is not shared: one command at a time (its owner awaits each). ``close`` drops its
    connections.
    """

    __slots__ = ("_cluster", "_conns", "redis")

    # replies after which the client's own path takes the command (and knows what to do)
    _DEFER = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._conns: dict[str, Connection] = {}

    async def execute(self, *args: Any, key: str, **fallback: Any) -> Any:
        """``args`` as one command to the node that serves ``key``; its reply, as the server
        sent it (no response callback). ``fallback``: what the client's ``execute_command``
        needs if it takes over."""
        node: Any = None
        name = ""
        if self._cluster:
            try:
                node = self.redis.get_node_from_key(key)  # type: ignore[union-attr]
            except RedisClusterException:  # the slot map is being reloaded (a failover)
                return await self.redis.execute_command(*args, **fallback)
            name = node.name
        conn: Any = self._conns.get(name)
        if conn is None:
            conn = self._conns[name] = self._connection(node)
        try:
            if not conn.is_connected:
                await conn.connect()
            # the connection's own send and read would start a task and a timeout per call:
            # write (a full socket buffer is the only reason to wait), then read the reply
            writer = conn._writer
            writer.writelines(conn.pack_command(*args))
            async with asyncio.timeout(conn.socket_timeout):
                if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await writer.drain()
                reply = await conn._parser.read_response()
        except (ConnectionError, TimeoutError, OSError, asyncio.TimeoutError, AttributeError, RuntimeError):
            # refused, reset, timed out, or written on a transport closed under it (uvloop:
            # RuntimeError, redis/redis-py#4287: AttributeError)
            self._drop(name)
        except BaseException:
            self._drop(name)  # cancelled mid-command: its reply may still come
            raise
        else:
            if not isinstance(reply, ResponseError):
                return reply
            if not isinstance(reply, self._DEFER):
                raise reply  # an error reply: the connection is in step
        return await self.redis.execute_command(*args, **fallback)

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """``script`` (registered on this lane's client) by ``EVALSHA``; through the client's
        own script call (which loads it) if the server does not have it."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, key=keys[0])
        except NoScriptError:
            return await script(keys=keys, args=args)

    def _connection(self, node: Any) -> Connection:
        if node is None:
            pool: Any = self.redis.connection_pool  # type: ignore[union-attr]
            cls, kwargs = pool.connection_class, pool.connection_kwargs
        else:
            cls, kwargs = node.connection_class, node.connection_kwargs
        # no retries inside: whatever fails goes through the client, which retries
        conn: Connection = cls(**{**kwargs, "retry": Retry(NoBackoff(), 0)})
        return conn

    def _drop(self, name: str) -> None:
        conn: Any = self._conns.pop(name, None)
        if conn is not None:
            conn._close()  # the transport, at once (no await: this may run while cancelled)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


def connect(settings: CoreSettings) -> AnyRedis:
    """A client for ``settings.redis_url``; the caller closes it with ``aclose()``.

    A command that finds all ``MAX_CONNECTIONS`` in use waits up to ``ZVT_REDIS_POOL_TIMEOUT_S``
    for one to come back instead of failing at once with "too many connections": on a single
    node in ``BlockingConnectionPool``; on a cluster, whose nodes' pools cannot wait, in the
    client's ``ConnectionGate``.
    """
    options = connection_options(settings)
    connection_class = HiredisPackingSSLConnection if settings.redis_tls else HiredisPackingConnection
    if settings.redis_cluster:
        # from_url reads the URL's userinfo and query first; the settings' options win over them
        url_options = dict(parse_url(settings.redis_url))
        url_options.pop("connection_class", None)
        cluster = WaitingRedisCluster(
            **{**url_options, **options},
            pool_timeout=settings.redis_pool_timeout_s,
            ssl=settings.redis_tls,
            health_check_interval=0,
            max_connections=MAX_CONNECTIONS,  # per node
        )
        # RedisCluster fixes its connection class (SSLConnection with ssl=True); nodes are built
        # from these kwargs. Ours packs with hiredis, over TLS too.
        for kwargs in (cluster.connection_kwargs, cluster.nodes_manager.connection_kwargs):
            kwargs["connection_class"] = connection_class
        for node in cluster.nodes_manager.startup_nodes.values():
            node.connection_class = connection_class
        return cluster
    # Not from_url: a rediss:// URL would set redis-py's own SSLConnection over ours.
    url_options = dict(parse_url(settings.redis_url))
    url_options.pop("connection_class", None)
    pool = BlockingConnectionPool(
        **{**url_options, **options},
        max_connections=MAX_CONNECTIONS,
        timeout=settings.redis_pool_timeout_s,
        connection_class=connection_class,
    )
    return Redis.from_pool(pool)


async def scan_keys(redis: AnyRedis, pattern: str) -> AsyncIterator[str]:
    """Every key matching ``pattern``: on a cluster, from each master in turn."""
    nodes: list[Any] = redis.get_primaries() if isinstance(redis, RedisCluster) else [None]
    for node in nodes:
        kwargs = {"target_nodes": node} if node is not None else {}
        async for key in redis.scan_iter(match=pattern, count=1000, **kwargs):
            yield key.decode() if isinstance(key, bytes) else key


async def open_redis(settings: CoreSettings) -> AnyRedis:
    """``connect``, and for a cluster also load the slot map before the first command.

    redis-py's async cluster client loads it lazily on first use, and concurrent first
    commands on a fresh client can race that load (failing with a connection error).
    """
    client = connect(settings)
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client


class StartupError(Exception):
    """A service cannot start for a reason an operator fixes (a credential, a certificate, a
    missing role): ``line`` says so in one line, credentials masked; the service prints it and
    exits 2 (``services.core.runtime.main``)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = redact(line)


class RedisStartupError(StartupError):
    """Redis cannot be used at start: a wrong password, TLS refused, unreachable."""


async def open_checked(settings: CoreSettings) -> AnyRedis:
    """``open_redis`` and one ``PING``, or ``RedisStartupError`` naming what is wrong: what a
    service runs at start, so that a wrong password or a TLS problem stops it at once with one
    clear line instead of a traceback (or a service that is up but can do nothing)."""
    client: AnyRedis | None = None
    try:
        client = await open_redis(settings)
        await asyncio.wait_for(client.ping(), settings.redis_timeout_s * 2)
    except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        raise RedisStartupError(startup_problem(settings, exc)) from None
    return client


def startup_problem(settings: CoreSettings, exc: BaseException) -> str:
    """One line for a failure to open Redis: where, and why (credentials masked)."""
    cause: BaseException = exc
    while isinstance(cause, RedisClusterException) and cause.__cause__ is not None:
        cause = cause.__cause__  # "cannot be connected": the node's own error says why
    text = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, AuthenticationError):
        user = settings.redis_username or urlsplit(settings.redis_url).username or "default"
        why = f"authentication failed for user {user!r} (check ZVT_REDIS_PASSWORD / the URL's password): {text}"
    elif "SSL" in text or "certificate" in text or "TLS" in text:
        why = f"TLS handshake failed (check ZVT_REDIS_TLS_* and the rediss:// URL): {text}"
    elif settings.redis_tls and isinstance(cause, ConnectionError) and (
        "Connection reset" in text or "closed by server" in text
    ):
        # TLS 1.3: a server that wants a client certificate decides after the handshake, and
        # its alert can lose the race against the reset that follows it
        why = (
            "the TLS server closed the connection after the handshake (does it require a client "
            f"certificate? check ZVT_REDIS_TLS_CERT_FILE and ZVT_REDIS_TLS_KEY_FILE): {text}"
        )
    elif "wrong version number" in text or isinstance(cause, ConnectionError) and "Connection reset" in text:
        why = f"connection refused or reset (a TLS server needs a rediss:// URL): {text}"
    else:
        why = f"{type(cause).__name__}: {text}"
    kind = "Redis Cluster" if settings.redis_cluster else "Redis"
    return redact(f"cannot use {kind} at {settings.redis_url}: {why}")[:1000]


class ScriptBatcher:
    """Calls of one Lua script from many concurrent tasks, sent together: every call made while
    a round trip is in flight goes out in the next one, as one pipeline (``EVALSHA`` each).

    redis-py spends most of a command's CPU per round trip (connection checkout, wait_for,
    observability hooks), so a busy gateway pays it once per batch instead of once per
    request. A lone call still goes out at once. Each call gets its own reply or exception.
    """

    def __init__(self, redis: AnyRedis, source: str, *, max_batch: int = 256) -> None:
        self.redis = redis
        self.script = redis.register_script(source)
        self.max_batch = max_batch
        self._queue: list[tuple[list[Any], list[Any], asyncio.Future[Any]]] = []
        self._draining = False

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                # calls whose caller gave up meanwhile (its request ran out of time while
                # Redis hung) are not sent any more
                batch = [call for call in batch if not call[2].done()]
                if not batch:
                    continue
                try:
                    replies = await self._send(batch)
                except Exception as exc:  # the round trip failed: every call of it did
                    replies = [exc] * len(batch)
                for (_, _, future), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._draining = False

    async def _send(self, batch: list[tuple[list[Any], list[Any], asyncio.Future[Any]]]) -> list[Any]:
        if len(batch) == 1:
            keys, args, _ = batch[0]
            try:
                return [await self.script(keys=keys, args=args)]
            except Exception as exc:
                return [exc]
        pipe: Any = self.redis.pipeline(transaction=False)
        sha = self.script.sha
        for keys, args, _ in batch:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        replies: list[Any] = list(await pipe.execute(raise_on_error=False))
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # a restarted or failed-over Redis: load it again
                keys, args, _ = batch[i]
                try:
                    replies[i] = await self.script(keys=keys, args=args)
                except Exception as exc:
                    replies[i] = exc
        return replies
