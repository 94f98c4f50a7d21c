"""Connection settings: Redis user, password and TLS, PostgreSQL TLS, and how they reach the
clients (built here, not connected: the connections themselves are tested against real servers
in tests/integration/test_redis_tls.py and test_redis_auth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.redact import forget_all
from services.core.redisconn import HiredisPackingConnection, HiredisPackingSSLConnection, connect, startup_problem
from services.core.settings import CoreSettings, PostgresSettings, SettingsError, load

PW = "s3cret-redis-password"


@pytest.fixture(autouse=True)
def _forget() -> None:
    forget_all()


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")  # only its existence is checked at load
    return path


@pytest.mark.parametrize(
    ("env", "variable", "message"),
    [
        ({"ZVT_REDIS_TLS_CA_FILE": "{ca}"}, "ZVT_REDIS_TLS_CA_FILE", "needs a rediss:// ZVT_REDIS_URL"),
        ({"ZVT_REDIS_URL": "rediss://h:6380", "ZVT_REDIS_TLS_CA_FILE": "/nowhere/ca.crt"}, "ZVT_REDIS_TLS_CA_FILE",
         "no such file"),
        ({"ZVT_REDIS_URL": "rediss://h:6380", "ZVT_REDIS_TLS_KEY_FILE": "{ca}"}, "ZVT_REDIS_TLS_KEY_FILE",
         "needs ZVT_REDIS_TLS_CERT_FILE too"),
        ({"ZVT_REDIS_URL": "rediss://h:6380", "ZVT_REDIS_TLS_CERT_FILE": "{ca}"}, "ZVT_REDIS_TLS_CERT_FILE",
         "needs ZVT_REDIS_TLS_KEY_FILE too"),
        ({"ZVT_REDIS_PASSWORD": ""}, "ZVT_REDIS_PASSWORD", "at least 1"),
    ],
    ids=["ca-without-tls", "ca-missing", "key-without-cert", "cert-without-key", "empty-password"],
)
def test_load_when_redis_tls_or_auth_settings_are_wrong_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, ca: Path, env: dict[str, str], variable: str, message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(ca=ca))
    with pytest.raises(SettingsError) as info:
        load(CoreSettings)
    assert info.value.line.startswith(f"invalid setting {variable}:"), info.value.line
    assert message in info.value.line and "\n" not in info.value.line


def test_load_when_redis_password_is_a_secret_never_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_REDIS_PASSWORD", PW)
    settings = load(CoreSettings)
    assert PW not in repr(settings) and PW not in str(settings.model_dump())
    from services.core.redact import redact

    assert redact(f"connecting with {PW}") == "connecting with ***"  # remembered by load


async def test_connect_when_settings_carry_credentials_they_win_over_the_url(ca: Path) -> None:
    settings = CoreSettings(redis_url="redis://urluser:urlpass@h:6379/0", redis_username="fleet",
                            redis_password=PW)  # type: ignore[arg-type]
    client = connect(settings)
    kwargs = client.connection_pool.connection_kwargs  # type: ignore[union-attr]
    assert (kwargs["username"], kwargs["password"], kwargs["host"]) == ("fleet", PW, "h")
    assert client.connection_pool.connection_class is HiredisPackingConnection  # type: ignore[union-attr]
    plain = connect(CoreSettings(redis_url="redis://urluser:urlpass@h:6379/0"))
    kwargs = plain.connection_pool.connection_kwargs  # type: ignore[union-attr]
    assert (kwargs["username"], kwargs["password"]) == ("urluser", "urlpass")
    await client.aclose()
    await plain.aclose()


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_connect_when_rediss_uses_tls_with_hiredis_packing_and_the_ca(ca: Path, cluster: bool) -> None:
    settings = CoreSettings(redis_url="rediss://h:6380/0", redis_cluster=cluster, redis_tls_ca_file=str(ca),
                            redis_tls_check_hostname=False, redis_password=PW)  # type: ignore[arg-type]
    client = connect(settings)
    if cluster:
        kwargs = client.nodes_manager.connection_kwargs  # type: ignore[union-attr]
        (node,) = client.nodes_manager.startup_nodes.values()  # type: ignore[union-attr]
        assert node.connection_class is HiredisPackingSSLConnection
    else:
        kwargs = {**client.connection_pool.connection_kwargs,  # type: ignore[union-attr]
                  "connection_class": client.connection_pool.connection_class}  # type: ignore[union-attr]
    # before: a single node got redis-py's SSLConnection (no hiredis packing), a cluster plain TCP
    assert kwargs["connection_class"] is HiredisPackingSSLConnection
    assert kwargs["ssl_ca_certs"] == str(ca) and kwargs["ssl_check_hostname"] is False
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["password"] == PW
    await client.aclose()


def test_postgres_settings_when_set_become_libpq_parameters(monkeypatch: pytest.MonkeyPatch, ca: Path) -> None:
    assert load(PostgresSettings).connect_kwargs() == {}
    monkeypatch.setenv("ZVT_POSTGRES_SSLMODE", "verify-full")
    monkeypatch.setenv("ZVT_POSTGRES_SSLROOTCERT", str(ca))
    assert load(PostgresSettings).connect_kwargs() == {"sslmode": "verify-full", "sslrootcert": str(ca)}
    monkeypatch.setenv("ZVT_POSTGRES_SSLROOTCERT", "system")
    assert load(PostgresSettings).connect_kwargs()["sslrootcert"] == "system"
    monkeypatch.setenv("ZVT_POSTGRES_SSLMODE", "verify")
    with pytest.raises(SettingsError, match="^invalid setting ZVT_POSTGRES_SSLMODE:"):
        load(PostgresSettings)
    monkeypatch.setenv("ZVT_POSTGRES_SSLMODE", "require")
    monkeypatch.setenv("ZVT_POSTGRES_SSLROOTCERT", "/nowhere/root.crt")
    with pytest.raises(SettingsError, match="^invalid setting ZVT_POSTGRES_SSLROOTCERT: .*no such file"):
        load(PostgresSettings)


def test_startup_problem_when_a_tls_server_resets_after_the_handshake_points_at_the_client_certificate() -> None:
    """TLS 1.3: a server that wants a client certificate says so after the handshake, and the
    reset that follows its alert can arrive first; the line must still point at the cause."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    reset = RedisConnectionError("Error while reading from 127.0.0.1:6380 : (104, 'Connection reset by peer')")
    tls = startup_problem(CoreSettings(redis_url="rediss://127.0.0.1:6380/0"), reset)
    assert tls.startswith("cannot use Redis at rediss://127.0.0.1:6380/0: the TLS server closed the connection")
    assert "ZVT_REDIS_TLS_CERT_FILE" in tls
    plain = startup_problem(CoreSettings(redis_url="redis://127.0.0.1:6380/0"), reset)
    assert "a TLS server needs a rediss:// URL" in plain
