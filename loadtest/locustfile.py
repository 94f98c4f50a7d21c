"""Locust suite for the public HTTP API (ARCHITECTURE section 8).

    python loadtest/run_locust.py --users 50 --spawn-rate 10 --run-time 30s     # headless, reports
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080               # web UI

Settings (environment; ``.zvt/local.env`` fills in what the environment does not set):

``ZVT_API_KEY``           an admin key (the gateway's bootstrap key on a local stack). Each
                          locust process uses it once to PUT the load portfolios (ample
                          balances, generous limits) and to create a trade+read key for them;
                          the simulated users trade with that key, as a real client would.
``LOCUST_PORTFOLIOS``     how many portfolios the users spread over (default 8)
``LOCUST_PORTFOLIO_PREFIX`` their ids' prefix (default ``lt-``); the same prefix reuses them
``LOCUST_THINK``          think time between a user's requests, ``MIN,MAX`` seconds drawn
                          uniformly (default ``0.05,0.25``); ``0,0`` makes every user a
                          closed loop, for saturation runs
``LOCUST_WAIT``           seconds: market orders are also sent with ``?wait=<seconds>`` and
                          recorded as ``POST /v1/orders?wait (order-to-fill)``, whose response
                          time is the time from submission to the filled order; unset or 0: off

The mix, per user (weights): market orders on BTC/USDT, ETH/USDT and SOL/USDT (50);
marketable limit orders 1 % through the mark (20); GET of one of its orders (10); positions
(8); the portfolio's recent orders (4); a resting limit 3 % away, then its cancel (3); an
order over the portfolio's notional limit, which the risk stage rejects (2; the API accepts
it with 202, the rejection is asynchronous). With ``LOCUST_WAIT`` set, market orders are
placed with ``?wait`` instead (and must come back filled) and the risk-rejected ones must
come back ``rejected``.

Every request has a unique ``client_order_id``. Any answer other than the expected one is a
failure: a non-2xx status (a 409 on a cancel only when the order turned terminal first, which
is a race the test accepts), or a 2xx whose body is not what was asked for.
"""

from __future__ import annotations

import itertools
import os
import random
import shlex
import uuid
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import gevent.lock
from locust import FastHttpUser, between, task

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ENV = ROOT / ".zvt" / "local.env"

SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
# Starting marks of the local paper venue; refreshed from the positions answers as they come.
MARKS: dict[str, Decimal] = {"BTC/USDT": Decimal("60000"), "ETH/USDT": Decimal("3000"), "SOL/USDT": Decimal("150")}
QUANTITY = {"BTC/USDT": Decimal("0.001"), "ETH/USDT": Decimal("0.02"), "SOL/USDT": Decimal("0.5")}
# Buys and sells are drawn evenly, so positions stay near flat; balances are ample anyway.
BALANCES = {"USDT": "1000000000", "BTC": "100000", "ETH": "1000000", "SOL": "100000000"}
LIMITS = {
    "max_notional_per_order": "1000000",
    "max_position_per_symbol": "1000000000",
    "price_band": "0.05",
    "max_orders_per_window": 10_000_000,
    "window_seconds": 1,
}
REJECT_QUANTITY = Decimal("100")  # BTC: 6,000,000 notional, over max_notional_per_order


def read_local_env(path: Path = LOCAL_ENV) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``.zvt/local.env`` (as devstack writes it: shell-quoted); {} if absent.

    Like ``devstack.envfile.read_env``, repeated here on purpose: the locustfile stands alone
    (in-cluster locust pods get this one file, not the project)."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        words = shlex.split(value, comments=True)  # devstack writes shlex-quoted values
        out[key.strip()] = words[0] if words else ""
    return out


