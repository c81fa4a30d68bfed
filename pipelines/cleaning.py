"""Spark cleaning: raw canonical events -> weighted interactions for training.

Apply it to training data only (split first, see ``models.protocol``). The steps, in order, each
logging how many rows and users it removed:

1. **invalid rows**: missing ids, type or time; negative ids; unknown event type; events after the
   reference time; negative values; ratings outside 0.5..5; items outside the catalogue (when a
   catalogue is given).
2. **bots**: users with more than 100 clickstream events in any 60-second window (all their
   events go). RATING events do not count: MovieLens users rate hundreds of films in minutes.
3. **power users**: users with more than 10,000 events.
4. **daily cap**: at most 50 clickstream events per user per UTC day, the heaviest kept (ties:
   the most recent, then event id). RATING events are exempt (MovieLens users rate in bursts:
   the cap would delete a large share of ML-100K).
5. **weights**: PURCHASE 10, ADD_TO_CART 5, CLICK 3, VIEW 1; RATING ``value - rating_offset``
   (see :class:`CleaningConfig`), times the time decay ``exp(-decay_per_day * days_ago)`` where
   ``days_ago`` counts from the reference time.

The result is one row per (user, item): the summed weight, the latest event time and the event
count, which is what Spark ALS wants (implicit feedback, confidence grows with the weight).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING

from recsys import schema as S

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)

COL_WEIGHT = "weight"
COL_N_EVENTS = "n_events"
_US_PER_DAY = 86_400 * 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {S.EventType.PURCHASE.value: 10.0, S.EventType.ADD_TO_CART.value: 5.0,
     S.EventType.CLICK.value: 3.0, S.EventType.VIEW.value: 1.0}
)


@dataclass(frozen=True)
class CleaningConfig:
    """The cleaning rules. ``rating_offset`` defines the RATING weight: ``value - rating_offset``.

    With the default 2.0 a 5-star rating weighs 3 (like a CLICK), a 3-star rating 1 (like a VIEW),
    and ratings of 2 or less weigh 0 or less: for implicit ALS a weight <= 0 means "no
    preference" (confidence ``1 + alpha * |w|``), so disliked films push their score down instead
    of counting as interest. Offsets 1 and 3 did no better on the ML-100K validation split
    (docs/training.md, "Cleaning").

    ``decay_per_day`` is lambda in ``exp(-lambda * days_ago)``. The default 0.003 (a half-life
    of about 230 days) is a mild prior that old interest counts less; stronger decay did worse on
    the ML-100K validation split (ratings are lasting tastes), so ``recsys evaluate`` tunes it
    per dataset.
    """

    bot_max_events: int = 100
    bot_window_s: int = 60
    power_user_max_events: int = 10_000
    daily_cap: int = 50
    event_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    rating_offset: float = 2.0
    decay_per_day: float = 0.003
    min_rating: float = 0.5
    max_rating: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("bot_max_events", "bot_window_s", "power_user_max_events", "daily_cap"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.decay_per_day < 0:
            problems.append(f"decay_per_day={self.decay_per_day} must be >= 0 (0 turns decay off)")
        missing = set(S.CLICKSTREAM_TYPES) - set(self.event_weights)
        if missing:
            problems.append(f"event_weights lacks {sorted(missing)}: give a weight for every clickstream type")
        if problems:
            raise ValueError("invalid cleaning config: " + "; ".join(problems))


@dataclass(frozen=True)
class StepStats:
    """What one cleaning step removed."""

    step: str
    rows_removed: int
    users_removed: int
    rows_left: int
    users_left: int


@dataclass
class CleaningResult:
    """``interactions``: one row per (user_id, item_id) with weight, event_timestamp (latest),
    n_events. ``events``: the kept events with their decayed weight. ``steps``: per-step counts."""

    interactions: DataFrame
    events: DataFrame
    steps: list[StepStats]
    reference_time: datetime

    def removed(self, step: str) -> StepStats:
        for stats in self.steps:
            if stats.step == step:
                return stats
        raise KeyError(f"no cleaning step {step!r}: steps are {[s.step for s in self.steps]}")

    def as_dict(self) -> dict[str, object]:
        return {"reference_time": self.reference_time.isoformat(),
                "steps": [stats.__dict__ for stats in self.steps]}


# ---- the rules, one small function each -------------------------------------------------------


def _ts_us() -> Column:
    from pyspark.sql import functions as F

    return F.unix_micros(F.col(S.COL_TS))


def invalid_condition(reference_us: int, cfg: CleaningConfig) -> Column:
    """True for a row that no model should learn from (see the module docstring)."""
    from pyspark.sql import functions as F

    etype, value = F.col(S.COL_EVENT_TYPE), F.col(S.COL_VALUE)
    is_rating = etype == S.EventType.RATING.value
    bad = (
        F.col(S.COL_USER).isNull() | F.col(S.COL_ITEM).isNull() | etype.isNull() | F.col(S.COL_TS).isNull()
        | (F.col(S.COL_USER) < 0) | (F.col(S.COL_ITEM) < 0)
        | ~etype.isin(*S.EVENT_TYPES)
        | (_ts_us() > F.lit(reference_us))
        | (value.isNotNull() & (value < 0))
        | (is_rating & (value.isNull() | (value < cfg.min_rating) | (value > cfg.max_rating)))
    )
    return F.coalesce(bad, F.lit(True))


def bot_users(events: DataFrame, cfg: CleaningConfig) -> DataFrame:
    """user_id of every user with more than ``bot_max_events`` clickstream events in any window of
    ``bot_window_s`` seconds. Counting, for each event, the events in the window that ends at it
    finds the busiest window: any window can slide right until it ends on an event."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    span_us = cfg.bot_window_s * 1_000_000 - 1  # [t - 60 s + 1 us, t] is 60 s long
    window = Window.partitionBy(S.COL_USER).orderBy("_ts_us").rangeBetween(-span_us, 0)
    clicks = events.filter(F.col(S.COL_EVENT_TYPE).isin(*S.CLICKSTREAM_TYPES)).withColumn("_ts_us", _ts_us())
    return (
        clicks.withColumn("_in_window", F.count(F.lit(1)).over(window))
        .groupBy(S.COL_USER).agg(F.max("_in_window").alias("_busiest"))
        .filter(F.col("_busiest") > cfg.bot_max_events)
        .select(S.COL_USER)
    )


