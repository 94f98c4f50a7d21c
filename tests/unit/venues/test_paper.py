"""The paper venue: matching against the synthesized book, funds, idempotency and faults."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.trading import Liquidity, OrderType, Side, TimeInForce
from services.trading.money import DECIMAL_CONTEXT, money_context
from services.venues import (
    Balance,
    InsufficientFunds,
    OrderNotFound,
    OrderRejected,
    PaperVenue,
    RateLimited,
    UnknownOutcome,
    VenueError,
    VenueOrder,
    VenueOrderRequest,
    VenueOrderStatus,
    VenueUnavailable,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BTC = "BTC/USDT"
D = Decimal
TAKER = D("0.001")
MAKER = D("0.0008")
STATUS = VenueOrderStatus


def request(
    cid: str = "c1",
    side: Side = Side.BUY,
    quantity: str = "1",
    price: str | None = None,
    *,
    tif: TimeInForce = TimeInForce.GTC,
    symbol: str = BTC,
) -> VenueOrderRequest:
    return VenueOrderRequest(
        client_order_id=cid,
        symbol=symbol,
        side=side,
        order_type=OrderType.MARKET if price is None else OrderType.LIMIT,
        quantity=D(quantity),
        price=None if price is None else D(price),
        time_in_force=tif,
    )


def make_venue(**overrides: object) -> PaperVenue:
    kwargs: dict[str, object] = {"clock": lambda: T0, "balances": {"USDT": D("1000000"), "BTC": D("10")}}
    kwargs.update(overrides)
    return PaperVenue(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def venue() -> PaperVenue:
    return make_venue()


class TestBook:
    async def test_order_book_when_read_is_sorted_on_steps_and_around_the_mid(self, venue: PaperVenue) -> None:
        book = await venue.order_book(BTC, 3)
        assert len(book.bids) == len(book.asks) == 3
        assert [lvl.price for lvl in book.asks] == sorted(lvl.price for lvl in book.asks)
        assert [lvl.price for lvl in book.bids] == sorted((lvl.price for lvl in book.bids), reverse=True)
        assert book.bids[0].price < venue.mid(BTC) < book.asks[0].price
        assert all(lvl.price % D("0.01") == 0 and lvl.quantity > 0 for lvl in book.bids + book.asks)
        assert book.at == T0

    async def test_order_book_when_deeper_than_configured_is_capped(self, venue: PaperVenue) -> None:
        book = await venue.order_book(BTC, 50)
        assert len(book.asks) == 5

    async def test_ticker_when_price_set_reflects_the_new_book(self, venue: PaperVenue) -> None:
        venue.set_price(BTC, D("61000.004"))
        ticker = await venue.ticker(BTC)
        book = await venue.order_book(BTC, 1)
        assert venue.mid(BTC) == D("61000.00")
        assert (ticker.bid, ticker.ask, ticker.last) == (book.bids[0].price, book.asks[0].price, D("61000.00"))

    async def test_markets_when_default_list_the_three_usdt_pairs(self, venue: PaperVenue) -> None:
        markets = await venue.markets()
        assert set(markets) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
        assert (markets[BTC].maker_fee, markets[BTC].taker_fee) == (MAKER, TAKER)


class TestMarketOrders:
    async def test_market_buy_when_larger_than_best_level_walks_levels_at_increasing_prices(
        self, venue: PaperVenue
    ) -> None:
        asks = (await venue.order_book(BTC, 5)).asks
        quantity = asks[0].quantity + asks[1].quantity + D("0.1")
        order = await venue.submit(request(quantity=str(quantity)))

        assert order.status is STATUS.FILLED
        assert [f.price for f in order.fills] == [asks[0].price, asks[1].price, asks[2].price]
        assert [f.quantity for f in order.fills] == [asks[0].quantity, asks[1].quantity, D("0.1")]
        assert all(f.liquidity is Liquidity.TAKER and f.fee == f.quantity * f.price * TAKER for f in order.fills)
        assert all(f.fee_asset == "USDT" for f in order.fills)
        notional = sum(f.quantity * f.price for f in order.fills)
        assert order.filled_quantity == quantity
        assert order.average_price == DECIMAL_CONTEXT.divide(notional, quantity)
        assert order.fees == sum(f.fee for f in order.fills)
        balances = await venue.balances()
        assert balances["USDT"] == Balance(free=D("1000000") - notional - order.fees, used=D(0))
        assert balances["BTC"] == Balance(free=D("10") + quantity, used=D(0))

    async def test_market_sell_when_filled_credits_proceeds_net_of_fees(self, venue: PaperVenue) -> None:
        bid = (await venue.order_book(BTC, 1)).bids[0]
        order = await venue.submit(request(side=Side.SELL, quantity="0.5"))
        assert order.status is STATUS.FILLED and order.fills[0].price == bid.price
        balances = await venue.balances()
        assert balances["USDT"].free == D("1000000") + D("0.5") * bid.price * (1 - TAKER)
        assert balances["BTC"] == Balance(free=D("9.5"), used=D(0))

    async def test_market_buy_when_book_too_thin_fills_what_it_can_and_expires(self) -> None:
        venue = make_venue(book_levels=1)
        ask = (await venue.order_book(BTC, 1)).asks[0]
        order = await venue.submit(request(quantity=str(ask.quantity + 1)))
        assert order.status is STATUS.EXPIRED
        assert order.filled_quantity == ask.quantity and order.leaves_quantity == 0
        assert (await venue.balances())["USDT"].used == 0

    async def test_fill_ids_when_many_fills_are_unique_and_named_after_the_venue(self, venue: PaperVenue) -> None:
        first = await venue.submit(request("a", quantity="3"))
        second = await venue.submit(request("b", side=Side.SELL, quantity="3"))
        ids = [f.fill_id for f in first.fills + second.fills]
        assert len(ids) == len(set(ids)) > 2
        assert all(i.startswith("paper-") for i in ids)

    async def test_ids_when_two_venues_of_one_name_fill_never_repeat(self) -> None:
        # two processes' paper venues, or one before and after a restart: an order re-placed at
        # the other must not reuse an execution id the first one gave (the platform dedupes on it)
        a, b = make_venue(), make_venue()
        fills = [f for v in (a, b) for f in (await v.submit(request("a", quantity="3"))).fills]
        orders = {(await v.fetch_order(BTC, client_order_id="a")).venue_order_id for v in (a, b)}
        assert len({f.fill_id for f in fills}) == len(fills) and len(orders) == 2


class TestLimitOrders:
    async def test_limit_buy_when_not_crossing_rests_then_fills_as_maker_when_price_moves_through(
        self, venue: PaperVenue
    ) -> None:
        order = await venue.submit(request(quantity="0.5", price="59000"))
        assert order.status is STATUS.OPEN and not order.fills
        assert [o.venue_order_id for o in await venue.open_orders(BTC)] == [order.venue_order_id]
        assert (await venue.balances())["USDT"].used == D("0.5") * D("59000") * (1 + TAKER)

        assert venue.set_price(BTC, D("59500")) == []
        filled = venue.set_price(BTC, D("58900"))

        assert [o.venue_order_id for o in filled] == [order.venue_order_id]
        done = await venue.fetch_order(BTC, venue_order_id=order.venue_order_id)
        assert done.status is STATUS.FILLED
        (fill,) = done.fills
        assert (fill.price, fill.quantity, fill.liquidity) == (D("59000"), D("0.5"), Liquidity.MAKER)
        assert fill.fee == D("0.5") * D("59000") * MAKER
        balances = await venue.balances()
        assert balances["USDT"] == Balance(free=D("1000000") - D("29500") - fill.fee, used=D(0))
        assert balances["BTC"].free == D("10.5")
        assert await venue.open_orders() == []

    async def test_limit_sell_when_not_crossing_rests_then_fills_as_maker_when_price_rises(
        self, venue: PaperVenue
    ) -> None:
        order = await venue.submit(request(side=Side.SELL, quantity="0.5", price="61000"))
        assert order.status is STATUS.OPEN
        assert (await venue.balances())["BTC"] == Balance(free=D("9.5"), used=D("0.5"))
        venue.set_price(BTC, D("61100"))
        done = await venue.fetch_order(BTC, client_order_id="c1")
        assert done.status is STATUS.FILLED and done.fills[0].liquidity is Liquidity.MAKER
        balances = await venue.balances()
        assert balances["BTC"] == Balance(free=D("9.5"), used=D(0))
        assert balances["USDT"].free == D("1000000") + D("30500") * (1 - MAKER)

    async def test_resting_order_when_larger_than_the_best_level_fills_over_several_moves(
        self, venue: PaperVenue
    ) -> None:
        await venue.submit(request(side=Side.SELL, quantity="2", price="61000"))
        sizes = []
        for price in ("61100", "61000", "61100", "61000", "61100"):
            venue.set_price(BTC, D(price))
            now = await venue.fetch_order(BTC, client_order_id="c1")
            sizes.append(now.filled_quantity)
            if now.status is STATUS.FILLED:
                break
            assert now.status is STATUS.PARTIALLY_FILLED
        done = await venue.fetch_order(BTC, client_order_id="c1")
        assert done.status is STATUS.FILLED and len(done.fills) >= 3 and done.filled_quantity == D("2")
        # each move takes at most the best bid's depth, every fill as maker at the limit
        assert all(f.quantity <= D("0.82") and f.price == D("61000") for f in done.fills)
        assert all(f.liquidity is Liquidity.MAKER for f in done.fills) and sizes == sorted(sizes)
        balances = await venue.balances()
        assert balances["BTC"] == Balance(free=D("8"), used=D(0))
        assert balances["USDT"].free == D("1000000") + D("122000") * (1 - MAKER)

    async def test_limit_buy_when_crossing_takes_up_to_its_price_and_rests_the_rest(self, venue: PaperVenue) -> None:
        asks = (await venue.order_book(BTC, 5)).asks
        limit = asks[1].price
        order = await venue.submit(request(quantity="5", price=str(limit)))
        assert order.status is STATUS.PARTIALLY_FILLED
        assert [f.price for f in order.fills] == [asks[0].price, asks[1].price]
        assert all(f.price <= limit and f.liquidity is Liquidity.TAKER for f in order.fills)
        leaves = D("5") - asks[0].quantity - asks[1].quantity
        assert order.leaves_quantity == leaves
        assert (await venue.balances())["USDT"].used == leaves * limit * (1 + TAKER)

    async def test_ioc_when_partly_fillable_fills_what_crosses_and_expires_the_rest(self, venue: PaperVenue) -> None:
        asks = (await venue.order_book(BTC, 5)).asks
        order = await venue.submit(request(quantity="5", price=str(asks[1].price), tif=TimeInForce.IOC))
        assert order.status is STATUS.EXPIRED
        assert order.filled_quantity == asks[0].quantity + asks[1].quantity
        assert await venue.open_orders() == []
        assert (await venue.balances())["USDT"].used == 0

    async def test_ioc_when_nothing_crosses_expires_with_nothing_filled(self, venue: PaperVenue) -> None:
        order = await venue.submit(request(quantity="1", price="59000", tif=TimeInForce.IOC))
        assert order.status is STATUS.EXPIRED and order.filled_quantity == 0
        assert (await venue.balances())["USDT"] == Balance(free=D("1000000"), used=D(0))

    async def test_fok_when_not_fully_fillable_expires_with_nothing_filled(self, venue: PaperVenue) -> None:
        asks = (await venue.order_book(BTC, 5)).asks
        order = await venue.submit(request(quantity="5", price=str(asks[1].price), tif=TimeInForce.FOK))
        assert order.status is STATUS.EXPIRED and order.fills == ()
        assert await venue.balances() == {
            "BTC": Balance(free=D("10"), used=D(0)),
            "USDT": Balance(free=D("1000000"), used=D(0)),
        }

    async def test_fok_when_fully_fillable_fills_completely(self, venue: PaperVenue) -> None:
        asks = (await venue.order_book(BTC, 5)).asks
        quantity = asks[0].quantity + D("0.01")
        order = await venue.submit(request(quantity=str(quantity), price=str(asks[1].price), tif=TimeInForce.FOK))
        assert order.status is STATUS.FILLED and order.filled_quantity == quantity
        assert (await venue.balances())["USDT"].used == 0


class TestCancel:
    async def test_cancel_when_resting_releases_reserved_funds(self, venue: PaperVenue) -> None:
        order = await venue.submit(request(quantity="1", price="50000"))
        canceled = await venue.cancel(BTC, venue_order_id=order.venue_order_id)
        assert canceled.status is STATUS.CANCELED and canceled.leaves_quantity == 0
        assert (await venue.balances())["USDT"] == Balance(free=D("1000000"), used=D(0))
        assert await venue.open_orders() == []
        assert venue.set_price(BTC, D("40000")) == []

    async def test_cancel_when_partially_filled_keeps_fills_and_releases_the_rest(self, venue: PaperVenue) -> None:
        asks = (await venue.order_book(BTC, 1)).asks
        order = await venue.submit(request(side=Side.BUY, quantity="3", price=str(asks[0].price)))
        canceled = await venue.cancel(BTC, client_order_id="c1")
        assert canceled.status is STATUS.CANCELED
        assert canceled.filled_quantity == order.filled_quantity == asks[0].quantity
        balances = await venue.balances()
        spent = asks[0].quantity * asks[0].price * (1 + TAKER)
        assert balances["USDT"] == Balance(free=D("1000000") - spent, used=D(0))

    async def test_cancel_when_already_terminal_returns_the_order_unchanged(self, venue: PaperVenue) -> None:
        order = await venue.submit(request(quantity="0.1"))
        again = await venue.cancel(BTC, client_order_id="c1")
        assert again == order and again.status is STATUS.FILLED

    async def test_cancel_when_unknown_raises_order_not_found(self, venue: PaperVenue) -> None:
        with pytest.raises(OrderNotFound):
            await venue.cancel(BTC, venue_order_id="nope")


class TestLookups:
    async def test_fetch_order_when_symbol_differs_raises_order_not_found(self, venue: PaperVenue) -> None:
        order = await venue.submit(request(quantity="1", price="50000"))
        with pytest.raises(OrderNotFound):
            await venue.fetch_order("ETH/USDT", venue_order_id=order.venue_order_id)

    async def test_fetch_order_when_ids_disagree_raises_order_not_found(self, venue: PaperVenue) -> None:
        order = await venue.submit(request("a", quantity="1", price="50000"))
        await venue.submit(request("b", quantity="1", price="50000"))
        with pytest.raises(OrderNotFound):
            await venue.fetch_order(BTC, venue_order_id=order.venue_order_id, client_order_id="b")

    async def test_open_orders_when_filtered_by_symbol_lists_oldest_first(self, venue: PaperVenue) -> None:
        venue.fund({"ETH": D("10")})
        await venue.submit(request("a", quantity="1", price="50000"))
        await venue.submit(request("e", side=Side.SELL, quantity="1", price="4000", symbol="ETH/USDT"))
        await venue.submit(request("b", quantity="1", price="49000"))
        assert [o.client_order_id for o in await venue.open_orders(BTC)] == ["a", "b"]
        assert [o.client_order_id for o in await venue.open_orders()] == ["a", "e", "b"]


class TestIdempotency:
    async def test_submit_when_client_order_id_repeats_returns_the_existing_order(self, venue: PaperVenue) -> None:
        first = await venue.submit(request(quantity="1"))
        balances = await venue.balances()
        second = await venue.submit(request(quantity="1"))
        assert second == first
        assert await venue.balances() == balances

    async def test_submit_when_resting_order_is_resubmitted_keeps_one_order(self, venue: PaperVenue) -> None:
        await venue.submit(request(quantity="1", price="50000"))
        await venue.submit(request(quantity="1", price="50000"))
        assert len(await venue.open_orders()) == 1
        assert (await venue.balances())["USDT"].used == D("50000") * (1 + TAKER)

    async def test_submit_when_client_order_id_reused_for_another_order_is_rejected(self, venue: PaperVenue) -> None:
        await venue.submit(request(quantity="1", price="50000"))
        with pytest.raises(OrderRejected, match="already used"):
            await venue.submit(request(quantity="2", price="50000"))


class TestRejections:
    @pytest.mark.parametrize(
        "bad,message",
        [
            (request(quantity="0.000001"), "multiple of the quantity step"),
            (request(quantity="1", price="50000.001"), "multiple of the price step"),
            (request(quantity="0.00001", price="50000"), "below the minimum 5"),
            (request(quantity="0"), "quantity must be positive"),
            (request(symbol="DOGE/USDT"), "unknown symbol"),
            (request(quantity="1", price="-1"), "price must be positive"),
            (
                VenueOrderRequest(
                    client_order_id="c1", symbol=BTC, side=Side.BUY, order_type=OrderType.MARKET,
                    quantity=D("1"), price=D("50000"),
                ),
                "market order takes no price",
            ),
            (
                VenueOrderRequest(
                    client_order_id="c1", symbol=BTC, side=Side.BUY, order_type=OrderType.LIMIT, quantity=D("1")
                ),
                "needs a price",
            ),
        ],
    )
    async def test_submit_when_outside_market_rules_raises_order_rejected(
        self, venue: PaperVenue, bad: VenueOrderRequest, message: str
    ) -> None:
        with pytest.raises(OrderRejected, match=message) as raised:
            await venue.submit(bad)
        assert not raised.value.retryable
        assert await venue.open_orders() == []
        with pytest.raises(OrderNotFound):
            await venue.fetch_order(BTC, client_order_id="c1")

    async def test_submit_when_below_min_quantity_raises_order_rejected(self) -> None:
        venue = make_venue()
        market = (await venue.markets())["SOL/USDT"]
        assert market.min_quantity == D("0.001")
        venue.fund({"USDT": D("100")})
        with pytest.raises(OrderRejected, match="multiple of the quantity step"):
            await venue.submit(request(quantity="0.0001", symbol="SOL/USDT"))


class TestFunds:
    @pytest.mark.parametrize(
        "order",
        [
            request(quantity="2", price="60000"),
            request(quantity="2"),
            request(side=Side.SELL, quantity="11"),
            request(side=Side.SELL, quantity="10.5", price="70000"),
        ],
        ids=["limit-buy", "market-buy", "market-sell", "limit-sell"],
    )
    async def test_submit_when_account_is_short_raises_insufficient_funds_and_moves_nothing(
        self, order: VenueOrderRequest
    ) -> None:
        venue = make_venue(balances={"USDT": D("100000"), "BTC": D("10")})
        before = await venue.balances()
        with pytest.raises(InsufficientFunds):
            await venue.submit(order)
        assert await venue.balances() == before
        with pytest.raises(OrderNotFound):
            await venue.fetch_order(BTC, client_order_id=order.client_order_id)

    async def test_submit_when_funds_are_reserved_by_a_resting_order_counts_only_free(self) -> None:
        venue = make_venue(balances={"USDT": D("100000")})
        await venue.submit(request("a", quantity="1", price="59000"))
        with pytest.raises(InsufficientFunds):
            await venue.submit(request("b", quantity="1", price="59000"))

    def test_fund_when_negative_raises(self, venue: PaperVenue) -> None:
        with pytest.raises(ValueError):
            venue.fund({"USDT": D("-1")})


class TestFaults:
    async def test_submit_when_unknown_outcome_the_order_landed_and_fetch_by_client_id_finds_it(
        self, venue: PaperVenue
    ) -> None:
        venue.faults.unknown_outcome()
        with pytest.raises(UnknownOutcome) as raised:
            await venue.submit(request("lost", quantity="1"))
        assert raised.value.client_order_id == "lost" and not raised.value.retryable
        found = await venue.fetch_order(BTC, client_order_id="lost")
        assert found.status is STATUS.FILLED and found.filled_quantity == 1
        again = await venue.submit(request("lost", quantity="1"))
        assert again == found
        assert (await venue.balances())["BTC"].free == D("11")

    @pytest.mark.parametrize("error", [VenueUnavailable, RateLimited])
    async def test_submit_when_retryable_fault_the_order_did_not_land(
        self, venue: PaperVenue, error: type[VenueError]
    ) -> None:
        if error is RateLimited:
            venue.faults.rate_limited(2, retry_after=0.5)
        else:
            venue.faults.unavailable(2)
        for _ in range(2):
            with pytest.raises(error) as raised:
                await venue.submit(request(quantity="1"))
            assert raised.value.retryable and raised.value.venue == "paper"
        with pytest.raises(OrderNotFound):
            await venue.fetch_order(BTC, client_order_id="c1")
        order = await venue.submit(request(quantity="1"))
        assert order.status is STATUS.FILLED and venue.faults.pending == 0

    async def test_submit_when_rate_limited_carries_retry_after(self, venue: PaperVenue) -> None:
        venue.faults.rate_limited(retry_after=0.25)
        with pytest.raises(RateLimited) as raised:
            await venue.submit(request(quantity="1"))
        assert raised.value.retry_after == 0.25

    async def test_calls_when_latency_configured_take_at_least_that_long(self, venue: PaperVenue) -> None:
        venue.faults.latency = 0.02
        started = time.monotonic()
        await venue.ticker(BTC)
        # The event loop may wake a timer up to its clock resolution early.
        assert time.monotonic() - started >= 0.015


class TestDeterminism:
    def test_tick_when_same_seed_gives_the_same_path(self) -> None:
        a, b, c = make_venue(seed=7), make_venue(seed=7), make_venue(seed=8)
        path = [(a.tick(), a.mid(BTC), a.mid("SOL/USDT"))[1:] for _ in range(50)]
        assert path == [(b.tick(), b.mid(BTC), b.mid("SOL/USDT"))[1:] for _ in range(50)]
        assert path != [(c.tick(), c.mid(BTC), c.mid("SOL/USDT"))[1:] for _ in range(50)]

    def test_tick_when_symbol_unknown_raises_venue_error(self, venue: PaperVenue) -> None:
        with pytest.raises(VenueError, match="unknown symbol"):
            venue.tick("DOGE/USDT")

    def test_tick_when_walking_stays_on_the_price_step_within_the_volatility(self) -> None:
        venue = make_venue(seed=3, volatility=D("0.01"))
        previous = venue.mid(BTC)
        for _ in range(200):
            venue.tick(BTC)
            mid = venue.mid(BTC)
            assert mid % D("0.01") == 0 and mid > 0
            assert abs(mid - previous) <= previous * D("0.01") + D("0.01")
            previous = mid


# ---------------------------------------------------------------------------------------------
# Money conservation

SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
FUNDING = {"USDT": D("500000"), "BTC": D("5"), "ETH": D("60"), "SOL": D("1000")}
STEPS = {"BTC/USDT": D("0.001"), "ETH/USDT": D("0.01"), "SOL/USDT": D("0.1")}

submit_op = st.tuples(
    st.just("submit"),
    st.sampled_from(SYMBOLS),
    st.sampled_from(list(Side)),
    # quantity in STEPS units: mostly within the best levels, sometimes deeper than the book
    st.one_of(st.integers(min_value=1, max_value=500), st.integers(min_value=500, max_value=6000)),
    st.one_of(st.none(), st.integers(min_value=-60, max_value=60)),  # limit offset from the mid, bps
    st.sampled_from(list(TimeInForce)),
)
operation = st.one_of(
    submit_op,
    submit_op,
    st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=50)),
    st.tuples(st.just("tick")),
    st.tuples(st.just("set_price"), st.sampled_from(SYMBOLS), st.integers(min_value=-100, max_value=100)),
)


async def _run(operations: list[tuple[object, ...]]) -> None:
    venue = PaperVenue(clock=lambda: T0, seed=1, balances=FUNDING, volatility=D("0.01"))
    placed: list[tuple[str, str]] = []
    for n, op in enumerate(operations):
        if op[0] == "submit":
            _, symbol, side, units, offset, tif = op
            assert isinstance(symbol, str) and isinstance(side, Side) and isinstance(tif, TimeInForce)
            assert isinstance(units, int) and (offset is None or isinstance(offset, int))
            price = None
            if offset is not None:
                raw = venue.mid(symbol) * (1 + D(offset) / 10000)
                price = raw.quantize(D("0.01"))
            order = VenueOrderRequest(
                client_order_id=f"c{n}",
                symbol=symbol,
                side=side,
                order_type=OrderType.MARKET if price is None else OrderType.LIMIT,
                quantity=units * STEPS[symbol],
                price=price,
                time_in_force=tif,
            )
            try:
                await venue.submit(order)
                placed.append((symbol, order.client_order_id))
            except (OrderRejected, InsufficientFunds):
                pass
        elif op[0] == "cancel":
            index = op[1]
            assert isinstance(index, int)
            if placed:
                symbol, cid = placed[index % len(placed)]
                await venue.cancel(symbol, client_order_id=cid)
        elif op[0] == "tick":
            venue.tick()
        else:
            _, symbol, bps = op
            assert isinstance(symbol, str) and isinstance(bps, int)
            venue.set_price(symbol, venue.mid(symbol) * (1 + D(bps) / 10000))
        orders = [await venue.fetch_order(s, client_order_id=c) for s, c in placed]
        with money_context():
            _check_conservation(venue.balances_now(), orders)


def _check_conservation(balances: dict[str, Balance], orders: list[VenueOrder]) -> None:
    expected_total = dict(FUNDING)
    expected_used = {asset: D(0) for asset in FUNDING}
    fill_ids: list[str] = []
    for order in orders:
        base, quote = order.symbol.split("/")
        assert order.filled_quantity == sum((f.quantity for f in order.fills), D(0)) <= order.quantity
        for f in order.fills:
            fill_ids.append(f.fill_id)
            if order.side is Side.BUY:
                assert f.price <= (order.price or f.price)
                expected_total[base] += f.quantity
                expected_total[quote] -= f.quantity * f.price + f.fee
            else:
                assert f.price >= (order.price or f.price)
                expected_total[base] -= f.quantity
                expected_total[quote] += f.quantity * f.price - f.fee
        if not order.is_terminal:
            assert order.price is not None
            if order.side is Side.BUY:
                expected_used[quote] += order.leaves_quantity * order.price * (1 + TAKER)
            else:
                expected_used[base] += order.leaves_quantity
    assert len(fill_ids) == len(set(fill_ids))
    for asset, balance in balances.items():
        assert balance.free >= 0 and balance.used >= 0, (asset, balance)
        assert balance.total == expected_total[asset], asset
        assert balance.used == expected_used[asset], asset


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=40))
def test_balances_when_any_sequence_of_orders_and_moves_conserve_money(operations: list[tuple[object, ...]]) -> None:
    asyncio.run(_run(operations))
