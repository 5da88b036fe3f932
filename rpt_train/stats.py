"""Interval estimates for the evaluation's accuracies: the Wilson score interval of a binomial proportion
(well behaved at 0/n and n/n, where the normal approximation collapses to a point)."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile


def wilson(p: float | None, n: int, z: float = Z95) -> list[float] | None:
    """[lo, hi] of the Wilson interval for a proportion p observed over n trials (None when p is None or n = 0)."""
    if p is None or n == 0:
        return None
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # at p = 0 (or 1) the bound is exactly 0 (or 1); computed, it is off by a rounding error
    lo = 0.0 if p <= 0 else max(0.0, centre - half)
    hi = 1.0 if p >= 1 else min(1.0, centre + half)
    return [lo, hi]
