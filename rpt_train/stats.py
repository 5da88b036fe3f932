"""Interval estimates for the evaluation's accuracies: the Wilson score interval of a binomial proportion
(well behaved at 0/n and n/n, where the normal approximation collapses to a point); and the experiment report's
tests: paired differences over the same positions with the design effect of positions clustered by problem, and
the detectable effect of a design."""
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


def normal_quantile(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def normal_two_sided_p(z: float) -> float:
    from statistics import NormalDist

    return 2 * (1 - NormalDist().cdf(abs(z)))


def icc_anova(groups: list[list[float]]) -> float:
    """One-way ANOVA intraclass correlation of outcomes grouped by problem, clipped to [0, 1] (0 if undefined)."""
    groups = [g for g in groups if g]
    N, k = sum(map(len, groups)), len(groups)
    if k < 2 or N <= k:
        return 0.0
    mean = sum(map(sum, groups)) / N
    msb = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups) / (k - 1)
    msw = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g) / (N - k)
    m0 = (N - sum(len(g) ** 2 for g in groups) / N) / (k - 1)
    denom = msb + (m0 - 1) * msw
    return min(1.0, max(0.0, (msb - msw) / denom)) if denom > 0 else 0.0


def design_effect(sizes: list[int], icc: float) -> float:
    """1 + (m - 1) ICC with m the size-weighted mean number of positions per problem (unequal clusters)."""
    if not sizes:
        return 1.0
    m = sum(s * s for s in sizes) / sum(sizes)
    return 1 + (m - 1) * icc


def detectable_effect(n: int, p0: float, alpha: float = 0.05, power: float = 0.8, deff: float = 1.0) -> float:
    """Smallest p1 - p0 that a two-sided two-proportion z-test (level alpha, pooled null variance) detects with
    the given power, each arm n positions deflated to n / deff effective ones (positions of one problem correlate)."""
    n_eff = n / deff
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)

    def needed(p1: float) -> float:  # positions per arm this p1 needs (Fleiss, without continuity correction)
        pbar = (p0 + p1) / 2
        num = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
        return (num / (p1 - p0)) ** 2

    lo, hi = p0, 1.0
    if needed(hi) > n_eff:
        return float("nan")  # not even p1 = 1 is detectable
    for _ in range(60):  # needed() falls as p1 moves away from p0: bisect on it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n_eff else (lo, mid)
    return hi - p0


def paired_difference(a: list[float], b: list[float], clusters: list[str], alpha: float = 0.05,
                      power: float = 0.8) -> dict:
    """Mean of d = a - b over the same positions (0/1 outcomes of two arms), with a normal interval and two-sided
    p-value whose variance var(d) / n is inflated by the design effect 1 + (m - 1) ICC of d grouped by `clusters`
    (the problem a position comes from), and the detectable effect (z_{1-alpha/2} + z_power) x SE at that design."""
    n = len(a)
    if n != len(b) or n != len(clusters):
        raise ValueError("paired_difference: a, b and clusters must have one entry per position")
    if n < 2:
        return {"n": n, "diff": None, "ci": None, "p_value": None, "se": None, "icc": None, "design_effect": None,
                "n_effective": None, "detectable_effect": None}
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    groups: dict[str, list[float]] = {}
    for x, c in zip(d, clusters):
        groups.setdefault(c, []).append(x)
    icc = icc_anova(list(groups.values()))
    deff = design_effect([len(g) for g in groups.values()], icc)
    se = math.sqrt(var / n * deff)
    z = normal_quantile(1 - alpha / 2)
    if se > 0:
        p = normal_two_sided_p(mean / se)
    else:
        p = 1.0 if mean == 0 else 0.0  # every position moved the same way
    return {"n": n, "diff": mean, "ci": [mean - z * se, mean + z * se], "p_value": p, "se": se, "icc": icc,
            "design_effect": deff, "n_effective": n / deff,
            "detectable_effect": (z + normal_quantile(power)) * se}