def setting(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or read_local_env().get(name) or default


WAIT_S = float(setting("LOCUST_WAIT", "0") or 0)
THINK = tuple(float(x) for x in (setting("LOCUST_THINK", "0.05,0.25") or "0.05,0.25").split(","))
PORTFOLIOS = [f"{setting('LOCUST_PORTFOLIO_PREFIX', 'lt-')}{i:03d}" for i in range(int(setting("LOCUST_PORTFOLIOS", "8") or 8))]
RUN_ID = f"{uuid.uuid4().hex[:8]}{os.getpid():x}"
_ids = itertools.count()
_setup_lock = gevent.lock.Semaphore()
_trade_key: list[str] = []


def client_order_id() -> str:
    return f"lt{RUN_ID}-{next(_ids)}"


def limit_price(symbol: str, side: str, through: Decimal) -> str:
    """A price ``through`` (fraction) past the mark: aggressive when positive, resting when negative."""
    factor = Decimal(1) + through if side == "buy" else Decimal(1) - through
    return str((MARKS[symbol] * factor).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


class TraderUser(FastHttpUser):
    """One API client trading on one of the load portfolios."""

    wait_time = between(THINK[0], THINK[-1])
    _user_ids = itertools.count()

    def on_start(self) -> None:
        self.portfolio = PORTFOLIOS[next(self._user_ids) % len(PORTFOLIOS)]
        self.headers = {"Authorization": f"Bearer {self._trade_key()}", "Content-Type": "application/json"}
        self.recent: list[str] = []

    # -- setup, once per locust process ----------------------------------------------------------

    def _trade_key(self) -> str:
        with _setup_lock:
            if not _trade_key:
                _trade_key.append(self._setup())
        return _trade_key[0]

    def _setup(self) -> str:
        admin = setting("ZVT_API_KEY")
        if not admin:
            raise RuntimeError("ZVT_API_KEY (an admin key) is not set, in the environment or in .zvt/local.env")
        headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
        for pid in PORTFOLIOS:
            with self.client.put(
                f"/v1/portfolios/{pid}", json={"base_currency": "USDT", "balances": BALANCES, "limits": LIMITS},
                headers=headers, name="PUT /v1/portfolios/[id] (setup)", catch_response=True,
            ) as resp:
                if resp.status_code not in (200, 201):
                    resp.failure(f"portfolio setup: {resp.status_code} {resp.text[:200]}")
                    raise RuntimeError(f"cannot set up portfolio {pid}: {resp.status_code} {resp.text[:200]}")
        with self.client.post(
            "/v1/api-keys", json={"name": f"locust {RUN_ID}", "portfolios": PORTFOLIOS, "scopes": ["trade", "read"]},
            headers=headers, name="POST /v1/api-keys (setup)", catch_response=True,
        ) as resp:
            if resp.status_code != 201:
                resp.failure(f"api key: {resp.status_code} {resp.text[:200]}")
                raise RuntimeError(f"cannot create a trading key: {resp.status_code} {resp.text[:200]}")
            return str(resp.json()["secret"])

    # -- helpers ---------------------------------------------------------------------------------

    def _order(self, symbol: str, side: str, kind: str, quantity: Decimal, price: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client_order_id": client_order_id(), "portfolio_id": self.portfolio, "symbol": symbol, "side": side,
            "type": kind, "quantity": str(quantity),
        }
        if price is not None:
            body["price"] = price
        return body

    def _submit(self, body: dict[str, Any], name: str, *, wait: float = 0.0, expect: str | None = None) -> dict[str, Any] | None:
        path = f"/v1/orders?wait={wait:g}" if wait else "/v1/orders"
        with self.client.post(path, json=body, headers=self.headers, name=name, catch_response=True) as resp:
            if wait:
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code}: not terminal within {wait:g}s: {resp.text[:200]}")
                    return None
            elif resp.status_code != 202:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return None
            try:
                data: dict[str, Any] = resp.json()
            except ValueError:
                resp.failure("not JSON")
                return None
            if data.get("client_order_id") != body["client_order_id"] or not data.get("order_id"):
                resp.failure(f"wrong order in the answer: {resp.text[:200]}")
                return None
            if expect is not None and data.get("status") != expect:
                resp.failure(f"status {data.get('status')}, expected {expect} ({data.get('reject_code')})")
                return None
        self.recent.append(data["order_id"])
        del self.recent[:-20]
        return data

    # -- the mix ---------------------------------------------------------------------------------

    @task(50)
    def market_order(self) -> None:
        symbol, side = random.choice(SYMBOLS), random.choice(("buy", "sell"))
        body = self._order(symbol, side, "market", QUANTITY[symbol])
        if WAIT_S:
            self._submit(body, "POST /v1/orders?wait (order-to-fill)", wait=WAIT_S, expect="filled")
        else:
            self._submit(body, "POST /v1/orders (market)")

    @task(20)
    def marketable_limit(self) -> None:
        symbol, side = random.choice(SYMBOLS), random.choice(("buy", "sell"))
        body = self._order(symbol, side, "limit", QUANTITY[symbol], limit_price(symbol, side, Decimal("0.01")))
        self._submit(body, "POST /v1/orders (marketable limit)")

    @task(10)
    def get_order(self) -> None:
        if not self.recent:
            return
        order_id = random.choice(self.recent)
        with self.client.get(f"/v1/orders/{order_id}", headers=self.headers, name="GET /v1/orders/[id]",
                             catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            elif resp.json().get("order_id") != order_id:
                resp.failure("another order in the answer")

    @task(8)
    def positions(self) -> None:
        with self.client.get(f"/v1/portfolios/{self.portfolio}/positions", headers=self.headers,
                             name="GET /v1/portfolios/[id]/positions", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for position in resp.json().get("positions", []):
                if position.get("mark") and position.get("symbol") in MARKS:
                    MARKS[position["symbol"]] = Decimal(str(position["mark"]))

    @task(4)
    def recent_orders(self) -> None:
        with self.client.get(f"/v1/portfolios/{self.portfolio}/orders?limit=20", headers=self.headers,
                             name="GET /v1/portfolios/[id]/orders", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(3)
    def rest_then_cancel(self) -> None:
        symbol, side = random.choice(SYMBOLS), random.choice(("buy", "sell"))
        body = self._order(symbol, side, "limit", QUANTITY[symbol], limit_price(symbol, side, Decimal("-0.03")))
        placed = self._submit(body, "POST /v1/orders (resting limit)")
        if placed is None:
            return
        with self.client.delete(f"/v1/orders/{placed['order_id']}", headers=self.headers,
                                name="DELETE /v1/orders/[id]", catch_response=True) as resp:
            if resp.status_code == 409 and '"order_terminal"' in resp.text:
                resp.success()  # the order finished before the cancel: a race, not an error
            elif resp.status_code != 202:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(2)
    def risk_reject(self) -> None:
        side = random.choice(("buy", "sell"))
        body = self._order("BTC/USDT", side, "market", REJECT_QUANTITY)
        if WAIT_S:
            self._submit(body, "POST /v1/orders?wait (risk reject)", wait=WAIT_S, expect="rejected")
        else:
            self._submit(body, "POST /v1/orders (risk reject)")

