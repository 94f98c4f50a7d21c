"""Secrets are never printed: real service processes started with credentials in their
settings, whose whole output (settings errors, JSON logs, library logs, crash tracebacks) must
name the problem without ever showing a password, token or key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PW = "hunter2xyzzy"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZW5hbnQiLCJhdWQiOiJoYXRjaGV0In0.c2lnbmF0dXJlLXBhcnQ"


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZVT_")}
    return {**env, "PYTHONPATH": str(ROOT), "ZVT_HTTP_PORT": "0", **settings}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(args: list[str], env: dict[str, str], tmp_path: Path, *, until: str | None = None,
         timeout: float = 60) -> tuple[int | None, str]:
    """Run a process to its end (or until its output shows ``until``, then kill it); its
    exit code and everything it wrote on stdout and stderr."""
    out_path = tmp_path / "out.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if until is not None and until in out_path.read_text(errors="replace"):
                time.sleep(0.5)  # let the lines that follow it come out too
                break
            time.sleep(0.1)
    finally:
        code = proc.poll()
        if code is None:
            proc.kill()
            proc.wait()
    return code, out_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("service", "settings", "variable"),
    [
        ("risk", {"ZVT_REDIS_URL": f"redis://:{PW}@cache.internal:6379/0", "ZVT_HTTP_PORT": "eighty"},
         "ZVT_HTTP_PORT"),
        ("risk", {"ZVT_REDIS_URL": f"reddis://app:{PW}@cache.internal:6379/0"}, "ZVT_REDIS_URL"),
        ("gateway", {"ZVT_REDIS_URL": f"rediss://app:{PW}@cache.internal:6380",
                     "ZVT_GATEWAY_POSTGRES_DSN": f"mysql://zvt:{PW}@db.internal/zvt"}, "ZVT_GATEWAY_POSTGRES_DSN"),
        ("gateway", {"ZVT_GATEWAY_ADMIN_API_KEY": PW}, "ZVT_GATEWAY_ADMIN_API_KEY"),
        ("notifications", {"ZVT_NOTIFICATIONS_WEBHOOK_URLS": f"ftp://hook:{PW}@hooks.example/x"},
         "ZVT_NOTIFICATIONS_WEBHOOK_URLS"),
        ("routing", {"ZVT_ROUTING_VENUES": f"sima=binance@ftp://key:{PW}@venue.internal:9101"}, "ZVT_ROUTING_VENUES"),
    ],
    ids=["other-setting-bad", "redis-url-bad", "dsn-bad", "admin-key-short", "webhook-url-bad", "venue-url-bad"],
)
def test_service_process_when_a_setting_is_invalid_names_it_in_one_line_without_the_password(
    tmp_path: Path, service: str, settings: dict[str, str], variable: str
) -> None:
    code, output = _run([sys.executable, "-m", f"services.{service}"], _env(**settings), tmp_path)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"{service}: invalid setting {variable}:"), output
    assert PW not in output


def test_service_process_when_redis_is_unreachable_logs_the_failure_without_the_password(tmp_path: Path) -> None:
    port = _closed_port()
    env = _env(ZVT_REDIS_URL=f"redis://app:{PW}@127.0.0.1:{port}/0", ZVT_LOG_LEVEL="DEBUG",
               ZVT_REDIS_TIMEOUT_S="1")
    code, output = _run([sys.executable, "-m", "services.risk"], env, tmp_path)
    assert code not in (0, None), output
    assert f"127.0.0.1:{port}" in output  # the failure is still there to read
    assert PW not in output


def test_recorder_process_when_dsn_is_malformed_logs_the_driver_error_without_the_password(
    tmp_path: Path, redis_single_url: str
) -> None:
    # libpq quotes the whole URI in this error, and psycopg's pool logs it on every attempt.
    # (Redis must answer: a service that cannot use Redis stops before it opens the event store.)
    env = _env(
        ZVT_REDIS_URL=redis_single_url, ZVT_BUS_NAMESPACE=f"t{uuid.uuid4().hex[:10]}",
        ZVT_RECORDER_POSTGRES_DSN=f"postgresql://zvt:{PW}@[::1/zvt",
    )
    code, output = _run([sys.executable, "-m", "services.recorder"], env, tmp_path, until="IPv6 host address")
    assert "IPv6 host address" in output, output
    assert "postgresql://zvt:***@[::1/zvt" in output
    assert PW not in output


LOGGING_SCRIPT = textwrap.dedent(
    f"""
    import logging, sys, threading
    from services.core.settings import CoreSettings, load
    from services.core.telemetry import get_logger, setup_logging

    setup_logging(load(CoreSettings, service="probe", log_format=sys.argv[1]))
    log = get_logger("probe")
    log.info("connecting to redis", url="redis://:{PW}@cache.internal:6379/0")
    log.info("opening store", dsn="host=db user=zvt password={PW} dbname=zvt", settings={{"token": "{JWT}"}})
    log.info("posting", urls=["https://hook:{PW}@hooks.example/x"], password="{PW}")
    try:
        raise ConnectionError('cannot connect to "postgresql://zvt:{PW}@db.internal/zvt"')
    except ConnectionError as exc:
        log.exception("store failed")
        log.warning("store failed", error=exc)
        logging.getLogger("psycopg.pool").warning("error connecting: %s", exc, exc_info=True)


    def boom():
        raise ValueError("rediss://u:{PW}@h")

    thread = threading.Thread(target=boom)
    thread.start()
    thread.join()
    raise RuntimeError("crashed with ZVT_HATCHET_TOKEN={JWT}")
    """
)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_logs_when_events_and_exceptions_carry_credentials_render_them_masked(tmp_path: Path, log_format: str) -> None:
    code, output = _run([sys.executable, "-c", LOGGING_SCRIPT, log_format], _env(), tmp_path)
    assert code == 1, output
    for expected in ("connecting to redis", "redis://:***@cache.internal:6379/0", "password=***", "store failed",
                     "postgresql://zvt:***@db.internal/zvt", "error connecting", "https://hook:***@hooks.example/x",
                     "rediss://u:***@h", "RuntimeError: crashed with ZVT_HATCHET_TOKEN=***"):
        assert expected in output, (expected, output)
    assert PW not in output
    assert JWT not in output
