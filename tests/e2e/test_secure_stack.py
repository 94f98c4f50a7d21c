"""The fleet as production runs it: Redis with a password (``requirepass``, as ``python -m devstack
start --redis-password`` runs it, and an ACL user without administrative commands), the gateway
reading the event store as a read-only role. Real processes against a private password-protected redis-server and a private
PostgreSQL (the shared servers stay as they are): orders placed over HTTP fill end to end, the
audit trail is read through the read-only role, which cannot write."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from devstack import stack
from devstack.fleet import Fleet, logged
from services.client import AsyncClient, OrderRequest
from tests.e2e.conftest import ROOT, stack_env
from tests.integration.conftest import Target

D = Decimal
PW = "e2e-redis-password-" + uuid.uuid4().hex[:8]
ADMIN = "e2e-admin-" + uuid.uuid4().hex
READER, READER_PW = "zvt_reader", "reader-" + uuid.uuid4().hex[:8]
SERVICES = ["risk", "order", "routing", "portfolio", "recorder", "gateway"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_fleet_when_redis_needs_a_password_and_gateway_reads_as_reader_places_orders(tmp_path: Path) -> None:
    port = _free_port()
    stack.start_redis_server(port, tmp_path / "redis", ["--requirepass", PW])
    pg = stack.ThrowawayPostgres.create()
    fleet: Fleet | None = None
    try:
        with pytest.raises(stack.DevstackError, match="NOAUTH"):  # it really wants the password
            stack.redis_cli(port, "PING", password="")
        pg._psql(f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PW}'")
        reader_dsn = f"postgresql://{READER}:{READER_PW}@{stack.HOST}:{pg.port}/{stack.POSTGRES_DB}"
        namespace = f"s{uuid.uuid4().hex[:10]}"
        env = stack_env(
            Target("single", f"redis://{stack.HOST}:{port}/0"), namespace, pg.dsn,
            ZVT_REDIS_PASSWORD=PW, ZVT_GATEWAY_ADMIN_API_KEY=ADMIN,
            ZVT_GATEWAY_POSTGRES_DSN=reader_dsn, ZVT_RECORDER_READER_ROLE=READER,
        )
        fleet = Fleet(env, log_dir=tmp_path / "logs")
        procs = fleet.start(SERVICES[:4])
        # the recorder and the gateway as an ACL user without administrative commands
        # (docs/operations.md): the fleet needs none of them
        stack.redis_cli(port, "ACL", "SETUSER", "zvt-fleet", "on", f">{PW}-acl", "~*", "&*", "+@all", "-@dangerous",
                        password=PW)
        procs += fleet.start(SERVICES[4:], env={"ZVT_REDIS_USERNAME": "zvt-fleet", "ZVT_REDIS_PASSWORD": f"{PW}-acl"})
        gateway = next(p for p in procs if p.name == "gateway")
        api = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
        async with AsyncClient(f"http://127.0.0.1:{api}", ADMIN) as client:
            await client.put_portfolio("pf-secure", balances={"USDT": D("100000"), "ETH": D("10")})
            results = await asyncio.gather(
                client.place_order(OrderRequest(portfolio_id="pf-secure", symbol="BTC/USDT", side="buy",
                                                quantity=D("0.01")), wait=20),
                client.place_order(OrderRequest(portfolio_id="pf-secure", symbol="ETH/USDT", side="sell",
                                                quantity=D("0.5")), wait=20),
            )
            assert [r.status for r in results] == ["filled", "filled"], results
            # the audit trail, read by the gateway as the read-only role the recorder granted
            types: list[str] = []
            for _ in range(200):
                types = [e["event"]["event_type"] for e in await client.events(results[0].correlation_id)]
                if "portfolio.updated" in types:
                    break
                await asyncio.sleep(0.05)
            assert types[:3] == ["order.requested", "order.validated", "order.created"], types
            assert "portfolio.updated" in types
        # the read-only role reads, and can change nothing
        async with await psycopg.AsyncConnection.connect(reader_dsn, autocommit=True) as conn:
            count = await (await conn.execute("SELECT count(*) FROM zvt_events WHERE namespace = %s", (namespace,))).fetchone()
            assert count is not None and count[0] > 0
            for statement in (
                "DELETE FROM zvt_events",
                "UPDATE zvt_events SET route = 'x'",
                "INSERT INTO zvt_events SELECT * FROM zvt_events LIMIT 1",
                "TRUNCATE zvt_events",
                "DROP TABLE zvt_events",
                "CREATE TABLE zvt_sneaky (x int)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await conn.execute(statement)
        # a reader role that does not exist stops a recorder at start, saying so
        bad = subprocess.run(
            [sys.executable, "-m", "services.recorder"], cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, **env, "ZVT_HTTP_PORT": "0", "ZVT_RECORDER_READER_ROLE": "nobody_here"},
        )
        assert bad.returncode == 2, bad.stdout + bad.stderr
        last = (bad.stdout + bad.stderr).strip().splitlines()[-1]
        assert last.startswith("recorder: ZVT_RECORDER_READER_ROLE 'nobody_here': role \"nobody_here\" does not exist"), last
        assert PW not in bad.stdout + bad.stderr
    finally:
        if fleet is not None:
            fleet.stop()
        pg.remove()
        stack.stop_redis_server(port, tmp_path / "redis")
