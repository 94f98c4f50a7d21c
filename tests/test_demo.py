"""What `make up` runs: the main job (``python -m services.demo``) against the fleet as real
processes, and the fleet's command line (``python -m devstack fleet``)."""

from __future__ import annotations

import argparse
import collections
import os
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from devstack import stack
from devstack.__main__ import FLEET_NAMES, WEBHOOKS, fleet_environment, read_env
from devstack.fleet import Fleet
from services.demo.plan import MIN_ORDERS, PRICE_GUESS, Kind, balances_for, build_plan, seed_orders

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((stack.HOST, 0))
        return int(sock.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ZVT_ setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ZVT_")}, **extra}


def _delete_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


# -- the order mix ------------------------------------------------------------------------------


def test_plan_when_built_has_every_kind_counts_add_up_and_is_repeatable() -> None:
    plan = build_plan("r1", 40, 3, PRICE_GUESS, seed=7)

    kinds = collections.Counter(p.kind for p in plan.orders)
    assert len(plan.orders) == 40 - len(seed_orders("r1", plan.active[0]))
    assert set(kinds) == set(Kind) - {Kind.SEED}
    assert kinds[Kind.REJECT_NOTIONAL] == kinds[Kind.REJECT_SYMBOL] == kinds[Kind.REJECT_HALTED] >= 1
    assert all(p.request.portfolio_id == plan.halted for p in plan.orders if p.kind is Kind.REJECT_HALTED)
    assert len({p.request.client_order_id for p in plan.orders}) == len(plan.orders)
    assert build_plan("r1", 40, 3, PRICE_GUESS, seed=7) == plan
    with pytest.raises(ValueError):
        build_plan("r1", MIN_ORDERS - 1, 3, PRICE_GUESS)


def test_plan_limit_prices_when_marketable_cross_the_mark_and_when_resting_stay_away_within_the_band() -> None:
    marks = {s: Decimal(p) for s, p in (("BTC/USDT", "50000"), ("ETH/USDT", "2000"), ("SOL/USDT", "100"))}
    plan = build_plan("r2", 200, 2, marks)

    for p in plan.orders:
        r = p.request
        if p.kind not in (Kind.LIMIT, Kind.RESTING):
            continue
        assert r.price is not None
        distance = (r.price - marks[r.symbol]) / marks[r.symbol]
        crosses = distance > 0 if r.side == "buy" else distance < 0
        assert crosses is (p.kind is Kind.LIMIT)
        assert abs(distance) < Decimal("0.05")  # the default price band


def test_balances_when_computed_cover_every_order_of_the_portfolio() -> None:
    plan = build_plan("r3", 300, 2, PRICE_GUESS)
    orders = [*seed_orders("r3", plan.active[0]), *plan.orders]

    for portfolio in plan.active:
        funds = balances_for(portfolio, orders, PRICE_GUESS)
        mine = [p.request for p in orders if p.request.portfolio_id == portfolio and p.kind.expected_status != "rejected"]
        sells: dict[str, Decimal] = collections.defaultdict(Decimal)
        for r in mine:
            if r.side == "sell":
                sells[r.symbol.split("/")[0]] += r.quantity
        assert all(funds[asset] >= amount for asset, amount in sells.items())
        assert funds["USDT"] >= sum(r.quantity * PRICE_GUESS[r.symbol] for r in mine if r.side == "buy")


# -- the main job against the fleet -------------------------------------------------------------


@pytest.fixture
def demo_fleet(redis_single_url: str, postgres_dsn: str, hatchet_env: dict[str, str],
               tmp_path: Path) -> Iterator[dict[str, str]]:
    """Every service and the webhook receiver as processes, with the environment `make up`
    writes, on the single Redis in a namespace of their own and free ports."""
    namespace = f"demo{uuid.uuid4().hex[:8]}"
    options = argparse.Namespace(redis="single", namespace=namespace, gateway_port=_free_port(),
                                 webhook_port=_free_port())
    env, local = fleet_environment(options, tmp_path, {}, {}, {})
    assert env["ZVT_HATCHET_TOKEN"] == hatchet_env["ZVT_HATCHET_TOKEN"]  # make up's worker finds the engine
    env["ZVT_HATCHET_NAMESPACE"] = f"{namespace}_"
    # no schedules left behind in the shared engine for a namespace that goes away
    env["ZVT_WORKFLOWS_RISK_MONITOR_CRON"] = env["ZVT_WORKFLOWS_RECONCILE_CRON"] = ""
    fleet = Fleet(env, log_dir=tmp_path / "logs")
    try:
        fleet.start(FLEET_NAMES)
        yield local
    finally:
        fleet.stop()
        _delete_namespace(redis_single_url, namespace)


def test_demo_when_run_against_the_fleet_places_every_kind_of_order_and_exits_0(
    demo_fleet: dict[str, str], tmp_path: Path
) -> None:
    env = _clean_env(ZVT_API_KEY=demo_fleet["ZVT_API_KEY"], ZVT_WEBHOOK_SINK_URL=demo_fleet["ZVT_WEBHOOK_SINK_URL"])

    done = subprocess.run(
        [sys.executable, "-m", "services.demo", "--orders", "40", "--portfolios", "3", "--concurrency", "8",
         "--url", demo_fleet["ZVT_GATEWAY_URL"], "--env-file", str(tmp_path / "absent.env"), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )

    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    by_status = next(line for line in out.splitlines() if "by status:" in line)
    assert "filled" in by_status and "rejected" in by_status and "canceled" in by_status
    for code in ("MAX_NOTIONAL", "UNKNOWN_SYMBOL", "TRADING_HALTED"):
        assert code in out
    assert "orders: 40 in" in out
    assert "submit -> terminal status (n=" in out and "p99" in out
    assert "positions:" in out and "BTC/USDT" in out
    assert f"gateway: {demo_fleet['ZVT_GATEWAY_URL']}" in out and "$ZVT_API_KEY" in out
    assert "webhooks:" in out
    assert out.rstrip().endswith("demo: ok, every order ended as planned")


def test_demo_when_the_gateway_does_not_answer_says_so_and_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.demo", "--url", f"http://127.0.0.1:{_free_port()}", "--api-key", "k" * 20,
         "--env-file", str(tmp_path / "absent.env"), "--ready-timeout", "0.5", "--no-progress"],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )

    assert done.returncode == 2
    assert "is not ready" in done.stdout and "make up" in done.stdout


