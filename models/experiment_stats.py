"""The statistics of an experiment report, on counts and sums (what Spark aggregates to): 95%
intervals of a proportion (Wilson) and of a mean (normal), and the comparison of two arms, for a
proportion (difference with its unpooled normal interval, pooled two-proportion z-test) and for
a per-user mean (difference with its normal interval, Welch's z on the large-sample normal).

Every interval and p-value uses the normal distribution of the standard library: no SciPy. The
normal approximation of a mean's difference needs many users per arm (a few dozen at least); the
report says how many there were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

#: the two-sided 95% quantile of the standard normal (1.959964...)
Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Interval:
    """An estimate and its 95% interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline on one metric: the difference (arm - baseline) with its 95%
    interval, the test statistic and its two-sided p-value."""

    metric: str
    arm: str
    baseline: str
    difference: Interval
    z: float
    p_value: float

    @property
    def significant(self) -> bool:
        """At the 5% level."""
        return self.p_value < 0.05

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["significant"] = self.significant
        return out


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"successes={successes} of trials={trials}: need 0 <= successes <= trials")


def wilson(successes: int, trials: int, z: float = Z95) -> Interval:
    """The proportion ``successes / trials`` and its Wilson score interval (well-behaved near 0 and
    1, unlike the normal one). No trials: 0 within [0, 1] (nothing is known)."""
    _check_counts(successes, trials)
    if trials == 0:
        return Interval(0.0, 0.0, 1.0)
    p, n = successes / trials, trials
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 or all successes the bound is exactly 0 or 1 (the formula leaves a rounding hair)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(p, low, high)


def mean_interval(n: int, total: float, total_sq: float, z: float = Z95) -> Interval:
    """The mean of ``n`` values given their sum and sum of squares, with the normal interval
    mean +- z * s / sqrt(n) (s the sample standard deviation); fewer than two values: no spread
    is known, the interval is the mean itself."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if n == 0:
        return Interval(0.0, 0.0, 0.0)
    mean = total / n
    if n < 2:
        return Interval(mean, mean, mean)
    half = z * math.sqrt(_sample_variance(n, total, total_sq) / n)
    return Interval(mean, mean - half, mean + half)


def _sample_variance(n: int, total: float, total_sq: float) -> float:
    # max(0): the one-pass formula can dip a hair below zero in floating point for equal values
    return max(0.0, (total_sq - total * total / n) / (n - 1)) if n > 1 else 0.0


def _two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def compare_proportions(metric: str, arm: str, baseline: str, x1: int, n1: int, x0: int, n0: int,
                        z: float = Z95) -> Comparison:
    """``arm`` (x1 of n1) against ``baseline`` (x0 of n0): the difference of the proportions with
    its unpooled normal interval, and the pooled two-proportion z-test (p-value two-sided)."""
    _check_counts(x1, n1)
    _check_counts(x0, n0)
    if n1 == 0 or n0 == 0:
        raise ValueError(f"cannot compare {arm!r} ({n1} trials) with {baseline!r} ({n0} trials): both need some")
    p1, p0 = x1 / n1, x0 / n0
    diff = p1 - p0
    half = z * math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    pooled = (x1 + x0) / (n1 + n0)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    stat = diff / se if se > 0 else 0.0  # all or none clicked in both arms: no evidence of a difference
    return Comparison(metric, arm, baseline, Interval(diff, diff - half, diff + half), stat,
                      _two_sided_p(stat) if se > 0 else 1.0)


def compare_means(metric: str, arm: str, baseline: str, arm_sums: tuple[int, float, float],
                  baseline_sums: tuple[int, float, float], z: float = Z95) -> Comparison:
    """``arm`` against ``baseline`` on a per-user mean, each given as (n, sum, sum of squares): the
    difference with its normal interval (Welch's standard error) and the z-test on it."""
    (n1, s1, q1), (n0, s0, q0) = arm_sums, baseline_sums
    if n1 < 2 or n0 < 2:
        raise ValueError(f"cannot compare means of {arm!r} ({n1} users) and {baseline!r} ({n0} users): "
                         "each needs at least 2")
    diff = s1 / n1 - s0 / n0
    se = math.sqrt(_sample_variance(n1, s1, q1) / n1 + _sample_variance(n0, s0, q0) / n0)
    if se == 0:  # every user of each arm alike: any difference is certain, none is no evidence
        stat = math.copysign(math.inf, diff) if diff else 0.0
        return Comparison(metric, arm, baseline, Interval(diff, diff, diff), stat, 0.0 if diff else 1.0)
    stat = diff / se
    return Comparison(metric, arm, baseline, Interval(diff, diff - z * se, diff + z * se), stat, _two_sided_p(stat))
