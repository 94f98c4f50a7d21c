"""Privileges of API keys against real Redis (single node and cluster): a key never grants
more than its creator holds, revocation stays within the revoker's grant, the bootstrap
admin key stays revoked across restarts, and every route checks its scope and grant (walked
from ``ROUTE_SCOPES``, the table docs/api.md mirrors)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from services.core.bus import Bus
from services.core.codec import decode_any
from services.core.events import EventType
from services.core.redisconn import open_redis
from services.core.settings import BusSettings, CoreSettings
from services.gateway import Gateway, GatewaySettings, create_app
from services.gateway.auth import ROUTE_SCOPES, RouteAccess
from services.gateway.models import Scope
from services.recorder.store import EventStore
from services.workflows.contracts import REBALANCE
from tests.integration.conftest import Target, delete_namespace
from tests.integration.test_gateway_api import ADMIN, AUTH, World, assert_problem, order_body, world_on

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture
async def world(target: Target) -> AsyncIterator[World]:
    async with world_on(target.url, target.cluster) as w:
        yield w


async def make_key(w: World, caller: dict[str, str], portfolios: Any, scopes: list[str]) -> httpx.Response:
    body = {"name": "t", "portfolios": portfolios, "scopes": scopes}
    return await w.http.post("/v1/api-keys", json=body, headers=auth_of(caller))


def auth_of(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


# -- creating keys ------------------------------------------------------------------------------------


async def test_api_key_create_when_grant_exceeds_the_callers_answers_403_and_creates_nothing(world: World) -> None:
    await world.portfolio("p1")
    scoped_admin = await world.key(["p1"], ["admin"])
    index = world.state.api_key_index()
    before = await world.redis.hlen(index)
    for portfolios, scopes in (
        ("*", ["admin"]),            # all portfolios from a key of one
        ("*", ["read"]),
        (["p1", "p2"], ["read"]),    # one portfolio too many
        (["p2"], ["trade"]),
    ):
        r = await make_key(world, scoped_admin, portfolios, scopes)
        assert_problem(r, 403, "forbidden")
    assert await world.redis.hlen(index) == before

    trader = await world.key(["p1"], ["trade", "read"])
    assert_problem(await make_key(world, trader, ["p1"], ["read"]), 403, "forbidden")  # no admin scope


async def test_api_key_create_when_grant_lies_within_the_callers_answers_201(world: World) -> None:
    await world.portfolio("p1")
    scoped_admin = await world.key(["p1", "p2"], ["admin"])
    # admin implies trade and read: a scoped admin may mint them (and admin) within its portfolios
    for portfolios, scopes in ((["p1"], ["trade", "read"]), (["p1", "p2"], ["admin"]), ([], ["read"])):
        r = await make_key(world, scoped_admin, portfolios, scopes)
        assert r.status_code == 201, r.text
        assert r.json()["portfolios"] == portfolios and r.json()["scopes"] == sorted(scopes)
    minted = (await make_key(world, scoped_admin, ["p1"], ["read"])).json()
    got = await world.http.get("/v1/portfolios/p1", headers={"Authorization": f"Bearer {minted['secret']}"})
    assert got.status_code == 200, got.text
    # a global admin may mint anything
    assert (await make_key(world, AUTH, "*", ["admin"])).status_code == 201


# -- revoking keys ----------------------------------------------------------------------------------------


async def test_api_key_revoke_when_outside_the_callers_grant_answers_404_and_the_key_keeps_working(
    world: World,
) -> None:
    await world.portfolio("p1")
    await world.portfolio("p2")
    scoped_admin = await world.key(["p1"], ["admin"])
    other = await world.key(["p2"], ["read"])
    wider = await world.key(["p1", "p2"], ["read"])
    global_reader = await world.key("*", ["read"])
    for victim in ("bootstrap-admin", other["key_id"], wider["key_id"], global_reader["key_id"]):
        r = await world.http.delete(f"/v1/api-keys/{victim}", headers=auth_of(scoped_admin))
        problem = assert_problem(r, 404, "api_key_not_found")
        missing = await world.http.delete("/v1/api-keys/key_0000000000000000", headers=auth_of(scoped_admin))
        # a key outside the grant looks exactly like one that does not exist
        assert problem["detail"].replace(victim, "") == assert_problem(missing, 404, "api_key_not_found")["detail"].replace(
            "key_0000000000000000", "")
    assert (await world.http.get("/v1/portfolios/p1", headers=AUTH)).status_code == 200
    assert (await world.http.get("/v1/portfolios/p2", headers=auth_of(other))).status_code == 200
    assert (await world.http.get("/v1/portfolios/p2", headers=auth_of(wider))).status_code == 200
    assert (await world.http.get("/v1/portfolios/p2", headers=auth_of(global_reader))).status_code == 200


async def test_api_key_revoke_when_within_the_callers_grant_answers_204(world: World) -> None:
    await world.portfolio("p1")
    scoped_admin = await world.key(["p1", "p2"], ["admin"])
    inside = await world.key(["p1"], ["trade", "read"])
    peer = await world.key(["p2"], ["admin"])
    for victim in (inside, peer):
        assert (await world.http.delete(f"/v1/api-keys/{victim['key_id']}", headers=auth_of(scoped_admin))).status_code == 204
        assert_problem(await world.http.get("/v1/portfolios/p1", headers=auth_of(victim)), 401, "unauthorized")
    # a global admin may revoke any key, the scoped admin included
    assert (await world.http.delete(f"/v1/api-keys/{scoped_admin['key_id']}", headers=AUTH)).status_code == 204
    assert_problem(await world.http.get("/v1/portfolios/p1", headers=auth_of(scoped_admin)), 401, "unauthorized")


# -- the bootstrap key across restarts --------------------------------------------------------------------


async def test_bootstrap_key_when_revoked_stays_revoked_across_restarts_until_the_secret_changes(target: Target) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    redis = await open_redis(CoreSettings(redis_url=target.url, redis_cluster=target.cluster))
    bus = Bus(redis, BusSettings(namespace=namespace, shards=4))

    async def started(secret: str) -> tuple[Gateway, httpx.AsyncClient]:
        gw = Gateway(bus, GatewaySettings(admin_api_key=secret, backlog_interval_s=0.05))
        await gw.start()
        return gw, httpx.AsyncClient(transport=httpx.ASGITransport(create_app(gw)), base_url="http://gateway")

    async def status(http: httpx.AsyncClient, secret: str) -> int:
        r = await http.post("/v1/api-keys", json={"name": "probe", "portfolios": ["p1"], "scopes": ["read"]},
                            headers={"Authorization": f"Bearer {secret}"})
        return r.status_code

    rotated = "rotated-admin-secret-for-tests-02"
    try:
        gw, http = await started(ADMIN)
        ops = (await http.post("/v1/api-keys", json={"name": "ops", "portfolios": "*", "scopes": ["admin"]},
                               headers=AUTH)).json()
        ops_auth = {"Authorization": f"Bearer {ops['secret']}"}
        assert (await http.delete("/v1/api-keys/bootstrap-admin", headers=ops_auth)).status_code == 204
        assert await status(http, ADMIN) == 401
        await http.aclose()
        await gw.stop()

        for _ in range(2):  # restarted with the same secret, twice: still revoked
            gw, http = await started(ADMIN)
            assert await status(http, ADMIN) == 401
            assert await status(http, ops["secret"]) == 201
            await http.aclose()
            await gw.stop()

        # an operator rotates the secret: the new one is the bootstrap key, the old stays dead
        gw, http = await started(rotated)
        assert await status(http, rotated) == 201
        assert await status(http, ADMIN) == 401
        await http.aclose()
        await gw.stop()
        gw, http = await started(rotated)  # a plain restart keeps it
        assert await status(http, rotated) == 201
        await http.aclose()
        await gw.stop()
        # going back to the revoked secret does not bring it back either
        gw, http = await started(ADMIN)
        assert await status(http, ADMIN) == 401
        await http.aclose()
        await gw.stop()
    finally:
        await delete_namespace(redis, namespace)
        await redis.aclose()


# -- every route: scope and grant --------------------------------------------------------------------------

Request = tuple[str, str, Any]


class Walk:
    """Resources in a granted portfolio (``pf-a``) and in one the keys under test do not grant
    (``pf-b``), and how to call each route on either."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.orders: dict[str, str] = {}
        self.runs: dict[str, str] = {}
        self.n = 0

    async def setup(self) -> None:
        for pid in ("pf-a", "pf-b"):
            await self.w.portfolio(pid)
            r = await self.w.http.post("/v1/orders", json=order_body(pid, f"seed-{pid}"), headers=AUTH)
            self.orders[pid] = r.json()["order_id"]
            self.runs[pid] = f"run-{pid}-{uuid.uuid4().hex[:8]}"
            await self.w.gw.workflows.runs.queued(self.runs[pid], REBALANCE, pid, self.runs[pid])

    def coid(self) -> str:
        self.n += 1
        return f"walk-{self.n}"

    async def request(self, route: RouteAccess, pid: str) -> Request:
        method, path = route.method, route.path
        if (method, path) == ("POST", "/v1/orders"):
            return method, path, order_body(pid, self.coid())
        if path == "/v1/orders/{order_id}":
            return method, f"/v1/orders/{self.orders[pid]}", None
        if path == "/v1/workflows/{run_id}":
            return method, f"/v1/workflows/{self.runs[pid]}", None
        if path == "/v1/portfolios/{portfolio_id}/rebalance":
            return method, f"/v1/portfolios/{pid}/rebalance", {"targets": {"BTC/USDT": "0.5"}}
        if (method, path) == ("PUT", "/v1/portfolios/{portfolio_id}"):
            return method, f"/v1/portfolios/{pid}", {"balances": {"USDT": "100000"}}
        if (method, path) == ("GET", "/v1/portfolios/{portfolio_id}"):
            return method, f"/v1/portfolios/{pid}", None
        if path == "/v1/portfolios/{portfolio_id}/trading-state":
            return method, f"/v1/portfolios/{pid}/trading-state", {"state": "ACTIVE"}
        if path in ("/v1/portfolios/{portfolio_id}/positions", "/v1/portfolios/{portfolio_id}/orders"):
            return method, path.replace("{portfolio_id}", pid), None
        if path == "/v1/events":
            return method, f"/v1/events?correlation_id={self.orders[pid]}", None
        if (method, path) == ("POST", "/v1/api-keys"):
            return method, path, {"name": "walk", "portfolios": [pid], "scopes": ["read"]}
        if (method, path) == ("DELETE", "/v1/api-keys/{key_id}"):
            victim = await self.w.key([pid], ["read"])
            return method, f"/v1/api-keys/{victim['key_id']}", None
        if path in ("/healthz", "/readyz"):
            return method, path, None
        raise AssertionError(f"no request for {method} {path}: add one to the walk")

    async def send(self, req: Request, key: dict[str, str]) -> httpx.Response:
        method, url, body = req
        return await self.w.http.request(method, url, json=body, headers=auth_of(key))


