"""The pure logic of the closed-loop benchmark (`benchmarks/loop_stats.py`): CTR per arm with its
interval and the goal, the median of per-round p99s, the event-to-offline latencies and the
split of users into disjoint phases. No service: the benchmark itself is run by hand."""

from __future__ import annotations

import pytest

from benchmarks.loop_stats import ctr_keys, disjoint, goals, median_p99, offline_latencies, promotion_keys
from pipelines.simulator import GroupStats


def test_ctr_per_arm_is_clicks_over_shown_items_with_wilson_intervals() -> None:
    groups = {"popularity": GroupStats(impressions=1000, clicks=50), "blend": GroupStats(impressions=1000, clicks=100),
              "ranker": GroupStats(impressions=1000, clicks=150)}
    keys = ctr_keys(groups)
    assert keys["ctr_ranker"] == 0.15 and keys["ctr_blend"] == 0.1  # 150 / 1000, 100 / 1000
    assert keys["impressions_popularity"] == 1000 and keys["clicks_popularity"] == 50
    # Wilson, z = 1.96, 150 of 1000: centre 0.15192 / 1.00384 = 0.15134, half 0.02213
    assert keys["ctr_ranker_ci_low"] == pytest.approx(0.1292, abs=1e-4)
    assert keys["ctr_ranker_ci_high"] == pytest.approx(0.1735, abs=1e-4)
    # 50 of 1000: [0.0381, 0.0653]; the ranker's low 0.129 is above 0.0653
    assert keys["ctr_popularity_ci_high"] == pytest.approx(0.0653, abs=1e-4)
    assert keys["goal_ranker_beats_popularity"] is True


def test_overlapping_intervals_miss_the_goal_and_an_arm_without_answers_knows_nothing() -> None:
    keys = ctr_keys({"popularity": GroupStats(impressions=1000, clicks=50),
                     "ranker": GroupStats(impressions=1000, clicks=60)})
    # 60 of 1000: low 0.0469, below popularity's high 0.0653
    assert keys["goal_ranker_beats_popularity"] is False
    assert (keys["ctr_blend"], keys["ctr_blend_ci_low"], keys["ctr_blend_ci_high"]) == (0.0, 0.0, 1.0)
    assert keys["impressions_blend"] == 0


def test_median_of_the_per_round_p99s() -> None:
    rounds = [[float(v) for v in range(1, 101)], [2.0] * 100, [float(v) for v in range(101, 201)]]
    # p99 (linear) of 1..100: 1 + 0.99 * 99 = 99.01; of the constant: 2.0; of 101..200: 199.01
    assert median_p99(rounds) == pytest.approx(99.01)
    assert median_p99([[3.0], []]) == 3.0  # an empty round is left out


def test_median_p99_without_latencies_says_so() -> None:
    with pytest.raises(ValueError, match="every round was empty"):
        median_p99([[], []])


def test_offline_latencies_from_acceptance_to_first_sighting() -> None:
    accepted = {"a": 100.0, "b": 100.0, "c": 200.0}
    out = offline_latencies(accepted, {"a": 101.0, "b": 161.0, "other": 5.0})
    # lags 1 and 61 s: p50 31, p99 1 + 0.99 * 60 = 60.4; "c" never seen
    assert out == {"event_to_offline_p50_s": 31.0, "event_to_offline_p99_s": 60.4, "event_to_offline_max_s": 61.0,
                   "events_sent": 3, "events_missing_offline": 1}
    assert offline_latencies(accepted, {})["event_to_offline_p99_s"] is None


def test_disjoint_slices_and_a_pool_too_small() -> None:
    assert disjoint(list(range(10)), [3, 2]) == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(SystemExit, match="5 active users cannot be split into \\[3, 2\\]"):
        disjoint(list(range(5)), [3, 2])


def test_promotion_is_the_slower_of_the_two_and_none_if_one_never_arrived() -> None:
    assert promotion_keys([9.571, 11.224]) == {"promotion_to_served_s": 11.22,
                                               "promotion_to_served_s_each": [9.57, 11.22]}
    assert promotion_keys([9.5, None])["promotion_to_served_s"] is None


def test_goals_on_a_run() -> None:
    numbers = {"hit_p99_ms_with_impressions": 2.9, "hit_p99_ms_without_impressions": 2.5,
               "promotion_to_served_s": 12.0, "event_to_offline_p99_s": 85.0, "events_missing_offline": 0}
    # 85 s < 60 s flush + 30 s margin; 2.9 ms < 3 ms; 12 s < 30 s
    assert goals(numbers, 60.0) == {"goal_hit_p99_under_3ms": True, "goal_promotion_under_30s": True,
                                    "goal_event_to_offline": True}
    worse = {**numbers, "hit_p99_ms_with_impressions": 3.2, "promotion_to_served_s": None,
             "events_missing_offline": 1}
    assert goals(worse, 60.0) == {"goal_hit_p99_under_3ms": False, "goal_promotion_under_30s": False,
                                  "goal_event_to_offline": False}
    assert goals(numbers, 50.0)["goal_event_to_offline"] is False  # 85 s > 50 + 30