# -- python -m devstack fleet --------------------------------------------------------------------


def _fleet_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", "fleet", "--state-dir", str(state), *args],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120,
    )


def _states(output: str) -> dict[str, str]:
    return {line.split()[0]: line.split(None, 1)[1] for line in output.splitlines() if line.split()[:1] != ["gateway:"]}


def test_fleet_cli_when_started_twice_leaves_running_services_alone_and_keeps_the_key(
    redis_single_url: str, postgres_dsn: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    namespace = f"cli{uuid.uuid4().hex[:8]}"
    gateway_port = _free_port()
    start = ("start", "--redis", "single", "--namespace", namespace, "--gateway-port", str(gateway_port),
             "--webhook-port", str(_free_port()), "--only", "risk", "--only", WEBHOOKS)
    try:
        before = _fleet_cli(state, "status")
        assert before.returncode == 0, before.stderr
        assert _states(before.stdout) == dict.fromkeys(FLEET_NAMES, "stopped")

        first = _fleet_cli(state, *start)
        assert first.returncode == 0, first.stderr
        assert _states(first.stdout)["risk"].startswith("started (pid ")
        local = read_env(state / "local.env")
        fleet_env = read_env(state / "fleet.env")
        for path in (state / "local.env", state / "fleet.env"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert local["ZVT_GATEWAY_URL"] == f"http://127.0.0.1:{gateway_port}"
        assert len(local["ZVT_API_KEY"]) >= 16 and fleet_env["ZVT_GATEWAY_ADMIN_API_KEY"] == local["ZVT_API_KEY"]
        assert fleet_env["ZVT_BUS_NAMESPACE"] == namespace and fleet_env["ZVT_REDIS_CLUSTER"] == "false"
        assert fleet_env["ZVT_REDIS_URL"] == redis_single_url

        second = _fleet_cli(state, *start)
        assert second.returncode == 0, second.stderr
        pid = _states(first.stdout)["risk"].split("pid ")[1].split(",")[0]
        assert _states(second.stdout)["risk"] == f"already running (pid {pid})"
        assert read_env(state / "local.env")["ZVT_API_KEY"] == local["ZVT_API_KEY"]
        assert "warning" not in second.stdout

        running = _fleet_cli(state, "status")
        states = _states(running.stdout)
        assert states["risk"] == f"running (pid {pid})" and states[WEBHOOKS].startswith("running")
        assert states["gateway"] == "stopped"

        stopped = _fleet_cli(state, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert _states(stopped.stdout) == {"risk": "stopped", WEBHOOKS: "stopped"}
        assert _states(_fleet_cli(state, "status").stdout) == dict.fromkeys(FLEET_NAMES, "stopped")
    finally:
        _fleet_cli(state, "stop")
        _delete_namespace(redis_single_url, namespace)

