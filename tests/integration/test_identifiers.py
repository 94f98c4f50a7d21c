"""Identifiers cannot collide (issue 11), through the public API against real Redis (single
and cluster) and real PostgreSQL: ids and symbols match their pattern in full, key parts
cannot be forged with a separator, bytes that are not UTF-8 are a 4xx, and the audit trail
is this deployment's own."""

from __future__ import annotations

import contextlib
import re
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from services.core.codec import decode_any
from services.core.events import Event, EventType, OrderRejected
from services.core.keys import shard_of
from services.recorder.store import EventStore
from tests.integration.test_gateway_api import AUTH, World, assert_problem, order_body, world_on
from tests.integration.test_gateway_process import ADMIN as PROCESS_ADMIN
from tests.integration.test_gateway_process import gateway  # noqa: F401  (the real process, a fixture)

SHARDS = 4  # world_on's bus


@pytest.fixture
async def world(redis_single_url: str) -> AsyncIterator[World]:
    async with world_on(redis_single_url, False) as w:
        yield w


# -- 1. ids, symbols, assets, decimals and names match their pattern in full ------------------------


@pytest.mark.parametrize(
    "field", ["client_order_id", "portfolio_id", "symbol", "venue", "quantity", "price"],
)
async def test_order_when_a_field_ends_with_a_newline_answers_422_naming_that_field(world: World, field: str) -> None:
    await world.portfolio("pf-1")
    body = order_body(type="limit", price="100", venue="paper")
    body[field] = f"{body[field]}\n"
    problem = assert_problem(await world.http.post("/v1/orders", json=body, headers=AUTH), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert await world.requested() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base_currency": "USDT\n"}, "base_currency"),
        ({"balances": {"USDT\n": "1"}}, "balances"),
        ({"balances": {"USDT": "1\n"}}, "balances"),  # a map value: msgspec names the map
        ({"limits": {"price_band": "0.1\n"}}, "limits.price_band"),
    ],
)
async def test_portfolio_when_a_field_or_key_ends_with_a_newline_answers_422(
    world: World, body: dict[str, Any], field: str
) -> None:
    problem = assert_problem(await world.http.put("/v1/portfolios/pf-1", json=body, headers=AUTH), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert_problem(await world.http.get("/v1/portfolios/pf-1", headers=AUTH), 404, "portfolio_not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "desk\n", "portfolios": ["pf-1"], "scopes": ["read"]}, "name"),
        ({"name": "desk", "portfolios": ["pf-1\n"], "scopes": ["read"]}, "portfolios"),
    ],
)
async def test_api_key_when_name_or_portfolio_ends_with_a_newline_answers_422(
    world: World, body: dict[str, Any], field: str
) -> None:
    problem = assert_problem(await world.http.post("/v1/api-keys", json=body, headers=AUTH), 422, "validation_error")
    assert problem["errors"][0]["field"].split(".")[0] == field


async def test_rebalance_when_a_target_symbol_ends_with_a_newline_answers_422(world: World) -> None:
    await world.portfolio("pf-1")
    r = await world.http.post("/v1/portfolios/pf-1/rebalance", json={"targets": {"BTC/USDT\n": "0.5"}}, headers=AUTH)
    assert assert_problem(r, 422, "validation_error")["errors"][0]["field"] == "targets"


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/v1/portfolios/pf-1%0A", "portfolio_id"),
        ("GET", "/v1/portfolios/pf-1%0A/orders", "portfolio_id"),
        ("GET", "/v1/orders/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f0001%0A", "order_id"),
        ("DELETE", "/v1/orders/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f0001%0A", "order_id"),
        ("GET", "/v1/orders/has%20space", "order_id"),
        ("GET", "/v1/workflows/run-1%0A", "run_id"),
        ("DELETE", "/v1/api-keys/key_0123%0A", "key_id"),
        ("DELETE", "/v1/api-keys/key%7B0%7D", "key_id"),
        ("GET", "/v1/events?correlation_id=c-1%0A", "correlation_id"),
    ],
)
async def test_path_or_query_id_when_not_a_full_match_answers_422_naming_it(
    world: World, method: str, path: str, field: str
) -> None:
    await world.portfolio("pf-1")
    r = await world.http.request(method, path, headers=AUTH)
    assert [e["field"] for e in assert_problem(r, 422, "validation_error")["errors"]] == [field]


