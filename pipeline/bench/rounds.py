"""Ratios measured over several alternating rounds, and whether their spread lets one judge them.

One run of each side of a benchmark cannot tell a regression from a busy minute: ``bench train``
measured 0.99x, 1.28x and 1.35x on the same machine and commit. The benchmarks therefore run the
two sides alternately, several rounds, so that slow minutes fall on both, and report the median
ratio with its spread. A target is judged only when every round lands on the same side of it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A ratio target: ``value`` is an upper bound (``at_most``) or a lower one."""

    value: float
    at_most: bool

    def met_by(self, ratio: float) -> bool:
        return ratio <= self.value if self.at_most else ratio >= self.value

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.value:g}"


@dataclass(frozen=True)
class RoundsSummary:
    """Per-round ratios, their median and spread, and the verdict against a target.

    ``verdict`` is ``"met"`` when every round meets the target, ``"missed"`` when none does, and
    ``"spread too wide to judge"`` when the rounds fall on both sides of it (or there is one
    round only, which has no spread to judge by).
    """

    ratios: tuple[float, ...]
    target: Target

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """(max - min) / median of the rounds' ratios: 0.10 means they span 10% of the median."""
        return (max(self.ratios) - min(self.ratios)) / self.median

    @property
    def verdict(self) -> str:
        met = [self.target.met_by(ratio) for ratio in self.ratios]
        if len(self.ratios) > 1 and all(met):
            return "met"
        if len(self.ratios) > 1 and not any(met):
            return "missed"
        return "spread too wide to judge"

    def line(self, name: str) -> str:
        """One line: ``ratio: median 1.08 over 3 rounds (1.02-1.12, spread 9.3%); target <= 1.15: met``."""
        low, high = min(self.ratios), max(self.ratios)
        return (f"{name}: median {self.median:.3f} over {len(self.ratios)} rounds ({low:.3f}-{high:.3f}, "
                f"spread {100 * self.spread:.1f}%); target {self.target}: {self.verdict}")

    def as_dict(self) -> dict:
        return {"rounds": [round(r, 4) for r in self.ratios], "median": round(self.median, 4),
                "spread": round(self.spread, 4), "target": str(self.target), "verdict": self.verdict}
