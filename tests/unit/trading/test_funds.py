"""Funds held for open orders (``services.trading.funds``): a property test over approvals,
venue fills, the portfolio applying them late, and orders ending part-filled, plus the rules
one by one."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.trading import Side
from services.trading.funds import Hold, hold_for

D = Decimal
FEE = D("0.001")


def test_hold_when_buy_approved_holds_quantity_at_worst_price_plus_fee() -> None:
    hold = hold_for(Side.BUY, D("2"), D("100"), FEE, "BTC", "USDT")
    assert (hold.asset, hold.amount, hold.held) == ("USDT", D("200.200"), D("200.200"))


def test_hold_when_sell_approved_holds_its_base_quantity() -> None:
    assert hold_for(Side.SELL, D("2"), D("100"), FEE, "BTC", "USDT") == Hold("BTC", D("2"), D("2"))


def test_hold_when_fill_applied_releases_its_pro_rata_share_rounded_up() -> None:
    hold = Hold("USDT", D("100"), D("3")).confirm(D("1"))
    assert hold.held == D("66.66666666666666666666666666666667")  # never a fraction below the share
    assert not hold.done


def test_hold_when_order_ends_part_filled_keeps_only_the_unapplied_filled_part() -> None:
    hold = Hold("USDT", D("100"), D("4")).confirm(D("1")).close(D("2"))
    assert hold.held == D("25") and not hold.done
    assert hold.confirm(D("1")).done and hold.confirm(D("1")).held == 0


def test_hold_when_ended_after_every_fill_applied_is_done() -> None:
    assert Hold("USDT", D("100"), D("4")).confirm(D("4")).done
    assert Hold("USDT", D("100"), D("4")).close(D("0")).done


ops = st.lists(
    st.tuples(
        st.sampled_from(["approve", "fill", "apply", "end"]),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=1, max_value=1_000),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(min_value=100, max_value=100_000), steps=ops)
def test_balance_when_orders_fill_and_the_portfolio_applies_late_never_goes_negative(
    seed: int, steps: list[tuple[str, int, int]]
) -> None:
    """Orders are approved against ``balance - held``; the venue fills them at or below their
    worst price, the portfolio applies each fill whenever it gets to it, orders end part-filled.
    Whatever the order of those, the available balance, and so the balance, never goes negative."""
    balance = D(seed)
    holds: dict[int, Hold] = {}
    worst: dict[int, Decimal] = {}
    filled: dict[int, Decimal] = {}
    unapplied: list[tuple[int, Decimal, Decimal]] = []  # (order, quantity, cost)
    ended: set[int] = set()
    next_id = 0

    def held() -> Decimal:
        return sum((h.held for h in holds.values()), D(0))

    for op, a, b in steps:
        if op == "approve":
            price, qty = D(a + 1) / 10, D(b) / 100
            hold = hold_for(Side.BUY, qty, price, FEE, "BTC", "USDT")
            if balance - held() >= hold.amount:
                holds[next_id], worst[next_id], filled[next_id] = hold, price, D(0)
            next_id += 1
        elif op == "fill":
            live = [o for o in holds if o not in ended and filled[o] < holds[o].quantity]
            if live:
                o = live[a % len(live)]
                qty = min(holds[o].quantity - filled[o], D(b) / 100)
                price = worst[o] * D(1 + a % 100) / 100  # at or below the worst price
                filled[o] += qty
                unapplied.append((o, qty, qty * price * (1 + FEE * D(b % 2))))
        elif op == "apply" and unapplied:
            o, qty, cost = unapplied.pop(a % len(unapplied))
            balance -= cost
            holds[o] = holds[o].confirm(qty)
        elif op == "end":
            live = [o for o in holds if o not in ended]
            if live:
                o = live[a % len(live)]
                ended.add(o)
                holds[o] = holds[o].close(filled[o])
        assert balance >= 0
        assert balance - held() >= 0, (balance, held())
        for o in [o for o, h in holds.items() if h.done]:
            del holds[o]
    for o, qty, cost in unapplied:  # the portfolio catches up
        balance -= cost
        holds[o] = holds[o].confirm(qty)
        assert balance - held() >= 0
    for o in holds:
        if o not in ended:
            holds[o] = holds[o].close(filled[o])
    assert held() == 0 and all(h.done for h in holds.values())