def power_users(events: DataFrame, cfg: CleaningConfig) -> DataFrame:
    """user_id of every user with more than ``power_user_max_events`` events (all types)."""
    from pyspark.sql import functions as F

    return (
        events.groupBy(S.COL_USER).agg(F.count(F.lit(1)).alias("_n"))
        .filter(F.col("_n") > cfg.power_user_max_events).select(S.COL_USER)
    )


def base_weight(cfg: CleaningConfig) -> Column:
    """The weight of an event before time decay (module docstring, step 5)."""
    from pyspark.sql import functions as F

    weight = F.when(F.col(S.COL_EVENT_TYPE) == S.EventType.RATING.value, F.col(S.COL_VALUE) - cfg.rating_offset)
    for etype, w in cfg.event_weights.items():
        weight = weight.when(F.col(S.COL_EVENT_TYPE) == etype, F.lit(float(w)))
    return weight.otherwise(F.lit(0.0)).cast("double")


def decay(reference_us: int, cfg: CleaningConfig) -> Column:
    """``exp(-decay_per_day * days_ago)``, ``days_ago`` from the reference time (never negative)."""
    from pyspark.sql import functions as F

    days_ago = F.greatest(F.lit(0.0), (F.lit(reference_us) - _ts_us()) / F.lit(float(_US_PER_DAY)))
    return F.exp(-F.lit(cfg.decay_per_day) * days_ago)


