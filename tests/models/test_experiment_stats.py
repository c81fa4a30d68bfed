"""The experiment report's statistics on hand-computed counts: the Wilson interval, the normal
interval of a mean, and the comparisons of two arms (two-proportion z-test, difference of means)."""

from __future__ import annotations

import math

import pytest

from models.experiment_stats import Z95, compare_means, compare_proportions, mean_interval, wilson


def test_z95_is_the_two_sided_normal_quantile() -> None:
    assert Z95 == pytest.approx(1.959964, abs=1e-6)


def test_wilson_interval_by_hand() -> None:
    # 1 of 5: p = 0.2, z^2/n = 3.8415/5 = 0.7683, centre = (0.2 + 0.38415)/1.7683 = 0.33034,
    # half = 1.96 * sqrt(0.2*0.8/5 + 3.8415/100) / 1.7683 = 1.96 * 0.26536 / 1.7683 = 0.29412
    one_in_five = wilson(1, 5)
    assert one_in_five.value == 0.2
    assert one_in_five.low == pytest.approx(0.33034 - 0.29412, abs=1e-4)  # 0.0362
    assert one_in_five.high == pytest.approx(0.33034 + 0.29412, abs=1e-4)  # 0.6245
    # none of 10: the interval is [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415] = [0, 0.2775]
    none = wilson(0, 10)
    assert (none.value, none.low) == (0.0, 0.0) and none.high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == wilson(0, 0).__class__(0.0, 0.0, 1.0)  # no trials: nothing known


@pytest.mark.parametrize(("successes", "trials"), [(6, 5), (-1, 5), (0, -1)])
def test_wilson_refuses_impossible_counts(successes: int, trials: int) -> None:
    with pytest.raises(ValueError, match=f"successes={successes} of trials={trials}"):
        wilson(successes, trials)


def test_mean_interval_by_hand() -> None:
    # values 0, 1, 1, 2: n = 4, sum 4, squares 6; mean 1, sample variance (6 - 16/4)/3 = 2/3,
    # half = 1.96 * sqrt(2/3 / 4) = 1.96 * 0.40825 = 0.80015
    four = mean_interval(4, 4.0, 6.0)
    assert four.value == 1.0
    assert (four.low, four.high) == (pytest.approx(1 - 0.80015, abs=1e-4), pytest.approx(1 + 0.80015, abs=1e-4))
    assert mean_interval(1, 3.0, 9.0) == four.__class__(3.0, 3.0, 3.0)  # one value: no spread known
    assert mean_interval(0, 0.0, 0.0).value == 0.0


def test_two_proportions_by_hand() -> None:
    # 30/100 against 10/100: difference 0.2; unpooled se sqrt(0.3*0.7/100 + 0.1*0.9/100) = 0.054772,
    # so the interval is 0.2 -+ 1.96 * 0.054772 = [0.0926, 0.3074]; pooled p = 0.2,
    # se sqrt(0.2*0.8*(2/100)) = 0.056569, z = 0.2/0.056569 = 3.5355, p = erfc(2.5) = 0.000407
    comp = compare_proportions("ctr", "ranker", "popularity", 30, 100, 10, 100)
    assert comp.difference.value == pytest.approx(0.2)
    assert comp.difference.low == pytest.approx(0.0926, abs=1e-4) and comp.difference.high == pytest.approx(0.3074, abs=1e-4)
    assert comp.z == pytest.approx(3.5355, abs=1e-4) and comp.p_value == pytest.approx(math.erfc(2.5))
    assert comp.significant and comp.difference.excludes_zero()
    same = compare_proportions("ctr", "b", "a", 10, 100, 10, 100)
    assert same.z == 0.0 and same.p_value == 1.0 and not same.significant
    nothing = compare_proportions("ctr", "b", "a", 0, 50, 0, 80)  # no click anywhere: no evidence
    assert nothing.z == 0.0 and nothing.p_value == 1.0


def test_two_proportions_need_trials_on_both_sides() -> None:
    with pytest.raises(ValueError, match="cannot compare 'b' \\(0 trials\\) with 'a' \\(10 trials\\)"):
        compare_proportions("ctr", "b", "a", 0, 0, 1, 10)


def test_difference_of_means_by_hand() -> None:
    # arm: 1, 2, 3 (n 3, sum 6, squares 14, variance 1); baseline: 0, 0, 0 (variance 0):
    # difference 2, se sqrt(1/3 + 0) = 0.57735, z = 3.4641, interval 2 -+ 1.1316 = [0.8684, 3.1316]
    comp = compare_means("purchases_per_user", "ranker", "blend", (3, 6.0, 14.0), (3, 0.0, 0.0))
    assert comp.difference.value == 2.0 and comp.z == pytest.approx(3.4641, abs=1e-4)
    assert comp.difference.low == pytest.approx(0.8684, abs=1e-4) and comp.difference.high == pytest.approx(3.1316, abs=1e-4)
    assert comp.p_value == pytest.approx(math.erfc(3.4641016 / math.sqrt(2)))
    with pytest.raises(ValueError, match="each needs at least 2"):
        compare_means("purchases_per_user", "ranker", "blend", (1, 1.0, 1.0), (3, 0.0, 0.0))