def _patterns(node: Any, where: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                found.append((where, value))
            else:
                found.extend(_patterns(value, f"{where}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_patterns(value, f"{where}/{i}"))
    return found


async def test_openapi_when_served_every_pattern_is_anchored_ecma262_and_matches_in_full(world: World) -> None:
    doc = (await world.http.get("/openapi.json")).json()
    patterns = _patterns(doc)
    assert len(patterns) >= 10
    for where, pattern in patterns:
        # ECMA-262 (JSON Schema) has no \Z, \A or \z; ^ and $ anchor the whole input there
        assert pattern.startswith("^") and pattern.endswith("$"), where
        assert not re.search(r"\\[AZz]|\(\?P|\(\?[aiLmsux]", pattern), (where, pattern)
        # read with JSON Schema's meaning ($: end of input), it accepts no trailing newline
        exact = re.compile(pattern[:-1] + r"\Z")
        assert not exact.search("A1\n") and not exact.search("BTC/USDT\n") and not exact.search("1\n"), where
    ids = {p for w, p in patterns if "/parameters/" in w}
    assert ids == {r"^[A-Za-z0-9._:-]{1,64}$"}, ids
    params = {
        (path, param["name"])
        for path, ops in doc["paths"].items() for op in ops.values() for param in op.get("parameters", [])
        if param["name"].endswith("_id")
    }
    with_pattern = {
        (path, param["name"])
        for path, ops in doc["paths"].items() for op in ops.values() for param in op.get("parameters", [])
        if param["name"].endswith("_id") and "pattern" in param["schema"]
    }
    assert params == with_pattern and ("/v1/orders/{order_id}", "order_id") in params


# -- 2. key separators cannot be forged ----------------------------------------------------------------


def _same_shard_pair() -> tuple[str, str]:
    """Two portfolio ids where one is the other plus ``:5``, in the same shard."""
    for n in range(10_000):
        a = f"acme-{n}"
        if shard_of(a, SHARDS) == shard_of(f"{a}:5", SHARDS):
            return a, f"{a}:5"
    raise AssertionError("no pair")


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_orders_when_portfolio_ids_differ_by_a_separator_never_share_a_client_order_key(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_single_url" if kind == "single" else "redis_cluster_url")
    a, b = _same_shard_pair()
    async with world_on(url, kind == "cluster") as w:
        await w.portfolio(a)
        await w.portfolio(b)
        tenant_a = await w.key([a], ["trade", "read"])
        tenant_b = await w.key([b], ["trade", "read"])
        # a's ("5:x") and b's ("x") would both be coid:acme-N:5:x under an unescaped join
        ra = await w.http.post("/v1/orders", json=order_body(a, "5:x"), headers=tenant_a)
        rb = await w.http.post("/v1/orders", json=order_body(b, "x"), headers=tenant_b)
        assert ra.status_code == 202, ra.text
        assert rb.status_code == 202, rb.text  # not tenant a's order, not a 409
        oa, ob = ra.json()["order_id"], rb.json()["order_id"]
        assert oa != ob
        # and in the other order: b's second order first, then a's
        rb2 = await w.http.post("/v1/orders", json=order_body(b, "y"), headers=tenant_b)
        ra2 = await w.http.post("/v1/orders", json=order_body(a, "5:y"), headers=tenant_a)
        assert (rb2.status_code, ra2.status_code) == (202, 202), (rb2.text, ra2.text)
        # each tenant's repeat finds its own order
        again_a = await w.http.post("/v1/orders", json=order_body(a, "5:x"), headers=tenant_a)
        again_b = await w.http.post("/v1/orders", json=order_body(b, "x"), headers=tenant_b)
        assert (again_a.status_code, again_a.json()["order_id"]) == (200, oa)
        assert (again_b.status_code, again_b.json()["order_id"]) == (200, ob)
        # each sees its own orders only
        mine_a = (await w.http.get(f"/v1/portfolios/{a}/orders", headers=tenant_a)).json()["orders"]
        mine_b = (await w.http.get(f"/v1/portfolios/{b}/orders", headers=tenant_b)).json()["orders"]
        assert {o["client_order_id"] for o in mine_a} == {"5:x", "5:y"}
        assert {o["client_order_id"] for o in mine_b} == {"x", "y"}
        assert all(o["portfolio_id"] == a for o in mine_a) and all(o["portfolio_id"] == b for o in mine_b)
        assert_problem(await w.http.get(f"/v1/orders/{ob}", headers=tenant_a), 404, "order_not_found")
        assert_problem(await w.http.get(f"/v1/orders/{oa}", headers=tenant_b), 404, "order_not_found")
        assert await w.requested() == 4


# -- 3. bytes that are not UTF-8 are a 4xx, never a 500 ----------------------------------------------

BAD_BODIES = {
    "bom-like bytes": b"\xff\xfe",
    "invalid utf-8 in a string": b'{"client_order_id": "\xff\xfe", "name": "\xff\xfe", "state": "\xff\xfe"}',
    "truncated utf-8 in a string": b'{"base_currency": "\xc3"}',
    "encoded surrogate in a string": b'{"base_currency": "\xed\xa0\x80", "name": "\xed\xa0\x80"}',
    "invalid utf-8 in a key": b'{"\xff\xfe": 1}',
    "invalid utf-8 in a map key": b'{"balances": {"\xff": "1"}, "targets": {"\xff": "1"}}',
    "lone surrogate escape": b'{"client_order_id": "\\ud800", "name": "\\ud800", "state": "\\udc00"}',
    "lone surrogate escape in a key": b'{"\\ud800": 1, "balances": {"\\udfff": "1"}, "targets": {"\\ud800x": "1"}}',
}

BODY_ROUTES = [
    ("POST", "/v1/orders"),
    ("POST", "/v1/orders?durable=false"),
    ("PUT", "/v1/portfolios/pf-1"),
    ("PUT", "/v1/portfolios/pf-1/trading-state"),
    ("POST", "/v1/portfolios/pf-1/rebalance"),
    ("POST", "/v1/api-keys"),
]


def assert_client_error(r: httpx.Response) -> None:
    assert r.status_code in (400, 422), (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == r.status_code and body["code"] in ("malformed_json", "validation_error"), body


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("name", list(BAD_BODIES))
async def test_body_when_not_utf8_or_a_lone_surrogate_answers_4xx_problem(
    world: World, method: str, path: str, name: str
) -> None:
    await world.portfolio("pf-1")
    r = await world.http.request(
        method, path, content=BAD_BODIES[name], headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_client_error(r)
    assert await world.requested() == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/portfolios/%FF%FE"),
        ("PUT", "/v1/portfolios/%ED%A0%80"),
        ("GET", "/v1/portfolios/pf-%C3/orders"),
        ("GET", "/v1/portfolios/pf-1/orders?status=%FF"),
        ("GET", "/v1/portfolios/pf-1/orders?limit=%ED%A0%80"),
        ("GET", "/v1/orders/%FF"),
        ("DELETE", "/v1/orders/%ED%A0%80"),
        ("GET", "/v1/workflows/%FF"),
        ("DELETE", "/v1/api-keys/%FF"),
        ("GET", "/v1/events?correlation_id=%FF%FE"),
        ("GET", "/v1/events?correlation_id=%ED%A0%80"),
        ("POST", "/v1/orders?wait=%FF"),
        ("POST", "/v1/orders?durable=%ED%A0%80"),
    ],
)
async def test_path_or_query_when_not_utf8_answers_422_problem(world: World, method: str, path: str) -> None:
    await world.portfolio("pf-1")
    kwargs: dict[str, Any] = {"json": order_body()} if method == "POST" else {}
    if method == "PUT":
        kwargs = {"json": {}}
    r = await world.http.request(method, path, headers=AUTH, **kwargs)
    # the server decodes them to U+FFFD, which no pattern (or enum, or number) accepts
    assert_problem(r, 422, "validation_error")
    assert await world.requested() == 0


@pytest.mark.parametrize("authorization", [b"Bearer \xff\xfe", b"Bearer zvt_\xed\xa0\x80", b"Bearer \xc3"])
async def test_authorization_when_not_utf8_answers_401(world: World, authorization: bytes) -> None:
    await world.portfolio("pf-1")
    headers = {"Authorization": authorization}
    assert_problem(await world.http.get("/v1/portfolios/pf-1", headers=headers), 401, "unauthorized")
    assert_problem(await world.http.post("/v1/orders", json=order_body(), headers=headers), 401, "unauthorized")


def _raw(base: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as is (no client would build it) and read the status and content type."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    content_type = next((line.split(b":", 1)[1].strip() for line in head if line.lower().startswith(b"content-type:")), b"")
    return int(head[0].split()[1]), content_type


@pytest.mark.parametrize(
    "target",
    [b"/v1/portfolios/\xff\xfe", b"/v1/portfolios/pf-1/orders?status=\xff", b"/v1/events?correlation_id=\xed\xa0\x80",
     b"/v1/orders/%FF", b"/v1/events?correlation_id=%ED%A0%80"],
)
def test_gateway_process_when_request_target_is_not_utf8_answers_400_or_422(gateway: str, target: bytes) -> None:
    # raw bytes outside ASCII are not HTTP: the server's parser answers 400 before the app;
    # percent-encoded ones reach the app and fail the parameter's pattern
    status, content_type = _raw(gateway, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                + PROCESS_ADMIN.encode() + b"\r\nConnection: close\r\n\r\n")
    assert status in (400, 422), status
    if b"%" in target:
        assert (status, content_type) == (422, b"application/problem+json")


def test_gateway_process_when_order_body_is_not_utf8_answers_422_problem(gateway: str) -> None:
    body = b'{"client_order_id": "\xff", "portfolio_id": "\xed\xa0\x80"}'
    status, content_type = _raw(
        gateway,
        b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + PROCESS_ADMIN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
    )
    assert (status, content_type) == (422, b"application/problem+json")


# -- 4. the audit trail is this deployment's own ------------------------------------------------------


@pytest.fixture
async def event_db(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def store_of(dsn: str, namespace: str) -> AsyncIterator[EventStore]:
    store = await EventStore.open(dsn, namespace=namespace)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


async def test_events_when_two_namespaces_share_a_database_each_gateway_sees_only_its_own(
    redis_single_url: str, event_db: str
) -> None:
    async with world_on(redis_single_url, False, postgres_dsn=event_db) as one, \
            world_on(redis_single_url, False, postgres_dsn=event_db) as two:
        await one.portfolio("pf-1")
        order_id = (await one.http.post("/v1/orders", json=order_body(), headers=AUTH)).json()["order_id"]
        stream = one.bus.keys.stream(one.bus.keys.shard_of("pf-1"), EventType.ORDER_REQUESTED)
        ours: Event[Any] = decode_any((await one.redis.xrange(stream))[0][1][b"d"])
        p = ours.payload
        # the other deployment has an event with the same correlation id (same portfolio name too)
        theirs = Event.new(
            OrderRejected(order_id=order_id, client_order_id=p.client_order_id, reason_code="UNKNOWN_SYMBOL",
                          reason="-", stage="risk"),
            portfolio_id="pf-1", correlation_id=order_id,
        )
        async with store_of(event_db, one.bus.keys.namespace) as store:
            await store.append([ours])
        async with store_of(event_db, two.bus.keys.namespace) as store:
            await store.append([theirs])
        seen_one = (await one.http.get(f"/v1/events?correlation_id={order_id}", headers=AUTH)).json()["events"]
        seen_two = (await two.http.get(f"/v1/events?correlation_id={order_id}", headers=AUTH)).json()["events"]
        assert [e["event"]["event_id"] for e in seen_one] == [str(ours.event_id)]
        assert [e["event"]["event_id"] for e in seen_two] == [str(theirs.event_id)]
        # and the store's own lookups are scoped the same way
        async with store_of(event_db, one.bus.keys.namespace) as store:
            assert [s.event.event_id for s in await store.events_for_correlation(order_id)] == [ours.event_id]
            assert [s.event.event_id for s in await store.events_for_order(order_id)] == [ours.event_id]
