"""The layers of issue 15: services/trading is the ground floor and holds the vocabulary.

Read from the source with ``ast``, so a module breaks the rule by importing, whether or not
that import runs in a test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"

VOCABULARY = {"Side", "OrderType", "TimeInForce", "Liquidity", "TradingState", "VenueQuote", "Instrument"}

BELOW_THE_GATEWAY = ("workflows", "intake")
"""Packages the gateway builds on: they raise domain errors, not the gateway's HTTP problems,
and import nothing of the gateway (issue 15 item 3)."""


def modules(under: Path) -> Iterator[tuple[str, bool, ast.Module]]:
    """``(dotted name, is a package, syntax tree)`` of every module under ``under``."""
    for path in sorted(under.rglob("*.py")):
        parts = path.relative_to(SERVICES.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_package else parts), is_package, ast.parse(path.read_text(), str(path))


def imported(module: str, is_package: bool, tree: ast.Module) -> Iterator[tuple[str, str | None, int]]:
    """``(module, name, line)`` of every import in ``tree``, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name, node.lineno


def test_trading_when_scanned_imports_nothing_of_ours_from_outside_it() -> None:
    outside: set[str] = set()
    for name, is_package, tree in modules(SERVICES / "trading"):
        for target, what, line in imported(name, is_package, tree):
            # ``from services import core`` names a package of ours too
            full = f"{target}.{what}" if target == "services" else target
            if full.split(".")[0] == "services" and full.split(".")[:2] != ["services", "trading"]:
                outside.add(f"{name}:{line} imports {full}")
    assert sorted(outside) == []


def test_workflows_and_intake_when_scanned_import_nothing_of_the_gateway() -> None:
    arrows: set[str] = set()
    for package in BELOW_THE_GATEWAY:
        for name, is_package, tree in modules(SERVICES / package):
            for target, what, line in imported(name, is_package, tree):
                # ``from services import gateway`` names the gateway too
                full = f"{target}.{what}" if target == "services" else target
                if full.split(".")[:2] == ["services", "gateway"]:
                    arrows.add(f"{name}:{line} imports {full}")
    assert sorted(arrows) == []


def test_vocabulary_when_imported_comes_from_services_trading_not_events() -> None:
    from_events = []
    for name, is_package, tree in modules(SERVICES):
        if name == "services.core.events":
            continue
        for target, what, line in imported(name, is_package, tree):
            if target == "services.core.events" and what in VOCABULARY:
                from_events.append(f"{name}:{line} imports {what} from services.core.events")
        # ``from services.core import events`` then ``events.Side``
        aliases = {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "services.core"
            for a in node.names
            if a.name == "events"
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr in VOCABULARY
            ):
                from_events.append(f"{name}:{node.lineno} reads events.{node.attr}")
    assert from_events == []


def test_vocabulary_when_exported_from_trading_is_the_same_objects_events_re_exports() -> None:
    import services.core.events as events
    import services.trading as trading

    for word in VOCABULARY - {"Instrument"}:
        assert getattr(events, word) is getattr(trading, word), word
        assert getattr(trading, word).__module__ == "services.trading.vocabulary", word
    assert trading.Instrument.__module__ == "services.trading.vocabulary"
