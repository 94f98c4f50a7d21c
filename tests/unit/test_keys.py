"""Key layout: no two different tuples of key parts make the same Redis key, whatever the ids
contain (issue 11). The integration test ``test_identifiers`` shows the same through the API."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from services.core.hotstate import StateKeys
from services.core.keys import Keys, key_part

PART = st.text(alphabet="ab:%3A", max_size=5)


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.lists(PART, min_size=n, max_size=n),
                                                    st.lists(PART, min_size=n, max_size=n))))
def test_state_key_when_parts_differ_keys_differ(pair: tuple[list[str], list[str]]) -> None:
    one, two = pair
    keys = Keys("zvt", 1)
    assert (keys.state(0, "kind", *one) == keys.state(0, "kind", *two)) == (one == two)
    assert (keys.global_key("kind", *one) == keys.global_key("kind", *two)) == (one == two)


def test_key_part_when_plain_is_unchanged_and_otherwise_has_no_separator() -> None:
    assert key_part("pf-1") == "pf-1"
    assert key_part("acme:5") == "acme%3A5" and key_part("50%") == "50%25" and key_part("%3A") == "%253A"
    keys = Keys("zvt", 16)
    # keys with one variable part (the last) are unchanged: existing data stays where it is
    assert keys.state(3, "positions", "acme:5") == "zvt:{3}:positions:acme:5"
    assert keys.state(3, "coid", "acme", "5:x") == "zvt:{3}:coid:acme:5:x"
    assert keys.state(3, "coid", "acme:5", "x") == "zvt:{3}:coid:acme%3A5:x"


IDS = ["acme", "acme:5", "5:x", "x", "5", "acme:5:x", "a%3Ab", "coid", "order", "acme:coid", ":", "%"]

# every key builder of StateKeys: the record it names and the arguments that are parts of its
# key (the others only pick the shard). A new builder fails
# ``test_state_keys_when_ids_contain_separators_never_collide`` until it is audited here.
BUILDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "order": ("order", ("order_id",)),
    "order_in_shard": ("order", ("order_id",)),
    "client_order": ("coid", ("portfolio_id", "client_order_id")),
    "orders": ("orders", ("portfolio_id",)),
    "open_orders": ("open-orders", ()),
    "portfolio": ("portfolio", ("portfolio_id",)),
    "balances": ("balances", ("portfolio_id",)),
    "positions": ("positions", ("portfolio_id",)),
    "risk": ("risk", ("portfolio_id",)),
    "reservations": ("reservations", ("portfolio_id",)),
    "resting": ("resting", ()),  # one hash per shard
    "resting_in_shard": ("resting", ()),
    "applied_fills": ("applied", ("order_id",)),
    "cancel": ("cancel", ("order_id",)),
    "marks": ("marks", ()),
    "catalogue": ("catalogue", ()),
    "api_key": ("apikey", ("secret_hash",)),
    "api_key_index": ("apikeys", ()),
}


def test_state_keys_when_ids_contain_separators_never_collide() -> None:
    state = StateKeys(Keys("zvt", 1))  # one shard: every portfolio's keys could meet
    builders = {
        name: fn for name, fn in inspect.getmembers(state, inspect.ismethod)
        if not name.startswith("_") and name != "shard"
    }
    assert set(builders) <= set(BUILDERS), f"audit the new key builders: {set(builders) - set(BUILDERS)}"
    made: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, fn in builders.items():
        params = list(inspect.signature(fn).parameters)
        for args in itertools.product(IDS, repeat=len(params)):
            values: dict[str, object] = dict(zip(params, args, strict=True))
            if "shard" in values:
                values["shard"] = 0
            key = _call(fn, values)
            kind, parts = BUILDERS[name]
            identity = (kind, tuple(str(values[p]) for p in parts))
            assert made.setdefault(key, identity) == identity, (key, made[key], identity)


def _call(fn: Callable[..., str], values: dict[str, object]) -> str:
    return fn(**values)
