"""Rebuild positions from recorded fills (pure; no I/O) and compare them with live ones.

A position is the fold of its fills, in the order the portfolio service applied them: the
``sequence`` each ``position.updated`` carries. A fill without its ``position.updated`` was
never applied (or its update was lost); a ``position.updated`` without its fill points the
other way. Either is a difference, as is any field of a rebuilt position that is not exactly
the live one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.core.events import OrderExecuted, PositionUpdated
from services.core.hotstate import PositionRecord
from services.trading.money import ZERO
from services.trading.positions import Position

__all__ = ["Rebuilt", "compare", "rebuild"]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    positions: dict[tuple[str, str], PositionRecord]
    """(portfolio, symbol) -> the position its recorded fills add up to."""
    problems: list[str]
    fills: int


def rebuild(
    fills: Iterable[tuple[str, OrderExecuted]], updates: Iterable[tuple[str, PositionUpdated]]
) -> Rebuilt:
    """``fills`` and ``updates`` as ``(portfolio_id, payload)``, duplicates allowed."""
    by_fill: dict[tuple[str, str], OrderExecuted] = {}
    for pid, fill in fills:
        by_fill.setdefault((pid, fill.fill_id), fill)
    sequence: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    for pid, update in updates:
        if update.fill_id is None:
            continue
        key = (pid, update.fill_id)
        if key in sequence and sequence[key] != update.sequence:
            problems.append(f"{pid}: fill {update.fill_id} has two position updates ({sequence[key]}, {update.sequence})")
        sequence.setdefault(key, update.sequence)
    ordered: dict[tuple[str, str], list[tuple[int, OrderExecuted]]] = {}
    for key, fill in by_fill.items():
        seq = sequence.get(key)
        if seq is None:
            problems.append(f"{key[0]}: fill {fill.fill_id} of order {fill.order_id} was never applied to a position")
            continue
        ordered.setdefault((key[0], fill.symbol), []).append((seq, fill))
    for key in sequence.keys() - by_fill.keys():
        problems.append(f"{key[0]}: position update for fill {key[1]}, which is not in the event store")
    positions: dict[tuple[str, str], PositionRecord] = {}
    for (pid, symbol), items in sorted(ordered.items()):
        items.sort(key=lambda item: item[0])
        expected = list(range(1, len(items) + 1))
        if [s for s, _ in items] != expected:
            problems.append(f"{pid} {symbol}: fill sequence {[s for s, _ in items]} has gaps or repeats")
        position = Position(symbol=symbol)
        quote = symbol.partition("/")[2]
        for _, fill in items:
            fee = fill.commission if fill.commission_asset == quote else ZERO
            position = position.apply_fill(fill.side, fill.quantity, fill.price, fee)
        positions[(pid, symbol)] = PositionRecord(
            symbol=symbol, quantity=position.quantity, cost_basis=position.cost_basis,
            realized_pnl=position.realized_pnl, fills=len(items),
        )
    return Rebuilt(positions, problems, len(by_fill))


def compare(rebuilt: Mapping[tuple[str, str], PositionRecord], live: Mapping[tuple[str, str], PositionRecord]) -> list[str]:
    """Every way the live positions differ from the rebuilt ones (empty: they are equal)."""
    diffs: list[str] = []
    for key in sorted(rebuilt.keys() | live.keys()):
        pid, symbol = key
        r, lv = rebuilt.get(key), live.get(key)
        if r is None:
            assert lv is not None
            diffs.append(f"{pid} {symbol}: live position {lv.quantity} has no recorded fills")
            continue
        if lv is None:
            diffs.append(f"{pid} {symbol}: recorded fills add up to {r.quantity}, no live position")
            continue
        for name in ("quantity", "cost_basis", "realized_pnl", "fills"):
            a, b = getattr(r, name), getattr(lv, name)
            if a != b:
                diffs.append(f"{pid} {symbol}: {name} replayed {a} != live {b}")
    return diffs
