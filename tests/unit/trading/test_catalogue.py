"""The instrument catalogue from several venues' markets, and a mark from several venues' prices."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from services.core.catalogue import decode_catalogue, encode_catalogue
from services.trading.catalogue import MAX_QUANTITY, VenuePrice, combine_markets, combine_prices, mid_of
from services.venues.base import Market

D = Decimal

BTC = Market(
    symbol="BTC/USDT", base="BTC", quote="USDT", price_step=D("0.01"), quantity_step=D("0.00001"),
    min_quantity=D("0.00001"), min_notional=D("5"), maker_fee=D("0.0008"), taker_fee=D("0.001"),
)


class TestCombineMarkets:
    def test_catalogue_when_one_venue_lists_a_symbol_takes_its_terms(self) -> None:
        catalogue = combine_markets({"paper": {"BTC/USDT": BTC}})
        btc = catalogue.instrument("BTC/USDT")
        assert btc is not None
        assert (btc.base, btc.quote, btc.price_step, btc.quantity_step) == ("BTC", "USDT", D("0.01"), D("0.00001"))
        assert (btc.min_quantity, btc.min_notional, btc.max_quantity) == (D("0.00001"), D("5"), MAX_QUANTITY)
        assert catalogue.taker_fee("BTC/USDT") == D("0.001") and catalogue.venues == {"BTC/USDT": ("paper",)}
        assert catalogue.instrument("DOGE/USDT") is None and catalogue.taker_fee("DOGE/USDT") is None

    def test_catalogue_when_venues_differ_takes_the_strictest_terms_and_the_worst_fee(self) -> None:
        coarse = dataclasses.replace(
            BTC, price_step=D("0.025"), quantity_step=D("0.0001"), min_quantity=D("0"), min_notional=D("10"),
            taker_fee=D("0.0005"),
        )
        dear = dataclasses.replace(BTC, min_quantity=D("0.001"), taker_fee=D("0.0015"))
        catalogue = combine_markets({"b": {"BTC/USDT": coarse}, "a": {"BTC/USDT": BTC}, "c": {"BTC/USDT": dear}})
        btc = catalogue.instrument("BTC/USDT")
        assert btc is not None
        assert btc.price_step == D("0.05")  # a multiple of 0.01 and of 0.025: valid at every venue
        assert btc.quantity_step == D("0.0001") and btc.min_quantity == D("0.001") and btc.min_notional == D("10")
        assert catalogue.taker_fee("BTC/USDT") == D("0.0015") and catalogue.venues["BTC/USDT"] == ("a", "b", "c")

    def test_catalogue_when_a_venue_has_no_minimum_quantity_asks_for_one_step(self) -> None:
        catalogue = combine_markets({"x": {"BTC/USDT": dataclasses.replace(BTC, min_quantity=D("0"))}})
        btc = catalogue.instrument("BTC/USDT")
        assert btc is not None and btc.min_quantity == D("0.00001")

    def test_catalogue_when_a_venue_names_another_pair_leaves_that_venue_out_of_the_symbol(self) -> None:
        other = dataclasses.replace(BTC, quote="USD", price_step=D("1"), taker_fee=D("0.01"))
        catalogue = combine_markets({"a": {"BTC/USDT": BTC}, "z": {"BTC/USDT": other}})
        btc = catalogue.instrument("BTC/USDT")
        assert btc is not None and btc.quote == "USDT" and btc.price_step == D("0.01")
        assert catalogue.venues["BTC/USDT"] == ("a",) and catalogue.taker_fee("BTC/USDT") == D("0.001")

    def test_catalogue_when_encoded_and_decoded_is_the_same(self) -> None:
        catalogue = combine_markets({"a": {"BTC/USDT": BTC}, "b": {"BTC/USDT": BTC}})
        assert decode_catalogue(encode_catalogue(catalogue)) == catalogue


class TestCombinePrices:
    def test_mid_when_the_venue_keeps_one_is_its_own_else_the_touch_else_the_last_trade(self) -> None:
        assert mid_of(VenuePrice(venue="p", bid=D("99"), ask=D("103"), mid=D("100"))) == D("100")
        assert mid_of(VenuePrice(venue="x", bid=D("99"), ask=D("101"), last=D("90"))) == D("100")
        assert mid_of(VenuePrice(venue="x", bid=None, ask=D("101"), last=D("90"))) == D("90")
        assert mid_of(VenuePrice(venue="x", bid=D("102"), ask=D("101"))) is None  # crossed, no last
        assert mid_of(VenuePrice(venue="x")) is None

    def test_mark_when_three_venues_quote_is_the_median_mid_so_one_far_off_does_not_move_it(self) -> None:
        price = combine_prices([
            VenuePrice(venue="simc", bid=D("60010"), ask=D("60014"), last=D("60012")),
            VenuePrice(venue="sima", bid=D("59998"), ask=D("60002"), last=D("60000")),
            VenuePrice(venue="simb", bid=D("50000"), ask=D("50004"), last=D("50002")),
        ], D("0.01"))
        assert price is not None
        assert price.mark == D("60000.00") and price.venues == ("sima", "simb", "simc")
        assert (price.bid, price.ask, price.last) == (D("60010"), D("50004"), D("60000"))

    def test_mark_when_two_venues_quote_is_the_mean_of_their_mids_on_the_price_step(self) -> None:
        price = combine_prices([
            VenuePrice(venue="a", bid=D("100.00"), ask=D("100.01")),
            VenuePrice(venue="b", mid=D("100.02")),
        ], D("0.01"))
        assert price is not None and price.mark == D("100.01")  # 100.0125 on the step
        assert price.last is None and price.venues == ("a", "b")

    def test_mark_when_no_venue_has_a_price_is_none(self) -> None:
        assert combine_prices([VenuePrice(venue="a"), VenuePrice(venue="b", bid=D("1"))], D("0.01")) is None
        assert combine_prices([], D("0.01")) is None
