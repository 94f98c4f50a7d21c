"""Redis with a password (``requirepass``, ACL users) for real, on private redis-servers (never
the shared ones): services reach it with ``ZVT_REDIS_PASSWORD`` or the URL's userinfo, a
wrong or missing password stops a service at start with one clear line that never shows the
password, and devstack runs and checks its servers with a password."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import stack
from devstack.__main__ import fleet_environment
from services.core.redisconn import RedisStartupError, open_checked
from services.core.settings import CoreSettings
from tests.integration.conftest import ROOT

PW = "auth-test-password-" + uuid.uuid4().hex[:8]
WRONG = "not-the-password-" + uuid.uuid4().hex[:8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private redis-server with a password for `default` and an ACL user `fleet`."""
    folder, port = tmp_path_factory.mktemp("redis-auth"), _free_port()
    stack.start_redis_server(port, folder, ["--requirepass", PW])
    stack.redis_cli(port, "ACL", "SETUSER", "fleet", "on", f">{PW}-fleet", "~*", "&*", "+@all", password=PW)
    try:
        yield port
    finally:
        stack.stop_redis_server(port, folder)


async def test_redis_when_password_given_by_setting_or_url_connects(protected: int) -> None:
    for settings in (
        CoreSettings(redis_url=f"redis://127.0.0.1:{protected}/0", redis_password=PW),
        CoreSettings(redis_url=f"redis://:{PW}@127.0.0.1:{protected}/0"),
        CoreSettings(redis_url=f"redis://127.0.0.1:{protected}/0", redis_username="fleet", redis_password=f"{PW}-fleet"),
        # the settings win over the URL's userinfo
        CoreSettings(redis_url=f"redis://fleet:{WRONG}@127.0.0.1:{protected}/0", redis_password=f"{PW}-fleet"),
    ):
        client = await open_checked(settings)
        try:
            assert await client.ping()
            assert (await client.acl_whoami()) in ("default", "fleet", b"default", b"fleet")
        finally:
            await client.aclose()


def _service(env: dict[str, str], tmp_path: Path, service: str = "risk") -> tuple[int, list[str]]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "ZVT_HTTP_PORT": "0", "ZVT_LOG_LEVEL": "DEBUG"}
    proc = subprocess.run([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()


@pytest.mark.parametrize(
    ("settings", "user"),
    [
        ({"ZVT_REDIS_PASSWORD": WRONG}, "default"),
        ({"ZVT_REDIS_URL": "redis://app:{wrong}@127.0.0.1:{port}/0"}, "app"),
        ({"ZVT_REDIS_USERNAME": "fleet", "ZVT_REDIS_PASSWORD": WRONG}, "fleet"),
        ({}, "default"),  # none at all: NOAUTH
    ],
    ids=["wrong-password-setting", "wrong-password-in-url", "wrong-acl-user-password", "no-password"],
)
def test_service_when_redis_password_is_wrong_exits_2_with_one_redacted_line(
    protected: int, tmp_path: Path, settings: dict[str, str], user: str
) -> None:
    env = {"ZVT_REDIS_URL": f"redis://127.0.0.1:{protected}/0"}
    env.update({k: v.format(wrong=WRONG, port=protected) for k, v in settings.items()})
    code, lines = _service(env, tmp_path)
    assert code == 2, lines
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("risk: cannot use Redis at redis://"), line
    assert f"127.0.0.1:{protected}/0: authentication failed for user {user!r}" in line, line
    if user == "app":  # the URL's password is masked where the URL is shown
        assert line.startswith(f"risk: cannot use Redis at redis://app:***@127.0.0.1:{protected}/0: "), line
    assert WRONG not in line and PW not in line


async def test_open_checked_when_password_wrong_raises_with_the_line(protected: int) -> None:
    with pytest.raises(RedisStartupError) as failed:
        await open_checked(CoreSettings(redis_url=f"redis://127.0.0.1:{protected}/0", redis_password=WRONG))
    assert "authentication failed for user 'default'" in failed.value.line and WRONG not in failed.value.line


# --- devstack with a password ---------------------------------------------------------------------


def test_devstack_when_password_set_runs_primary_and_replica_with_requirepass_and_masterauth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(stack.PASSWORD_ENV, PW)
    args = stack._password_args()
    assert args == ["--requirepass", PW, "--masterauth", PW]
    primary, replica = _free_port(), _free_port()
    stack.start_redis_server(primary, tmp_path / "primary", args)
    try:
        stack.start_redis_server(replica, tmp_path / "replica", [*args, "--replicaof", stack.HOST, str(primary)])
        try:
            assert stack.ping(primary) and stack.ping(replica)  # devstack's own checks use the password
            assert not stack.ping(primary, password="")
            with pytest.raises(stack.DevstackError, match="NOAUTH"):
                stack.redis_cli(primary, "PING", password="")
            stack.redis_cli(primary, "SET", "k", "v")
            for _ in range(100):  # the replica authenticates to its primary with masterauth
                if "master_link_status:up" in stack.redis_cli(replica, "INFO", "replication"):
                    break
                time.sleep(0.05)
            assert stack.redis_cli(replica, "GET", "k").strip() == "v"
            # running with this password: started again with another one, it says so instead of hanging
            with pytest.raises(stack.DevstackError, match="runs with another password"):
                stack.start_redis_server(primary, tmp_path / "primary", ["--requirepass", WRONG])
            with pytest.raises(stack.DevstackError, match="runs with a password"):
                stack.start_redis_server(primary, tmp_path / "primary")
        finally:
            stack.stop_redis_server(replica, tmp_path / "replica")
    finally:
        stack.stop_redis_server(primary, tmp_path / "primary")
    assert stack.redis_url(6390) == f"redis://:{PW}@127.0.0.1:6390/0"


def test_devstack_when_a_server_runs_without_password_refuses_to_pretend(tmp_path: Path) -> None:
    port = _free_port()
    stack.start_redis_server(port, tmp_path / "open")
    try:
        with pytest.raises(stack.DevstackError, match="runs without a password"):
            stack.start_redis_server(port, tmp_path / "open", ["--requirepass", PW])
    finally:
        stack.stop_redis_server(port, tmp_path / "open")


def test_fleet_environment_when_devstack_has_a_password_gives_it_to_every_service(tmp_path: Path) -> None:
    args = argparse.Namespace(redis="single", namespace="zvt", gateway_port=8080, webhook_port=8081)
    env, local = fleet_environment(args, tmp_path, {stack.PASSWORD_ENV: PW}, {}, {})
    assert env["ZVT_REDIS_PASSWORD"] == PW and stack.PASSWORD_ENV not in env
    assert PW not in env["ZVT_REDIS_URL"] and PW not in "".join(local.values())
    env, _ = fleet_environment(args, tmp_path, {}, {}, {})
    assert "ZVT_REDIS_PASSWORD" not in env
