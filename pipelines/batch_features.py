"""Batch feature pipeline (Spark): canonical events and items -> daily offline feature snapshots.

For each day D in the requested range the snapshot time is ``c_D = min(start of D+1, now)`` and
every aggregate uses events strictly before ``c_D``. A label at time t therefore only ever joins
features built from events before t: the point-in-time join cannot leak the label's own event.

- ``user_profile``: one row per user and day on which the user had events (a profile only changes
  when its user acts; the view's TTL keeps it usable for two days after the last snapshot, and
  the real-time view carries the freshest state);
- ``item_profile``: one row per item and day: catalogue attributes plus popularity (events in
  the trailing 1 and 7 days).

Rows carry ``event_timestamp = c_D`` and ``created`` = the job's run time. Output is partitioned by
``snapshot_date``; a run overwrites exactly the days in its range, so reruns are idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

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


def _days(spark: SparkSession, days: DayRange, now: datetime) -> DataFrame:
    """One row per day: snapshot_date (string), day (date), cutoff = min(next midnight, now)."""
    rows = []
    d = days.first
    while d <= days.last:
        cutoff = min(datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc), now)
        rows.append((d.isoformat(), d, cutoff))
        d += timedelta(days=1)
    return spark.createDataFrame(rows, f"{T.SNAPSHOT_DATE} string, day date, cutoff timestamp")


def _write(df: DataFrame, path: str) -> None:
    # dynamic partition overwrite (recsys.spark defaults): only the days in this run are replaced
    df.write.mode("overwrite").partitionBy(T.SNAPSHOT_DATE).parquet(path)


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


def item_profile(events: DataFrame, items: DataFrame, days_df: DataFrame, created: datetime) -> DataFrame:
    counts = (
        days_df.join(events.select(S.COL_ITEM, S.COL_TS),
                     (F.col(S.COL_TS) < F.col("cutoff")) & (F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 7 DAYS")))
        .groupBy(S.COL_ITEM, T.SNAPSHOT_DATE)
        .agg(
            F.sum((F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 1 DAYS")).cast("long")).alias("popularity_1d"),
            F.count(F.lit(1)).alias("popularity_7d"),
        )
    )
    # an item exists in a snapshot once it has been created
    grid = items.crossJoin(days_df).where(F.col(S.COL_CREATED_AT) < F.col("cutoff"))
    return grid.join(counts, [S.COL_ITEM, T.SNAPSHOT_DATE], "left").select(
        F.col(S.COL_ITEM),
        F.col("cutoff").alias(S.COL_TS),
        F.lit(created).cast("timestamp").alias(T.CREATED),
        S.COL_CATEGORY, "tags", "price", "margin", "quality_score", "inventory",
        F.coalesce("popularity_1d", F.lit(0)).alias("popularity_1d"),
        F.coalesce("popularity_7d", F.lit(0)).alias("popularity_7d"),
        S.COL_CREATED_AT, "title", "image_url",
        F.col(T.SNAPSHOT_DATE),
    )


def run_batch_features(spark: SparkSession, settings: Settings, now: datetime, days: DayRange) -> dict[str, int]:
    """Compute and write both snapshot tables for ``days``; returns rows written per table."""
    events = spark.read.parquet(str(settings.dataset_path / "events")).where(F.col(S.COL_TS) < F.lit(now))
    items = spark.read.parquet(str(settings.dataset_path / "items"))
    days_df = F.broadcast(_days(spark, days, now))
    created = datetime.now(timezone.utc)
    written = {}
    for table, build in ((T.USER_PROFILE, user_profile), (T.ITEM_PROFILE, item_profile)):
        df = build(events, items, days_df, created).cache()
        written[table] = df.count()
        path = T.table_path(settings, table)
        _drop_placeholder(path)
        _write(df, str(path))
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
