"""The package says what it exports, and exports only what exists."""

from __future__ import annotations

import services.trading as trading


def test_all_when_imported_names_exactly_the_public_members() -> None:
    public = {name for name in vars(trading) if not name.startswith("_") and name not in {"annotations"}}
    modules = {"catalogue", "funds", "money", "orders", "positions", "risk", "routing", "terms", "vocabulary"}
    assert set(trading.__all__) == public - modules
    assert trading.__all__ == sorted(trading.__all__, key=lambda n: (not n.isupper(), n))
