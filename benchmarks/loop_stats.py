"""The pure logic of the closed-loop benchmark (:mod:`benchmarks.loop`): CTR per arm with its
interval and the goal, the median of per-round p99s, the event-to-offline latencies, and the
split of the users into disjoint phases."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from models.experiment_stats import wilson

#: the arms, each named after its scoring mode (:mod:`bentos.experiments`)
ARMS = ("popularity", "blend", "ranker")
#: the issue's goals: hit p99 (both services), promotion to served, event to offline past the flush
HIT_P99_GOAL_MS = 3.0
PROMOTION_GOAL_S = 30.0
OFFLINE_MARGIN_S = 30.0


class ArmCounts(Protocol):
    """What the CTR of an arm needs from the simulator's per-group counts (``GroupStats``)."""

    impressions: int
    clicks: int


def ctr_keys(groups: Mapping[str, ArmCounts], arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """Per arm ``ctr_{arm}`` (clicks / impressions of shown items) with its 95% Wilson interval
    (``_ci_low``, ``_ci_high``) and the counts; an arm without impressions gets CTR 0 within
    [0, 1]. Adds ``goal_ranker_beats_popularity``: the ranker's interval above popularity's."""
    out: dict[str, Any] = {}
    for arm in arms:
        found = groups.get(arm)
        clicks, shown = (found.clicks, found.impressions) if found is not None else (0, 0)
        ci = wilson(clicks, shown)
        out.update({f"ctr_{arm}": ci.value, f"ctr_{arm}_ci_low": ci.low, f"ctr_{arm}_ci_high": ci.high,
                    f"impressions_{arm}": shown, f"clicks_{arm}": clicks})
    if "ranker" in arms and "popularity" in arms:
        out["goal_ranker_beats_popularity"] = out["ctr_ranker_ci_low"] > out["ctr_popularity_ci_high"]
    return out


def median_p99(rounds: Sequence[Sequence[float]]) -> float:
    """The median over rounds of each round's p99 (numpy's linear interpolation); rounds are the
    latencies (ms) of one service in one round. Raises ValueError without a non-empty round."""
    p99s = [float(np.percentile(r, 99)) for r in rounds if len(r)]
    if not p99s:
        raise ValueError("no latencies: every round was empty (did the phase time out?)")
    return statistics.median(p99s)


def offline_latencies(accepted: Mapping[str, float], seen: Mapping[str, float]) -> dict[str, Any]:
    """From acceptance (epoch s per event id) to the first sighting offline (epoch s): p50, p99 and
    max over the events seen (None if none was), and how many were never seen."""
    lags = [seen[e] - t for e, t in accepted.items() if e in seen]
    pick = (lambda q: round(float(np.percentile(lags, q)), 3)) if lags else (lambda q: None)
    return {"event_to_offline_p50_s": pick(50), "event_to_offline_p99_s": pick(99),
            "event_to_offline_max_s": round(max(lags), 3) if lags else None,
            "events_sent": len(accepted), "events_missing_offline": len(accepted) - len(lags)}


def disjoint(pool: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive slices of ``pool`` of the given sizes, the last taking the rest; SystemExit
    naming the numbers when the pool is too small for every slice to get at least one user."""
    if sum(sizes) >= len(pool):
        raise SystemExit(f"{len(pool)} active users cannot be split into {list(sizes)} and the simulator's: "
                         "lower --hit-users or --events")
    out, start = [], 0
    for size in sizes:
        out.append(list(pool[start:start + size]))
        start += size
    return [*out, list(pool[start:])]


def promotion_keys(seconds: Sequence[float | None]) -> dict[str, Any]:
    """``promotion_to_served_s``: the slowest of the timed promotions (None when one never reached
    the answers, or none was timed), and each of them."""
    slowest = None if not seconds or None in seconds else max(t for t in seconds if t is not None)
    return {"promotion_to_served_s": None if slowest is None else round(slowest, 2),
            "promotion_to_served_s_each": [None if t is None else round(t, 2) for t in seconds]}


def goals(numbers: Mapping[str, Any], flush_s: float) -> dict[str, bool]:
    """The issue's goals on a run's numbers: both hit p99s under :data:`HIT_P99_GOAL_MS`, the
    promotion under :data:`PROMOTION_GOAL_S`, every event offline within the flush period plus
    :data:`OFFLINE_MARGIN_S` at p99 (a missing one fails it)."""
    promoted, p99 = numbers["promotion_to_served_s"], numbers["event_to_offline_p99_s"]
    return {"goal_hit_p99_under_3ms": max(numbers["hit_p99_ms_with_impressions"],
                                          numbers["hit_p99_ms_without_impressions"]) < HIT_P99_GOAL_MS,
            "goal_promotion_under_30s": promoted is not None and promoted < PROMOTION_GOAL_S,
            "goal_event_to_offline": (p99 is not None and numbers["events_missing_offline"] == 0
                                      and p99 < flush_s + OFFLINE_MARGIN_S)}
