"""The ccxt error table, the venues setting and the paper venue's rejection fault."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import ccxt
import pytest

from services.routing.settings import parse_venues
from services.trading import OrderType, Side
from services.venues.base import OrderRejected, VenueOrderRequest
from services.venues.ccxt import ErrorClass, _classify
from services.venues.paper import PaperVenue


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ccxt.OrderNotFound("x"), ErrorClass.NOT_FOUND),
        (ccxt.InsufficientFunds("x"), ErrorClass.FUNDS),
        (ccxt.InvalidOrder("x"), ErrorClass.REJECTED),
        (ccxt.BadSymbol("x"), ErrorClass.REJECTED),
        (ccxt.AuthenticationError("x"), ErrorClass.UNAVAILABLE),
        (ccxt.DDoSProtection("x"), ErrorClass.RATE_LIMITED),
        (ccxt.RateLimitExceeded("x"), ErrorClass.RATE_LIMITED),
        (ccxt.RequestTimeout("x"), ErrorClass.UNKNOWN),
        (ccxt.ExchangeNotAvailable("x"), ErrorClass.UNKNOWN),
        (ccxt.OnMaintenance("x"), ErrorClass.UNAVAILABLE),
        (ccxt.InvalidNonce("x"), ErrorClass.RETRY),
        (ccxt.ExchangeError("x"), ErrorClass.REJECTED),
    ],
)
def test_classify_when_given_each_ccxt_error_maps_it_per_the_table(error: Exception, expected: ErrorClass) -> None:
    assert _classify(error) is expected


def test_classify_when_the_connection_was_never_made_says_unavailable_not_unknown() -> None:
    error = ccxt.ExchangeNotAvailable("binance GET http://x")
    error.__cause__ = aiohttp.ClientConnectorError(None, OSError(111, "refused"))  # type: ignore[arg-type]
    assert _classify(error) is ErrorClass.UNAVAILABLE


def test_parse_venues_when_valid_or_not() -> None:
    assert parse_venues("paper, a=binance@http://127.0.0.1:1") == [
        ("paper", None, None), ("a", "binance", "http://127.0.0.1:1")
    ]
    for bad in ("", "a=", "a=binance@ftp://x", "a=binance,a=binance", "=binance"):
        with pytest.raises(ValueError):
            parse_venues(bad)


async def test_paper_rejected_fault_when_queued_refuses_the_next_submit_only() -> None:
    venue = PaperVenue(balances={"USDT": Decimal("100000")})
    venue.faults.rejected()
    request = VenueOrderRequest(client_order_id="r1", symbol="BTC/USDT", side=Side.BUY,
                                order_type=OrderType.MARKET, quantity=Decimal("0.01"))
    with pytest.raises(OrderRejected, match="simulated rejection"):
        await venue.submit(request)
    assert (await venue.submit(request)).filled_quantity == Decimal("0.01")
