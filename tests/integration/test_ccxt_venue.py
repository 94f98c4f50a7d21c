"""The ccxt adapter, with ccxt's own binance client unmodified, against a real simulated venue
server process (``python -m services.venues.sim``): the order flow, the signing check, an
accepted-then-timed-out submit resolved by client order id with no duplicate, a dropped
connection, 429 opening the shared breaker and recovering, and an order the store never saw
found among the open orders (what the reconcile workflow relies on)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from devstack.fleet import start_venue
from services.core.keys import Keys
from services.core.redisconn import AnyRedis, open_redis
from services.core.settings import CoreSettings
from services.trading import OrderType, Side, TimeInForce
from services.venues.base import (
    OrderNotFound,
    RateLimited,
    VenueOrderRequest,
    VenueOrderStatus,
    VenueUnavailable,
)
from services.venues.ccxt import CcxtVenue, CcxtVenueConfig, close_shared_clients

D = Decimal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sim:
    def __init__(self, name: str, port: int) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def orders(self, client_order_id: str) -> list[dict[str, Any]]:
        return [o for o in self.control("/sim/orders")["orders"] if o["clientOrderId"] == client_order_id]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    port = _free_port()
    name = f"sim{uuid.uuid4().hex[:6]}"
    proc = start_venue(name, port, tmp_path, ["--taker-fee", "0.001", "--maker-fee", "0.0005"])
    try:
        yield Sim(name, port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def shared_redis(redis_single_url: str) -> AsyncIterator[AnyRedis]:
    client = await open_redis(CoreSettings(redis_url=redis_single_url))
    yield client
    await client.aclose()


@pytest.fixture
async def venue(sim: Sim, shared_redis: AnyRedis) -> AsyncIterator[CcxtVenue]:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}", 1)
    v = CcxtVenue(
        CcxtVenueConfig(name=sim.name, api_key="sim-key", secret="sim-secret", api_url=sim.url, timeout_s=1.0,
                        breaker_cooldown_s=1.0, resolve_s=5.0),
        redis=shared_redis, keys=keys,
    )
    yield v
    await close_shared_clients()
    await shared_redis.delete(*[k async for k in shared_redis.scan_iter(match=f"{keys.namespace}:*")] or ["-"])


def _order(coid: str, side: Side = Side.BUY, quantity: str = "0.01", price: str | None = None,
           tif: TimeInForce = TimeInForce.GTC) -> VenueOrderRequest:
    return VenueOrderRequest(
        client_order_id=coid, symbol="BTC/USDT", side=side,
        order_type=OrderType.LIMIT if price else OrderType.MARKET, quantity=D(quantity),
        price=D(price) if price else None, time_in_force=tif,
    )


async def test_ccxt_order_flow_when_trading_against_the_sim_server_matches_the_paper_engine(
    venue: CcxtVenue, sim: Sim
) -> None:
    before = sim.control("/sim/health")["requests"]
    markets = await venue.markets()
    # Our client's options keep it to exchangeInfo and the trading fees (ccxt's defaults: seven and one).
    assert sim.control("/sim/health")["requests"] - before == 2
    # Every API URL is the server's, so nothing goes to the real exchange's hosts.
    assert all(url.startswith(sim.url + "/") for url in venue.client.urls["api"].values())
    assert set(markets) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
    btc = markets["BTC/USDT"]
    assert (btc.price_step, btc.quantity_step, btc.taker_fee, btc.maker_fee) == (D("0.01"), D("0.00001"), D("0.001"), D("0.0005"))
    ticker = await venue.ticker("BTC/USDT")
    assert ticker.bid is not None and ticker.ask is not None and ticker.bid < D(60000) < ticker.ask
    book = await venue.order_book("BTC/USDT", 3)
    assert len(book.asks) == 3 and book.asks[0].price == ticker.ask and book.asks[0].price < book.asks[1].price

    # A market buy bigger than the first level walks the book; the amount is floored to the step.
    first = book.asks[0]
    size = first.quantity + D("0.5")
    filled = await venue.submit(_order("flow-1", quantity=str(size + D("0.000004"))))
    assert filled.status is VenueOrderStatus.FILLED and filled.filled_quantity == size
    assert [f.price for f in filled.fills] == [first.price, book.asks[1].price]
    assert filled.fees == sum((f.quantity * f.price * D("0.001") for f in filled.fills), D(0))
    assert filled.client_order_id == "flow-1"

    # A limit buy below the market rests, shows among the open orders and is found by either id.
    resting = await venue.submit(_order("flow-2", price="59000.004"))
    assert resting.status is VenueOrderStatus.OPEN and resting.price == D("59000.00")
    assert [o.client_order_id for o in await venue.open_orders("BTC/USDT")] == ["flow-2"]
    by_client = await venue.fetch_order("BTC/USDT", client_order_id="flow-2")
    assert by_client.venue_order_id == resting.venue_order_id
    # The market falls through it: it fills as maker at its own price.
    assert sim.control("/sim/price", {"symbol": "BTC/USDT", "price": "58900"})["filled"] == ["flow-2"]
    done = await venue.fetch_order("BTC/USDT", venue_order_id=resting.venue_order_id)
    assert done.status is VenueOrderStatus.FILLED and done.average_price == D("59000")

    # Cancel a working order; canceling it again returns it unchanged.
    working = await venue.submit(_order("flow-3", side=Side.SELL, price="70000"))
    canceled = await venue.cancel("BTC/USDT", client_order_id="flow-3")
    assert canceled.status is VenueOrderStatus.CANCELED and canceled.venue_order_id == working.venue_order_id
    assert (await venue.cancel("BTC/USDT", venue_order_id=working.venue_order_id)).status is VenueOrderStatus.CANCELED
    with pytest.raises(OrderNotFound):
        await venue.fetch_order("BTC/USDT", client_order_id="never-sent")

    balances = await venue.balances()
    assert balances["BTC"].total == D("1000000000000") + size + D("0.01")
    assert balances["BTC"].used == 0

    # Submitting the same client order id again returns the order, never a second one.
    again = await venue.submit(_order("flow-2", price="59000.004"))
    assert again.venue_order_id == resting.venue_order_id and len(sim.orders("flow-2")) == 1


async def test_ccxt_when_the_secret_is_wrong_the_signature_check_refuses(sim: Sim) -> None:
    bad = CcxtVenue(CcxtVenueConfig(name=f"{sim.name}-bad", api_key="sim-key", secret="wrong", api_url=sim.url))
    try:
        with pytest.raises(VenueUnavailable, match="Signature for this request is not valid"):
            await bad.balances()
    finally:
        await bad.close()


async def test_ccxt_submit_when_accepted_then_timed_out_resolves_by_client_id_with_no_duplicate(
    venue: CcxtVenue, sim: Sim
) -> None:
    await venue.markets()
    sim.control("/sim/faults", {"kind": "accept_then_timeout", "delay_s": 3})
    placed = await venue.submit(_order("timeout-1"))
    assert venue.unknown_outcomes == 1
    assert placed.status is VenueOrderStatus.FILLED and placed.filled_quantity == D("0.01")
    assert placed.fills and placed.fills[0].fee > 0
    assert len(sim.orders("timeout-1")) == 1


async def test_ccxt_submit_when_the_connection_drops_before_the_order_lands_is_not_placed(
    venue: CcxtVenue, sim: Sim
) -> None:
    await venue.markets()
    sim.control("/sim/faults", {"kind": "drop"})
    with pytest.raises(VenueUnavailable, match="no such order"):
        await venue.submit(_order("drop-1"))
    assert sim.orders("drop-1") == []
    sim.control("/sim/faults", {"kind": "drop", "after_accept": True})
    placed = await venue.submit(_order("drop-2"))
    assert placed.status is VenueOrderStatus.FILLED and len(sim.orders("drop-2")) == 1


async def test_ccxt_when_rate_limited_opens_the_shared_breaker_backs_off_and_recovers(
    venue: CcxtVenue, sim: Sim, shared_redis: AnyRedis
) -> None:
    await venue.markets()
    sim.control("/sim/faults", {"kind": "rate_limit", "retry_after": 1})
    with pytest.raises(RateLimited) as raised:
        await venue.submit(_order("rl-1"))
    assert raised.value.retry_after == 1.0
    assert sim.orders("rl-1") == []
    # Another process's adapter for the same (venue, account) sees the open breaker in Redis.
    other = CcxtVenue(venue.config, redis=shared_redis, keys=Keys(venue.breaker._open_key.split(":")[0], 1))
    assert not await other.healthy()
    with pytest.raises(VenueUnavailable, match="circuit breaker open"):
        await venue.submit(_order("rl-2"))
    await asyncio.sleep(1.2)
    assert await other.healthy() and await venue.healthy()
    assert (await venue.submit(_order("rl-2"))).status is VenueOrderStatus.FILLED
    assert len(sim.orders("rl-2")) == 1


async def test_ccxt_token_bucket_when_shared_paces_both_adapters_together(sim: Sim, shared_redis: AnyRedis) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}", 1)
    config = CcxtVenueConfig(name=f"{sim.name}-paced", api_key="sim-key", secret="sim-secret", api_url=sim.url,
                             rate_per_s=20, burst=5)
    a, b = CcxtVenue(config, redis=shared_redis, keys=keys), CcxtVenue(config, redis=shared_redis, keys=keys)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(v.ticker("BTC/USDT") for v in (a, b) for _ in range(10)))
        elapsed = loop.time() - started
        # 20 requests, 5 from the burst, 15 at 20/s: at least 0.75 s however they interleave.
        assert elapsed >= 0.7
        assert a.limiter.waited_s + b.limiter.waited_s > 0
    finally:
        await a.close()
        for key in [k async for k in shared_redis.scan_iter(match=f"{keys.namespace}:*")]:
            await shared_redis.delete(key)


async def test_open_orders_when_the_venue_holds_an_order_the_store_never_saw_list_it(
    venue: CcxtVenue, sim: Sim
) -> None:
    """What ``orders.reconcile`` needs: an order placed at the venue whose answer never
    reached the platform (here a submit that timed out and was never looked up) is among the
    venue's open orders and is found by its client order id."""
    await venue.markets()
    sim.control("/sim/faults", {"kind": "accept_then_timeout", "delay_s": 2})
    import ccxt

    with pytest.raises(ccxt.RequestTimeout):
        await venue.client.create_order("BTC/USDT", "limit", "buy", "0.01", "50000", {"newClientOrderId": "orphan-1"})
    orphans = [o for o in await venue.open_orders() if o.client_order_id == "orphan-1"]
    assert len(orphans) == 1 and orphans[0].status is VenueOrderStatus.OPEN
    assert (await venue.fetch_order("BTC/USDT", client_order_id="orphan-1")).venue_order_id == orphans[0].venue_order_id


