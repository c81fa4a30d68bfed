"""Batch feature pipeline (Spark): canonical events and items -> daily offline feature snapshots.

For each day D in the requested range the snapshot time is ``c_D = min(start of D+1, now)`` and
every aggregate uses events strictly before ``c_D``. A label at time t therefore only ever joins
features built from events before t: the point-in-time join cannot leak the label's own event.

- ``user_profile``: one row per user and day on which the user had events (a profile only changes
  when its user acts; the view's TTL keeps it usable for two days after the last snapshot, and
  the real-time view carries the freshest state);
- ``item_profile``: catalogue attributes plus popularity (events in the trailing 1 and 7 days),
  sparse: a row for an item on a day only when its values changed since the day before (the day
  a window empties included), on a heartbeat day every ``ITEM_PROFILE_TTL_DAYS`` days, and on the
  day still in progress (:mod:`pipelines.item_profile` has the rule and why point-in-time joins
  return what dense daily rows would give).

Rows carry ``event_timestamp = c_D`` and ``created`` = the job's run time. Output is partitioned by
``snapshot_date``; a run replaces exactly the days in its range (a day left without rows loses its
old ones), so reruns are idempotent, and a run over later days equals a run over all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.item_profile import day_number, item_profile, previous_rows
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

TOP_CATEGORIES = 3
CATEGORY_WINDOW_DAYS = 30


@dataclass(frozen=True)
class DayRange:
    """Inclusive range of UTC days whose snapshots a run (re)computes."""

    first: date
    last: date

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError(f"empty day range: {self.first} > {self.last}: swap the dates")

    @classmethod
    def ending_at(cls, now: datetime, days: int) -> DayRange:
        last = now.astimezone(timezone.utc).date()
        return cls(last - timedelta(days=days - 1), last)


def snapshot_days(spark: SparkSession, days: DayRange, now: datetime) -> DataFrame:
    """One row per day: snapshot_date (string), day (date), cutoff = min(next midnight, now),
    dn (days since 1970-01-01) and complete (the cutoff is the next midnight)."""
    rows = []
    d = days.first
    while d <= days.last:
        midnight = datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
        cutoff = min(midnight, now)
        rows.append((d.isoformat(), d, cutoff, day_number(d), cutoff == midnight))
        d += timedelta(days=1)
    return spark.createDataFrame(rows, f"{T.SNAPSHOT_DATE} string, day date, cutoff timestamp, dn int, complete boolean")


def _write(df: DataFrame, path: str, days: DayRange) -> None:
    # dynamic partition overwrite (recsys.spark defaults): only the days in this run are replaced;
    # a day of the range that now has no rows (sparse tables) would keep its old partition, so it goes
    written = {str(r[0]) for r in df.select(T.SNAPSHOT_DATE).distinct().collect()}
    # one file per day: without the repartition every task writes a file into every day it holds
    # (shuffle partitions x days files, most of them a few rows: 60k files for 20 years, which
    # take longer to write, list and read back in the point-in-time joins than their rows)
    df.repartition(T.SNAPSHOT_DATE).write.mode("overwrite").partitionBy(T.SNAPSHOT_DATE).parquet(path)
    import shutil
    from pathlib import Path

    d = days.first
    while d <= days.last:
        folder = Path(path) / f"{T.SNAPSHOT_DATE}={d.isoformat()}"
        if d.isoformat() not in written and folder.is_dir():
            shutil.rmtree(folder)
        d += timedelta(days=1)


def user_profile(events: DataFrame, items: DataFrame, days_df: DataFrame, created: datetime) -> DataFrame:
    """Cumulative per-user stats as of each day the user was active (scales with active user-days)."""
    is_type = {t: (F.col(S.COL_EVENT_TYPE) == t).cast("long") for t in S.EVENT_TYPES}
    is_rating = F.col(S.COL_EVENT_TYPE) == "RATING"
    daily = (
        events.withColumn("day", F.to_date(S.COL_TS))
        .groupBy(S.COL_USER, "day")
        .agg(
            F.count(F.lit(1)).alias("d_events"),
            *[F.sum(is_type[t]).alias(f"d_{t}") for t in S.EVENT_TYPES],
            F.sum(F.when(is_rating, F.col(S.COL_VALUE))).alias("d_rating_sum"),
            F.min(S.COL_TS).alias("d_first"),
        )
        .withColumn("dn", F.datediff("day", F.lit("1970-01-01")))
    )
    upto = Window.partitionBy(S.COL_USER).orderBy("dn").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    week = Window.partitionBy(S.COL_USER).orderBy("dn").rangeBetween(-6, 0)
    cum = daily.select(
        S.COL_USER, "day", "dn",
        F.sum("d_events").over(upto).alias("n_events"),
        F.sum("d_VIEW").over(upto).alias("n_views"),
        F.sum("d_CLICK").over(upto).alias("n_clicks"),
        F.sum("d_ADD_TO_CART").over(upto).alias("n_carts"),
        F.sum("d_PURCHASE").over(upto).alias("n_purchases"),
        F.sum("d_RATING").over(upto).alias("n_ratings"),
        F.sum("d_rating_sum").over(upto).alias("rating_sum"),
        F.sum("d_events").over(week).alias("n_events_7d"),
        F.min("d_first").over(upto).alias("first_seen"),
    ).join(days_df, "day")  # keep only the days this run writes

    # top categories over the trailing window, by count, then recency, then id: deterministic
    cat_daily = (
        events.join(items.select(S.COL_ITEM, S.COL_CATEGORY), S.COL_ITEM)
        .withColumn("cdn", F.datediff(F.to_date(S.COL_TS), F.lit("1970-01-01")))
        .groupBy(S.COL_USER, S.COL_CATEGORY, "cdn")
        .agg(F.count(F.lit(1)).alias("n"), F.max(S.COL_TS).alias("last"))
    )
    recent = (
        cum.select(S.COL_USER, T.SNAPSHOT_DATE, "dn")
        .join(cat_daily, S.COL_USER)
        .where((F.col("cdn") <= F.col("dn")) & (F.col("cdn") > F.col("dn") - CATEGORY_WINDOW_DAYS))
        .groupBy(S.COL_USER, T.SNAPSHOT_DATE, S.COL_CATEGORY)
        .agg(F.sum("n").alias("n"), F.max("last").alias("last"))
    )
    rank = Window.partitionBy(S.COL_USER, T.SNAPSHOT_DATE).orderBy(F.desc("n"), F.desc("last"), F.asc(S.COL_CATEGORY))
    top = (
        recent.withColumn("r", F.row_number().over(rank))
        .where(F.col("r") <= TOP_CATEGORIES)
        .groupBy(S.COL_USER, T.SNAPSHOT_DATE)
        .agg(F.sort_array(F.collect_list(F.struct("r", S.COL_CATEGORY))).alias("ranked"))
        .select(S.COL_USER, T.SNAPSHOT_DATE, F.col(f"ranked.{S.COL_CATEGORY}").alias("top_categories"))
    )
    return cum.join(top, [S.COL_USER, T.SNAPSHOT_DATE], "left").select(
        F.col(S.COL_USER),
        F.col("cutoff").alias(S.COL_TS),
        F.lit(created).cast("timestamp").alias(T.CREATED),
        *[F.col(c) for c in ("n_events", "n_views", "n_clicks", "n_carts", "n_purchases", "n_ratings")],
        F.when(F.col("n_ratings") > 0, F.col("rating_sum") / F.col("n_ratings")).alias("mean_rating"),
        F.col("n_events_7d"),
        ((F.col("cutoff").cast("double") - F.col("first_seen").cast("double")) / 86400.0).alias("days_since_first_seen"),
        F.coalesce(F.col("top_categories"), F.array().cast("array<bigint>")).alias("top_categories"),
        F.col(T.SNAPSHOT_DATE),
    )


def run_batch_features(spark: SparkSession, settings: Settings, now: datetime, days: DayRange,
                       heartbeat_days: int = T.ITEM_PROFILE_TTL_DAYS) -> dict[str, int]:
    """Compute and write both snapshot tables for ``days``; returns rows written per table.

    ``heartbeat_days`` must not exceed item_profile's TTL in days (the declared TTL is the
    default): a longer period would let unchanged values age out of point-in-time joins."""
    if not 1 <= heartbeat_days <= T.ITEM_PROFILE_TTL_DAYS:
        raise ValueError(f"heartbeat_days={heartbeat_days} must be within 1..{T.ITEM_PROFILE_TTL_DAYS} "
                         "(item_profile's TTL in days, recsys.feature_tables.ITEM_PROFILE_TTL_DAYS)")
    events = spark.read.parquet(str(settings.dataset_path / "events")).where(F.col(S.COL_TS) < F.lit(now))
    items = spark.read.parquet(str(settings.dataset_path / "items"))
    days_df = snapshot_days(spark, days, now)
    created = datetime.now(timezone.utc)
    item_path = T.table_path(settings, T.ITEM_PROFILE)
    # the look-back is the TTL, not this run's heartbeat: earlier runs may have beaten less often
    previous = previous_rows(spark, str(item_path), days.first, T.ITEM_PROFILE_TTL_DAYS)
    builds = {
        T.USER_PROFILE: lambda: user_profile(events, items, F.broadcast(days_df.select(T.SNAPSHOT_DATE, "day", "cutoff")),
                                             created),
        T.ITEM_PROFILE: lambda: item_profile(spark, events, items, days_df, F.lit(created).cast("timestamp"),
                                             previous, heartbeat_days),
    }
    written = {}
    for table, build in builds.items():
        df = build().cache()
        written[table] = df.count()
        path = T.table_path(settings, table)
        _drop_placeholder(path)
        _write(df, str(path), days)
        df.unpersist()
        log.info("%s: wrote %d rows for %s..%s", table, written[table], days.first, days.last)
    return written


def _drop_placeholder(path: object) -> None:
    """Remove the empty schema-only partition that feature_tables.ensure_tables left for apply."""
    import shutil
    from pathlib import Path

    placeholder = Path(str(path)) / f"{T.SNAPSHOT_DATE}=1970-01-01"
    if placeholder.is_dir():
        shutil.rmtree(placeholder)
