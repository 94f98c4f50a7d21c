"""A private redis-server and a real gateway process on it, for tests that freeze, kill or
cut connections: never the shared devstack servers, which other tests use meanwhile."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.integration.conftest import ROOT

ADMIN = "admin-secret-for-outage-tests-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[PrivateRedis]:
    """``redis-server`` in the foreground on a free port, no persistence; killed at the end."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.02)
        yield PrivateRedis(proc, port)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def gateway_process(redis_url: str, **env: str) -> Iterator[str]:
    """``python -m services.gateway`` on ``redis_url`` in a fresh namespace; its base URL."""
    port = free_port()
    full = dict(os.environ)
    full.update({
        "ZVT_REDIS_URL": redis_url, "ZVT_REDIS_CLUSTER": "false", "ZVT_BUS_NAMESPACE": f"t{os.urandom(5).hex()}",
        "ZVT_BUS_SHARDS": "4", "ZVT_HTTP_PORT": "0", "ZVT_LOG_LEVEL": "WARNING", "ZVT_GATEWAY_PORT": str(port),
        "ZVT_GATEWAY_ADMIN_API_KEY": ADMIN, "PYTHONPATH": str(ROOT),
    })
    full.update(env)
    log = tempfile.TemporaryFile()  # not a pipe: a process logging through an outage must never block on it
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=full,
                            stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # an import-heavy start on a loaded CI machine
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"gateway did not start: {log.read().decode(errors='replace')[-4000:]}")
            time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