def _plain_binance(sim: Sim) -> Any:
    """ccxt's binance client as anyone would build it: the keys, and every API URL pointed at
    the server (same paths, the server's base instead of Binance's hosts). No options."""
    import ccxt.async_support as ccxt_async
    from urllib.parse import urlsplit

    client = ccxt_async.binance({"apiKey": "sim-key", "secret": "sim-secret"})
    client.urls["api"] = {name: sim.url + urlsplit(url).path for name, url in client.urls["api"].items()}
    return client


async def test_plain_ccxt_binance_with_only_the_urls_and_keys_loads_markets_and_trades_against_the_sim(
    sim: Sim,
) -> None:
    client = _plain_binance(sim)
    try:
        before = sim.control("/sim/health")["requests"]
        markets = await client.load_markets()
        # currencies, spot, linear and inverse futures, margin pairs (cross twice, isolated)
        assert sim.control("/sim/health")["requests"] - before == 7
        assert set(markets) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
        btc = markets["BTC/USDT"]
        assert (btc["id"], btc["type"], btc["spot"], btc["active"]) == ("BTCUSDT", "spot", True, True)
        assert not btc["margin"]
        steps = (btc["precision"]["price"], btc["precision"]["amount"])
        assert tuple(D(str(s)) for s in steps) == (D("0.01"), D("0.00001"))
        assert D(str(btc["limits"]["amount"]["min"])) == D("0.00001")
        assert D(str(btc["limits"]["cost"]["min"])) == D("5")
        assert D(str(markets["SOL/USDT"]["precision"]["amount"])) == D("0.001")

        currencies = await client.fetch_currencies()
        assert set(currencies) == {"BTC", "ETH", "SOL", "USDT"}
        assert currencies["USDT"]["active"] and currencies["USDT"]["type"] == "crypto"

        balance = await client.fetch_balance()
        assert balance["free"]["USDT"] == 1e12 and balance["used"]["BTC"] == 0
        assert set(balance["total"]) >= {"BTC", "ETH", "SOL", "USDT"}

        bought = await client.create_order("BTC/USDT", "market", "buy", 0.01)
        assert bought["status"] == "closed" and bought["filled"] == 0.01 and bought["trades"]
        resting = await client.create_order("BTC/USDT", "limit", "buy", 0.02, 50000)
        assert resting["status"] == "open" and resting["price"] == 50000

        found = await client.fetch_order(resting["id"], "BTC/USDT")
        assert (found["id"], found["status"], found["amount"]) == (resting["id"], "open", 0.02)
        trades = await client.fetch_my_trades("BTC/USDT")
        assert {t["order"] for t in trades} == {bought["id"]}
        assert sum(t["amount"] for t in trades) == pytest.approx(0.01)
        assert {t["id"] for t in trades} == {t["id"] for t in bought["trades"]}

        canceled = await client.cancel_order(resting["id"], "BTC/USDT")
        assert canceled["status"] == "canceled"
        assert (await client.fetch_order(resting["id"], "BTC/USDT"))["status"] == "canceled"
        after = await client.fetch_balance()
        assert after["total"]["BTC"] == pytest.approx(1e12 + 0.01) and after["used"]["USDT"] == 0

        # Anything else (here the futures account) is Binance's error, which ccxt raises as its own.
        import ccxt

        with pytest.raises(ccxt.OperationFailed, match="-1000.*unknown endpoint GET /fapi/v3/account"):
            await client.fetch_balance({"type": "future"})
    finally:
        await client.close()
