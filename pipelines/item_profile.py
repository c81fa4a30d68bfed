"""The sparse ``item_profile`` snapshots (Spark): which days get a row for an item, and its values.

The values of day D are those of a daily snapshot stamped ``c_D = min(start of D+1, now)``:
catalogue attributes plus ``popularity_1d``/``popularity_7d`` (events in ``[c_D - 1 day, c_D)``
and ``[c_D - 7 days, c_D)``). An item that exists on day D (``created_at < c_D``) gets a row on
D only when one of these holds (the rule, in order):

1. D is the item's first day (created on D) or D's values differ from the item's values on D-1,
   including the day a window empties (``popularity_7d`` back to 0 seven days after the last
   event). On the first day of a run the "values on D-1" are the item's last stored row before
   the run (read from the table), so a run over later days equals a run over all of them, and a
   catalogue change between runs shows on the run's first day;
2. D is a heartbeat day: ``days since 1970-01-01`` divisible by ``heartbeat_days`` (the view's
   TTL, :data:`recsys.feature_tables.ITEM_PROFILE_TTL_DAYS`). Any TTL-long run of days holds one,
   so the point-in-time join (rows stamped within the TTL before a label) always finds the
   unchanged value while the job runs, and the TTL still means "no snapshot confirmed it";
3. D's snapshot is stamped before the end of D (``c_D = now``, the day still in progress): every
   existing item gets a row, as a dense snapshot would, so the last day of the data is complete
   for materialization and for labels after the last midnight.

Rows per item are therefore at most its changes plus one per heartbeat period plus the days in
progress, instead of one per day, and a point-in-time join returns exactly what it returns on
dense daily rows (one per item and day) for every label time up to the last snapshot.

Complete days are computed from daily event counts (each count feeds the 8 days whose windows
it touches), so the work scales with item-days that have events, not items x days.
"""

from __future__ import annotations

from datetime import date, timedelta

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import feature_tables as T
from recsys import schema as S

EPOCH = date(1970, 1, 1)
#: Columns that decide whether a day's row differs from the day before.
COMPARED = tuple(T.feature_names(T.ITEM_PROFILE))


def day_number(day: date) -> int:
    """Days since 1970-01-01 (the ``dn`` column of the snapshot days)."""
    return (day - EPOCH).days


def _dn(col: Column) -> Column:
    return F.datediff(col, F.lit(EPOCH.isoformat()))


def _output(frame: DataFrame, created: Column) -> DataFrame:
    """The stored column order (table schema plus the partition column)."""
    return frame.select(
        F.col(S.COL_ITEM), F.col("cutoff").alias(S.COL_TS), created.alias(T.CREATED),
        *[F.col(c) for c in COMPARED], F.col(T.SNAPSHOT_DATE),
    )