def cap_daily(events: DataFrame, cfg: CleaningConfig) -> DataFrame:
    """Keep at most ``daily_cap`` clickstream events per user per UTC day, the heaviest (then the
    most recent, then by event id); RATING events pass untouched. Needs the ``_w0`` column."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    is_click = F.col(S.COL_EVENT_TYPE).isin(*S.CLICKSTREAM_TYPES)
    tiebreak = [F.col(S.COL_EVENT_ID).asc()] if S.COL_EVENT_ID in events.columns else [F.col(S.COL_ITEM).asc()]
    day = F.floor(_ts_us() / F.lit(_US_PER_DAY))  # UTC day, whatever the session time zone
    window = Window.partitionBy(S.COL_USER, "_day").orderBy(F.col("_w0").desc(), F.col(S.COL_TS).desc(), *tiebreak)
    clicks = events.filter(is_click).withColumn("_day", day).withColumn("_rank", F.row_number().over(window))
    kept = clicks.filter(F.col("_rank") <= cfg.daily_cap).drop("_day", "_rank")
    return kept.unionByName(events.filter(~is_click))


# ---- the pipeline -----------------------------------------------------------------------------


def _counts(df: DataFrame) -> tuple[int, int]:
    from pyspark.sql import functions as F

    row = df.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(S.COL_USER).alias("users")).first()
    return int(row["rows"]), int(row["users"])


class _Steps:
    """Runs each step on a persisted frame and records what it removed (rows and users)."""

    def __init__(self, events: DataFrame) -> None:
        # the caller's frame is never unpersisted here: it may be cached for other uses
        self._owned = not events.is_cached
        self.current = events.persist() if self._owned else events
        self.rows, self.users = _counts(self.current)
        self.stats: list[StepStats] = []
        log.info("cleaning %d events of %d users", self.rows, self.users)

    def apply(self, step: str, result: DataFrame) -> None:
        result = result.persist()
        rows, users = _counts(result)
        stats = StepStats(step, self.rows - rows, self.users - users, rows, users)
        log.info("cleaning %-12s removed %8d rows and %6d users (%d rows, %d users left)",
                 step, stats.rows_removed, stats.users_removed, rows, users)
        self.stats.append(stats)
        if self._owned:
            self.current.unpersist()
        self._owned = True
        self.current, self.rows, self.users = result, rows, users


def clean_events(
    events: DataFrame,
    reference_time: datetime,
    cfg: CleaningConfig | None = None,
    catalogue: DataFrame | None = None,
) -> CleaningResult:
    """Clean canonical training events (module docstring) as of ``reference_time``.

    ``catalogue``: an items frame with item_id; events on other items are invalid. The returned
    frames are persisted; call ``.unpersist()`` when done with them on a long-lived session.
    """
    from pyspark.sql import functions as F

    cfg = cfg or CleaningConfig()
    if reference_time.tzinfo is None:
        raise ValueError(f"reference_time={reference_time!r} is naive: pass a UTC time (tzinfo=timezone.utc)")
    # integer microseconds: a float timestamp can round the latest event into "the future"
    reference_us = (reference_time - _EPOCH) // timedelta(microseconds=1)
    missing = {S.COL_USER, S.COL_ITEM, S.COL_EVENT_TYPE, S.COL_VALUE, S.COL_TS} - set(events.columns)
    if missing:
        raise ValueError(f"events lack columns {sorted(missing)}: pass the canonical events table")

    steps = _Steps(events)
    invalid = invalid_condition(reference_us, cfg)
    if catalogue is not None:
        known = catalogue.select(S.COL_ITEM, F.lit(True).alias("_known"))
        valid = steps.current.join(F.broadcast(known), S.COL_ITEM, "left")
        steps.apply("invalid", valid.filter(~invalid & F.col("_known").isNotNull()).drop("_known"))
    else:
        steps.apply("invalid", steps.current.filter(~invalid))
    steps.apply("bots", steps.current.join(bot_users(steps.current, cfg), S.COL_USER, "left_anti"))
    steps.apply("power_users", steps.current.join(power_users(steps.current, cfg), S.COL_USER, "left_anti"))
    steps.apply("daily_cap", cap_daily(steps.current.withColumn("_w0", base_weight(cfg)), cfg))

    weighted = steps.current.withColumn(COL_WEIGHT, F.col("_w0") * decay(reference_us, cfg)).drop("_w0")
    interactions = (
        weighted.groupBy(S.COL_USER, S.COL_ITEM)
        .agg(F.sum(COL_WEIGHT).alias(COL_WEIGHT), F.max(S.COL_TS).alias(S.COL_TS),
             F.count(F.lit(1)).alias(COL_N_EVENTS))
        .persist()
    )
    return CleaningResult(interactions=interactions, events=weighted, steps=steps.stats,
                          reference_time=reference_time.astimezone(timezone.utc))