def lacking(scope: Scope) -> list[str]:
    """A key's scopes with everything but ``scope`` (admin implies all, so it is left out too)."""
    return [s for s in ("trade", "read") if s != scope]


@pytest.fixture
async def event_db(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_routes_when_key_lacks_scope_or_grant_answer_403_or_404_never_2xx(target: Target, event_db: str) -> None:
    async with world_on(target.url, target.cluster, postgres_dsn=event_db) as w:
        walk = Walk(w)
        await walk.setup()
        # the audit trail of pf-b's order, recorded, so hiding it is observable
        stream = w.bus.keys.stream(w.bus.keys.shard_of("pf-b"), EventType.ORDER_REQUESTED)
        recorded = [decode_any(f[b"d"]) for _, f in await w.redis.xrange(stream)]
        store = await EventStore.open(event_db, namespace=w.bus.keys.namespace)
        try:
            await store.migrate()
            await store.append([e for e in recorded if e.portfolio_id == "pf-b"])
        finally:
            await store.close()
        requested = await w.requested()

        checked = 0
        for route in ROUTE_SCOPES:
            if route.scope is None:
                assert route.grant == "none", route
                method, url, body = await walk.request(route, "pf-a")
                r = await w.http.request(method, url, json=body)  # no key at all
                assert r.status_code in (200, 503), (route, r.status_code)
                continue
            where = f"{route.method} {route.path}"
            # 1. every scope but the one the route needs, on every portfolio
            no_scope = await w.key("*", lacking(route.scope))
            r = await walk.send(await walk.request(route, "pf-a"), no_scope)
            assert r.status_code == 403, (where, "without the scope", r.text)
            assert_problem(r, 403, "forbidden")
            # 2. the scope, but not the portfolio the request is about
            no_grant = await w.key(["pf-a"], [route.scope])
            r = await walk.send(await walk.request(route, "pf-b"), no_grant)
            if route.grant == "portfolio" or (route.grant == "within" and route.method == "POST"):
                assert r.status_code == 403, (where, "without the grant", r.text)
                assert_problem(r, 403, "forbidden")
            elif route.grant in ("hidden", "within"):
                assert r.status_code == 404, (where, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
            elif route.grant == "filtered":
                assert r.status_code == 200 and r.json()["events"] == [], (where, r.text)
            else:
                raise AssertionError(f"{where}: unknown grant {route.grant!r}")
            # 3. control: the same request with the scope and the grant is not refused
            allowed = await walk.request(route, "pf-a")
            if route.path == "/v1/events":
                allowed = ("GET", f"/v1/events?correlation_id={walk.orders['pf-b']}", None)
                r = await walk.send(allowed, await w.key(["pf-b"], [route.scope]))
                assert r.status_code == 200 and r.json()["events"], (where, r.text)
            else:
                r = await walk.send(allowed, no_grant)
                expected = 503 if route.path.endswith("/rebalance") else None  # no workflow engine here
                assert (r.status_code == expected) if expected else r.status_code < 300, (where, r.status_code, r.text)
            checked += 1
        assert checked >= 12
        # nothing was published for pf-b by the refused requests
        b_orders = await w.redis.zcard(w.state.orders("pf-b"))
        assert b_orders == 1
        assert await w.requested() == requested + sum(1 for r in ROUTE_SCOPES if r.path == "/v1/orders")


async def test_route_table_when_compared_with_the_app_and_the_docs_names_every_route(redis_single_url: str) -> None:
    async with world_on(redis_single_url, False) as w:
        app = create_app(w.gw)
    # every route the app serves, the included routers' too (FastAPI keeps those as included
    # routers, not copies, in ``app.routes``)
    served = {
        (m, c.path) for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute) for m in c.methods
    }
    table = {(r.method, r.path) for r in ROUTE_SCOPES}
    assert served == table
    # docs/api.md mirrors the table: one row per route, `METHOD path` | scope | grant
    rows = set()
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^\| `(GET|POST|PUT|DELETE) ([^`]+)` \| (`(\w+)`|none) \| `?(\w+)`? \|", line)
        if m:
            rows.add((m[1], m[2], m[4], m[5]))
    assert rows == {(r.method, r.path, r.scope and str(r.scope), r.grant) for r in ROUTE_SCOPES}
