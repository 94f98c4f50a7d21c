"""Venue choice: best net price among qualifying venues, deterministic ties, no venue."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading import Side, VenueQuote
from services.trading.routing import NoVenueAvailable, VenueOption, choose_venue

D = Decimal


def venue(name: str, price: str | None, fee: str = "0.001", healthy: bool = True, lists: bool = True) -> VenueOption:
    return VenueOption(
        venue=name,
        healthy=healthy,
        lists_symbol=lists,
        expected_price=None if price is None else D(price),
        fee_rate=D(fee),
    )


class TestChoice:
    def test_choose_venue_when_buying_picks_lowest_price_after_fees(self) -> None:
        # b is cheaper on price but its fee makes it dearer: 100 * 1.01 > 100.5 * 1.001
        decision = choose_venue("BTC/USDT", Side.BUY, [venue("b", "100", "0.01"), venue("a", "100.5")])
        assert decision.venue == "a"
        assert decision.effective_price == D("100.6005")

    def test_choose_venue_when_selling_picks_highest_price_after_fees(self) -> None:
        decision = choose_venue("BTC/USDT", Side.SELL, [venue("a", "100", "0.01"), venue("b", "99.5")])
        assert decision.venue == "b"
        assert decision.effective_price == D("99.4005")

    def test_choose_venue_when_tied_picks_the_first_name(self) -> None:
        for side in Side:
            decision = choose_venue("BTC/USDT", side, [venue("zeta", "100"), venue("alpha", "100")])
            assert decision.venue == "alpha"

    def test_choose_venue_when_best_is_unhealthy_skips_it(self) -> None:
        decision = choose_venue("BTC/USDT", Side.BUY, [venue("a", "90", healthy=False), venue("b", "100")])
        assert decision.venue == "b"

    def test_choose_venue_when_best_does_not_list_symbol_skips_it(self) -> None:
        decision = choose_venue("BTC/USDT", Side.BUY, [venue("a", "90", lists=False), venue("b", "100")])
        assert decision.venue == "b"

    def test_choose_venue_when_a_venue_has_no_price_skips_it(self) -> None:
        assert choose_venue("BTC/USDT", Side.BUY, [venue("a", None), venue("b", "100")]).venue == "b"

    def test_choose_venue_when_decided_records_every_candidate(self) -> None:
        candidates = [venue("a", "90", healthy=False), venue("b", "100"), venue("c", "95", lists=False)]
        decision = choose_venue("BTC/USDT", Side.BUY, candidates)
        assert decision.candidates == tuple(candidates)
        assert decision.quotes() == (
            VenueQuote(venue="a", expected_price=D("90"), fee_rate=D("0.001"), healthy=False),
            VenueQuote(venue="b", expected_price=D("100"), fee_rate=D("0.001"), healthy=True),
            VenueQuote(venue="c", expected_price=D("95"), fee_rate=D("0.001"), healthy=False),
        )

    def test_choose_venue_when_client_requested_a_venue_uses_it(self) -> None:
        decision = choose_venue(
            "BTC/USDT", Side.BUY, [venue("a", "90"), venue("b", "100")], requested_venue="b"
        )
        assert (decision.venue, decision.reason) == ("b", "requested by the client")


class TestNoVenue:
    def test_choose_venue_when_none_qualifies_raises(self) -> None:
        with pytest.raises(NoVenueAvailable, match="a unhealthy, b does not list it"):
            choose_venue("BTC/USDT", Side.BUY, [venue("a", "90", healthy=False), venue("b", "100", lists=False)])

    def test_choose_venue_when_no_candidates_raises(self) -> None:
        with pytest.raises(NoVenueAvailable):
            choose_venue("BTC/USDT", Side.SELL, [])

    def test_choose_venue_when_requested_venue_unhealthy_raises(self) -> None:
        with pytest.raises(NoVenueAvailable):
            choose_venue(
                "BTC/USDT", Side.BUY, [venue("a", "90", healthy=False), venue("b", "100")], requested_venue="a"
            )


options = st.lists(
    st.builds(
        VenueOption,
        venue=st.sampled_from(["a", "b", "c", "d", "e"]),
        healthy=st.booleans(),
        lists_symbol=st.booleans(),
        expected_price=st.one_of(st.none(), st.integers(1, 10**6).map(lambda n: D(n) / 100)),
        fee_rate=st.integers(0, 50).map(lambda n: D(n) / 10_000),
    ),
    max_size=6,
)


@given(options, st.sampled_from(list(Side)), st.randoms(use_true_random=False))
def test_choose_venue_when_any_candidates_picks_a_qualifying_best_regardless_of_input_order(
    candidates: list[VenueOption], side: Side, rnd: random.Random
) -> None:
    qualifying = [c for c in candidates if c.qualifies]
    shuffled = list(candidates)
    rnd.shuffle(shuffled)
    if not qualifying:
        with pytest.raises(NoVenueAvailable):
            choose_venue("X", side, candidates)
        return
    decision = choose_venue("X", side, candidates)
    assert choose_venue("X", side, shuffled).venue == decision.venue
    chosen = next(c for c in qualifying if c.venue == decision.venue and c.effective_price(side) == decision.effective_price)
    for other in qualifying:
        if side is Side.BUY:
            assert chosen.effective_price(side) <= other.effective_price(side)
        else:
            assert chosen.effective_price(side) >= other.effective_price(side)
