"""How the demo's report and the benchmarks built on it write a share."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """`x` (a share in [0, 1]) as a whole percentage; "n/a" for None or NaN (nothing was measured)."""
    return "n/a" if x is None or x != x else f"{100 * x:.0f}%"
