"""The venue contract: what each error promises about retrying, and what the package exports."""

from __future__ import annotations

from decimal import Decimal

import pytest

import services.venues as venues
from services.venues import (
    InsufficientFunds,
    Market,
    OrderNotFound,
    OrderRejected,
    PaperVenue,
    RateLimited,
    UnknownOutcome,
    Venue,
    VenueError,
    VenueOrderStatus,
    VenueUnavailable,
)


class TestErrors:
    @pytest.mark.parametrize(
        "error,retryable",
        [
            (OrderRejected, False),
            (OrderNotFound, False),
            (InsufficientFunds, False),
            (RateLimited, True),
            (VenueUnavailable, True),
            (UnknownOutcome, False),
        ],
    )
    def test_error_when_classified_says_whether_a_retry_is_safe(self, error: type[VenueError], retryable: bool) -> None:
        assert issubclass(error, VenueError)
        assert error.retryable is retryable

    def test_rate_limited_when_raised_carries_retry_after(self) -> None:
        error = RateLimited("slow down", venue="x", retry_after=2.5)
        assert error.retry_after == 2.5
        assert str(error) == "x: slow down"

    def test_unknown_outcome_when_raised_carries_the_client_order_id(self) -> None:
        assert UnknownOutcome("timeout", client_order_id="c1").client_order_id == "c1"


class TestTypes:
    def test_status_when_working_is_not_terminal(self) -> None:
        working = {VenueOrderStatus.OPEN, VenueOrderStatus.PARTIALLY_FILLED}
        assert {s for s in VenueOrderStatus if not s.is_terminal} == working

    def test_market_when_steps_not_positive_raises(self) -> None:
        with pytest.raises(ValueError):
            Market(
                symbol="X/Y",
                base="X",
                quote="Y",
                price_step=Decimal(0),
                quantity_step=Decimal("1"),
                min_quantity=Decimal("1"),
                min_notional=Decimal(0),
                maker_fee=Decimal(0),
                taker_fee=Decimal(0),
            )

    def test_paper_venue_when_checked_implements_the_protocol(self) -> None:
        venue: Venue = PaperVenue()
        assert isinstance(venue, Venue)


def test_all_when_imported_names_exactly_the_public_members() -> None:
    public = {name for name in vars(venues) if not name.startswith("_") and name != "annotations"}
    assert set(venues.__all__) == public - {"base", "paper", "ccxt", "limits", "sim"}  # submodules
    assert venues.__all__ == sorted(venues.__all__, key=lambda n: (not n.isupper(), n))
