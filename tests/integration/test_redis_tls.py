"""Redis over TLS for real: private redis-servers (Debian's build has TLS) on a ``--tls-port``
with certificates from a throwaway CA, reached with ``rediss://`` URLs and the
``ZVT_REDIS_TLS_*`` settings: the CA, a client certificate for ``tls-auth-clients yes``, the
hostname check, and a Redis Cluster (one node, ``tls-cluster yes``) over TLS. What is wrong
stops a service at start with one line."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import stack
from services.core.redisconn import (
    HiredisPackingSSLConnection,
    RedisStartupError,
    open_checked,
)
from services.core.settings import CoreSettings
from tests.integration.conftest import ROOT
from tests.pki import Pki

PW = "tls-test-password-" + uuid.uuid4().hex[:8]


def _free_port() -> int:
    """A free port below the ephemeral range whose cluster-bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randrange(21000, 29000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@dataclass(frozen=True)
class TlsRedis:
    port: int  # plaintext, loopback: devstack's readiness checks only
    tls_port: int
    pki: Pki
    client_cert: Path
    client_key: Path

    def url(self, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.tls_port}/0"


def _tls_args(pki: Pki, server: str, tls_port: int, auth_clients: str) -> list[str]:
    pair = pki.issue(server, ["127.0.0.1", "localhost"] if server == "server" else ["redis.internal"])
    return [
        "--tls-port", str(tls_port), "--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
        "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", auth_clients, "--requirepass", PW,
    ]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _serve(pki: Pki, folder: Path, server: str, auth_clients: str, extra: list[str] | None = None) -> Iterator[TlsRedis]:
    port, tls_port = _free_port(), _free_port()
    client = pki.issue(f"client-{server}", ["zvt-fleet"], client=True)
    stack.start_redis_server(port, folder, [*_tls_args(pki, server, tls_port, auth_clients), *(extra or [])])
    try:
        yield TlsRedis(port, tls_port, pki, client.cert, client.key)
    finally:
        stack.stop_redis_server(port, folder)


@pytest.fixture(scope="module")
def mtls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """Certificate for 127.0.0.1 and localhost; clients must show a certificate of the CA."""
    yield from _serve(pki, tmp_path_factory.mktemp("mtls-redis"), "server", "yes")


@pytest.fixture(scope="module")
def misnamed_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """Certificate for redis.internal only; no client certificate asked for."""
    yield from _serve(pki, tmp_path_factory.mktemp("misnamed-redis"), "misnamed", "no")


@pytest.fixture(scope="module")
def tls_cluster(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A one-node Redis Cluster (all 16384 slots) whose clients and cluster bus speak TLS."""
    folder = tmp_path_factory.mktemp("tls-cluster")
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"), "--tls-cluster", "yes",
             "--tls-replication", "yes", "--appendonly", "no"]
    for server in _serve(pki, folder, "server", "no", extra):
        stack.redis_cli(server.port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383", password=PW)
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in stack.redis_cli(server.port, "CLUSTER", "INFO", password=PW):
            assert time.monotonic() < deadline, "the one-node cluster did not become ok"
            time.sleep(0.05)
        yield server


async def _roundtrip(settings: CoreSettings) -> None:
    client = await open_checked(settings)
    try:
        key = f"tls-test:{{{uuid.uuid4().hex}}}"
        await client.set(key, "over tls", ex=60)
        assert await client.get(key) == b"over tls"
    finally:
        await client.aclose()


async def test_redis_when_tls_with_ca_and_client_certificate_connects(mtls_redis: TlsRedis) -> None:
    settings = CoreSettings(
        redis_url=mtls_redis.url(), redis_password=PW, redis_tls_ca_file=str(mtls_redis.pki.ca),
        redis_tls_cert_file=str(mtls_redis.client_cert), redis_tls_key_file=str(mtls_redis.client_key),
    )
    await _roundtrip(settings)
    # the hostname is checked: localhost is in the certificate too
    await _roundtrip(settings.model_copy(update={"redis_url": mtls_redis.url("localhost")}))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # no client certificate: the server's alert, or (TLS 1.3: it decides after the
        # handshake, and its reset can overtake the alert) the hint to check the certificate
        ({"redis_tls_cert_file": None, "redis_tls_key_file": None},
         ("alert certificate required", "require a client certificate? check ZVT_REDIS_TLS_CERT_FILE")),
        ({"redis_tls_ca_file": None}, ("certificate verify failed",)),  # the system CAs do not know ours
    ],
    ids=["no-client-certificate", "unknown-ca"],
)
async def test_redis_when_tls_is_refused_fails_at_start_with_one_line(
    mtls_redis: TlsRedis, change: dict[str, object], reason: tuple[str, ...]
) -> None:
    values: dict[str, object] = {
        "redis_url": mtls_redis.url(), "redis_password": PW, "redis_tls_ca_file": str(mtls_redis.pki.ca),
        "redis_tls_cert_file": str(mtls_redis.client_cert), "redis_tls_key_file": str(mtls_redis.client_key),
        "redis_timeout_s": 2,
    }
    values.update(change)
    with pytest.raises(RedisStartupError) as failed:
        await open_checked(CoreSettings(**values))  # type: ignore[arg-type]
    line = failed.value.line
    assert "\n" not in line and line.startswith(f"cannot use Redis at {mtls_redis.url()}: "), line
    assert any(r in line for r in reason), line
    assert PW not in line


async def test_redis_when_plaintext_url_meets_a_tls_port_says_so(mtls_redis: TlsRedis) -> None:
    with pytest.raises(RedisStartupError) as failed:
        await open_checked(CoreSettings(redis_url=f"redis://127.0.0.1:{mtls_redis.tls_port}/0", redis_password=PW,
                                        redis_timeout_s=1))
    assert "cannot use Redis at redis://127.0.0.1:" in failed.value.line


async def test_redis_when_certificate_names_another_host_fails_unless_hostname_check_is_off(
    misnamed_redis: TlsRedis,
) -> None:
    settings = CoreSettings(redis_url=misnamed_redis.url(), redis_password=PW,
                            redis_tls_ca_file=str(misnamed_redis.pki.ca), redis_timeout_s=2)
    with pytest.raises(RedisStartupError) as failed:
        await open_checked(settings)
    assert "TLS handshake failed" in failed.value.line and "mismatch" in failed.value.line, failed.value.line
    # the chain is still verified with the check off: only the name is not
    await _roundtrip(settings.model_copy(update={"redis_tls_check_hostname": False}))


async def test_redis_cluster_when_tls_connects_every_node_over_tls(tls_cluster: TlsRedis) -> None:
    settings = CoreSettings(redis_url=tls_cluster.url(), redis_cluster=True, redis_password=PW,
                            redis_tls_ca_file=str(tls_cluster.pki.ca))
    client = await open_checked(settings)
    try:
        nodes = client.get_nodes()  # type: ignore[union-attr]
        assert [n.port for n in nodes] == [tls_cluster.tls_port]
        assert all(issubclass(n.connection_class, HiredisPackingSSLConnection) for n in nodes)
        for i in range(20):  # keys in many slots, all on the one TLS node
            await client.set(f"tls-test:{i}", str(i), ex=60)
        assert await client.get("tls-test:7") == b"7"
    finally:
        await client.aclose()


def test_service_process_when_tls_ca_is_wrong_exits_2_with_one_line(mtls_redis: TlsRedis, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other-ca")
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "ZVT_HTTP_PORT": "0",
        "ZVT_REDIS_URL": mtls_redis.url(), "ZVT_REDIS_PASSWORD": PW, "ZVT_REDIS_TLS_CA_FILE": str(other.ca),
        "ZVT_REDIS_TLS_CERT_FILE": str(mtls_redis.client_cert), "ZVT_REDIS_TLS_KEY_FILE": str(mtls_redis.client_key),
    }
    proc = subprocess.run([sys.executable, "-m", "services.risk"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"risk: cannot use Redis at {mtls_redis.url()}: TLS handshake"), lines
    assert "certificate verify failed" in lines[0] and PW not in lines[0]
