"""The rounds summary of the side-by-side benchmarks: median, spread, and when it cannot judge."""

from __future__ import annotations

import pytest

from pipeline.bench.rounds import RoundsSummary, Target

AT_MOST = Target(1.15, at_most=True)
AT_LEAST = Target(2.5, at_most=False)


def test_median_and_spread_of_the_rounds():
    summary = RoundsSummary((1.28, 0.99, 1.35), AT_MOST)  # bench train's three runs in issue 18
    assert summary.median == 1.28
    assert summary.spread == pytest.approx((1.35 - 0.99) / 1.28)
    assert summary.verdict == "spread too wide to judge"
    assert summary.line("ratio") == ("ratio: median 1.280 over 3 rounds (0.990-1.350, spread 28.1%); "
                                     "target <= 1.15: spread too wide to judge")


@pytest.mark.parametrize("ratios, target, verdict", [
    ((1.02, 1.10, 1.05), AT_MOST, "met"),
    ((1.20, 1.31, 1.16), AT_MOST, "missed"),
    ((3.1, 2.6, 2.9), AT_LEAST, "met"),
    ((2.4, 1.9, 2.2), AT_LEAST, "missed"),
    ((2.4, 2.6), AT_LEAST, "spread too wide to judge"),
    ((1.02,), AT_MOST, "spread too wide to judge"),  # one round has no spread to judge by
])
def test_a_target_is_judged_only_when_every_round_lands_on_one_side(ratios, target, verdict):
    assert RoundsSummary(ratios, target).verdict == verdict