def partial_days_profile(events: DataFrame, items: DataFrame, partial: DataFrame) -> DataFrame:
    """Every existing item on each day still in progress (``cutoff`` before its end), counted
    exactly over ``[cutoff - 7 days, cutoff)``: few days, so a join per event is cheap."""
    counts = (
        partial.join(events.select(S.COL_ITEM, S.COL_TS),
                     (F.col(S.COL_TS) < F.col("cutoff")) & (F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 7 DAYS")))
        .groupBy(S.COL_ITEM, T.SNAPSHOT_DATE)
        .agg(F.sum((F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 1 DAYS")).cast("long")).alias("p1"),
             F.count(F.lit(1)).alias("p7"))
    )
    grid = items.crossJoin(partial).where(F.col(S.COL_CREATED_AT) < F.col("cutoff"))
    return (grid.join(counts, [S.COL_ITEM, T.SNAPSHOT_DATE], "left")
            .withColumn("popularity_1d", F.coalesce("p1", F.lit(0)).cast("long"))
            .withColumn("popularity_7d", F.coalesce("p7", F.lit(0)).cast("long")))


def _window_counts(events: DataFrame, first: int, last: int) -> DataFrame:
    """(item, dn, p1, p7, q1, q7) for complete days dn in [first, last] that any event's window
    touches: p = the day's popularity_1d/7d, q = the previous day's. A day no window touches has
    all four 0 and no row."""
    daily = (events.withColumn("edn", _dn(F.to_date(S.COL_TS)))
             .where((F.col("edn") >= first - 7) & (F.col("edn") <= last))
             .groupBy(S.COL_ITEM, "edn").agg(F.count(F.lit(1)).alias("n")))
    # an event on day E counts towards popularity_1d of E and popularity_7d of E..E+6
    spread = daily.select(S.COL_ITEM, F.col("n"), F.explode(F.sequence(F.lit(0), F.lit(7))).alias("j"),
                          F.col("edn")).withColumn("dn", F.col("edn") + F.col("j"))

    def total(condition: Column) -> Column:
        return F.sum(F.when(condition, F.col("n")).otherwise(0)).cast("long")

    j = F.col("j")
    return (spread.where((F.col("dn") >= first) & (F.col("dn") <= last))
            .groupBy(S.COL_ITEM, "dn")
            .agg(total(j == 0).alias("p1"), total(j <= 6).alias("p7"), total(j == 1).alias("q1"), total(j >= 1).alias("q7")))


def _differs(left: str, right: str) -> Column:
    """True when any compared column differs (nulls compare equal to nulls)."""
    same = F.lit(True)
    for column in COMPARED:
        same = same & F.col(f"{left}.{column}").eqNullSafe(F.col(f"{right}.{column}"))
    return ~same


def complete_days_profile(spark: SparkSession, events: DataFrame, items: DataFrame, complete: DataFrame,
                          first: int, last: int, previous: DataFrame | None, heartbeat_days: int) -> DataFrame:
    """Sparse rows for the complete days dn in [first, last] (rules 1 and 2 of the module)."""
    live = items.withColumn("created_dn", _dn(F.to_date(S.COL_CREATED_AT)))
    counts = _window_counts(events, first, last)
    zero = F.lit(0).cast("long")
    changed = (counts.where(((F.col("p1") != F.col("q1")) | (F.col("p7") != F.col("q7"))) & (F.col("dn") > first))
               .select(S.COL_ITEM, "dn"))
    beats = [d for d in range(first, last + 1) if d % heartbeat_days == 0]
    heartbeat = items.select(S.COL_ITEM).crossJoin(spark.createDataFrame([(d,) for d in beats], "dn int")) \
        if beats else None
    born = live.where(F.col("created_dn") > first).select(S.COL_ITEM, F.col("created_dn").alias("dn"))
    # the run's first day: each item against its last stored row (none stored: a row)
    at_first = (live.where(F.col("created_dn") <= first).withColumn("dn", F.lit(first))
                .join(counts.where(F.col("dn") == first), [S.COL_ITEM, "dn"], "left")
                .withColumn("popularity_1d", F.coalesce("p1", zero)).withColumn("popularity_7d", F.coalesce("p7", zero))
                .alias("now"))
    if previous is None:
        opened = at_first.select(S.COL_ITEM, "dn")
    else:
        opened = (at_first.join(previous.alias("prev"), F.col(f"now.{S.COL_ITEM}") == F.col(f"prev.{S.COL_ITEM}"), "left")
                  .where(F.col(f"prev.{S.COL_ITEM}").isNull() | _differs("now", "prev"))
                  .select(F.col(f"now.{S.COL_ITEM}").alias(S.COL_ITEM), F.col("now.dn")))
    wanted = changed.unionByName(born).unionByName(opened)
    if heartbeat is not None:
        wanted = wanted.unionByName(heartbeat)
    rows = (wanted.distinct().join(live, S.COL_ITEM)
            .where((F.col("created_dn") <= F.col("dn")) & (F.col("dn") >= first) & (F.col("dn") <= last))
            .join(counts.select(S.COL_ITEM, "dn", "p1", "p7"), [S.COL_ITEM, "dn"], "left")
            .withColumn("popularity_1d", F.coalesce("p1", zero)).withColumn("popularity_7d", F.coalesce("p7", zero)))
    return rows.join(F.broadcast(complete), "dn")


def previous_rows(spark: SparkSession, path: str, first: date, look_back_days: int) -> DataFrame | None:
    """Each item's last stored row in the ``look_back_days`` days before ``first`` (the TTL: a
    sparse table has one there for every item it holds while the job runs), or None when there
    are none (an item without one gets a row on ``first``)."""
    from pathlib import Path

    wanted = [(first - timedelta(days=k)).isoformat() for k in range(1, look_back_days + 1)]
    folders = [str(Path(path) / f"{T.SNAPSHOT_DATE}={d}") for d in wanted
               if any((Path(path) / f"{T.SNAPSHOT_DATE}={d}").glob("*.parquet"))]
    if not folders:
        return None
    from pyspark.sql import Window

    stored = spark.read.parquet(*folders)
    latest = Window.partitionBy(S.COL_ITEM).orderBy(F.desc(S.COL_TS), F.desc(T.CREATED))
    return stored.withColumn("_r", F.row_number().over(latest)).where(F.col("_r") == 1).drop("_r")


def item_profile(spark: SparkSession, events: DataFrame, items: DataFrame, days_df: DataFrame,
                 created: Column, previous: DataFrame | None, heartbeat_days: int) -> DataFrame:
    """The sparse item_profile rows for the days of ``days_df`` (``snapshot_date``, ``day``,
    ``cutoff``, ``dn``, ``complete``); ``previous``: each item's last stored row before them."""
    if heartbeat_days < 1:
        raise ValueError(f"heartbeat_days={heartbeat_days} must be >= 1 (the item_profile TTL in days)")
    spans = days_df.where("complete").agg(F.min("dn"), F.max("dn")).first()
    parts = []
    if spans is not None and spans[0] is not None:
        complete = days_df.where("complete").select("dn", "cutoff", T.SNAPSHOT_DATE)
        parts.append(complete_days_profile(spark, events, items, complete, int(spans[0]), int(spans[1]),
                                           previous, heartbeat_days))
    partial = days_df.where(~F.col("complete")).select(T.SNAPSHOT_DATE, "cutoff")
    if partial.limit(1).count():
        parts.append(partial_days_profile(events, items, F.broadcast(partial)))
    if not parts:
        raise ValueError("no snapshot days to compute")
    out = [_output(p, created) for p in parts]
    result = out[0]
    for other in out[1:]:
        result = result.unionByName(other)
    return result
