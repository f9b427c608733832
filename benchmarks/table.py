"""The one table every benchmark ends with: anchor, chainforget's figure, the anchor's figure, ratio, target, met."""

from __future__ import annotations

from typing import NamedTuple


class Row(NamedTuple):
    anchor: str
    ours: str
    theirs: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


def print_table(rows: list[Row]) -> None:
    width = max(len(row.anchor) for row in rows)
    print(f"\n{'anchor':<{width}}  {'chainforget':>16}  {'anchor':>10}  {'ratio':>6}  {'target':>9}  met")
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        met = "" if row.met is None else ("yes" if row.met else "no")
        print(f"{row.anchor:<{width}}  {row.ours:>16}  {row.theirs:>10}  {ratio:>6}  {row.target:>9}  {met}")
