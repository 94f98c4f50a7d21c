"""A throwaway fleet for HTTP load runs: gateway + risk/order/routing/portfolio + recorder as
local processes (``devstack.fleet``) on a namespace of their own.

    with http_fleet() as fleet:            # devstack's single Redis and PostgreSQL
        print(fleet.url, fleet.admin_key)  # gateway on a free loopback port, bootstrap admin key

On exit the processes are stopped and every key of the namespace is deleted. Used by
``run_locust.py --start-fleet`` and the smoke test.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from devstack import stack
from devstack.fleet import PIPELINE, Fleet

__all__ = ["HttpFleet", "http_fleet"]

SERVICES = (*PIPELINE, "recorder", "gateway")


@dataclass
class HttpFleet:
    url: str
    admin_key: str
    namespace: str
    redis_url: str
    fleet: Fleet
    log_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not healthy within {timeout:.0f}s ({last})")


def delete_namespace(redis_url: str, namespace: str) -> int:
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=5000))
        return sum(int(client.unlink(*keys[i : i + 500])) for i in range(0, len(keys), 500))
    finally:
        client.close()


@contextlib.contextmanager
def http_fleet(
    *,
    redis_url: str | None = None,
    postgres_dsn: str | None = None,
    shards: int = 4,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    services: tuple[str, ...] = SERVICES,
) -> Iterator[HttpFleet]:
    redis_url = redis_url or stack.ensure_single()
    postgres_dsn = postgres_dsn or stack.ensure_postgres()
    namespace = f"lt{secrets.token_hex(5)}"
    admin_key = secrets.token_urlsafe(24)
    port = _free_port()
    logs = log_dir or Path(tempfile.mkdtemp(prefix="zvt-loadtest-fleet-"))
    full_env = {
        "ZVT_REDIS_URL": redis_url,
        "ZVT_REDIS_CLUSTER": "false",
        "ZVT_BUS_NAMESPACE": namespace,
        "ZVT_BUS_SHARDS": str(shards),
        "ZVT_BUS_TRIM_INTERVAL_S": "0",
        "ZVT_DRAIN_TIMEOUT_S": "5",
        "ZVT_LOG_LEVEL": "INFO",  # Fleet waits for the INFO "service started" line
        "ZVT_ROUTING_FEED_VOLATILITY": "0",
        "ZVT_RECORDER_POSTGRES_DSN": postgres_dsn,
        "ZVT_GATEWAY_POSTGRES_DSN": postgres_dsn,
        "ZVT_GATEWAY_HOST": "127.0.0.1",
        "ZVT_GATEWAY_PORT": str(port),
        "ZVT_GATEWAY_ADMIN_API_KEY": admin_key,
        **(env or {}),
    }
    fleet = Fleet(full_env, log_dir=logs, start_timeout=60)
    url = f"http://127.0.0.1:{port}"
    try:
        fleet.start(services)
        _wait_ready(url, 30)
        yield HttpFleet(url, admin_key, namespace, redis_url, fleet, logs)
    finally:
        fleet.stop()
        try:
            delete_namespace(redis_url, namespace)
        except redis.RedisError as exc:
            print(f"WARNING: the keys of namespace {namespace} were not deleted ({exc})", file=sys.stderr)
