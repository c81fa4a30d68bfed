"""Helpers for the batch-feature tests: hand-written canonical datasets and the dense
``item_profile`` reference (one row per existing item and day) the sparse table is compared with."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.batch_features import DayRange
from pipelines.canonical import CanonicalWriter
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings


def write_dataset(settings: Settings, events: list[tuple], created: dict[int, str]) -> None:
    """A canonical dataset at ``settings.dataset_path``: ``events`` as (user, item, type, value,
    ISO time); ``created`` maps each item to its ISO creation time (category = item % 3)."""
    frame = pd.DataFrame(events, columns=[S.COL_USER, S.COL_ITEM, S.COL_EVENT_TYPE, S.COL_VALUE, S.COL_TS])
    frame[S.COL_EVENT_ID] = [f"e{i}" for i in range(len(frame))]
    frame[S.COL_TS] = pd.to_datetime(frame[S.COL_TS], utc=True).dt.as_unit("us")
    frame[S.COL_SESSION] = None
    frame[S.COL_CONTEXT] = None
    frame[S.COL_REQUEST_ID] = frame[S.COL_POSITION] = None  # no attribution: not live events
    ids = sorted(created)
    items = pd.DataFrame({S.COL_ITEM: ids, "title": [f"t{i}" for i in ids], S.COL_CATEGORY: [i % 3 for i in ids],
                          "tags": [[f"g{i}"] for i in ids], "price": [float(i) for i in ids], "margin": 0.1,
                          "quality_score": 4.0, "inventory": 5,
                          S.COL_CREATED_AT: pd.to_datetime([created[i] for i in ids], utc=True).as_unit("us"),
                          "image_url": None})
    with CanonicalWriter(settings.dataset_path, source="hand") as writer:
        writer.add_events(pa.Table.from_pandas(frame, schema=S.EVENTS_SCHEMA, preserve_index=False))
        writer.add_items(pa.Table.from_pandas(items, schema=S.ITEMS_SCHEMA, preserve_index=False))


def write_dense_item_profile(spark: SparkSession, settings: Settings, now: datetime, days: DayRange) -> int:
    """Replace the item_profile table with dense daily rows: every item that exists (created
    before the day's cutoff) on every day, counted by a per-day join over the events. This is
    the table as it was before snapshots became sparse: the reference for frame equality."""
    from pipelines.batch_features import snapshot_days

    events = spark.read.parquet(str(settings.dataset_path / "events")).where(F.col(S.COL_TS) < F.lit(now))
    items = spark.read.parquet(str(settings.dataset_path / "items"))
    days_df = snapshot_days(spark, days, now).select(T.SNAPSHOT_DATE, "cutoff")
    counts = (
        days_df.join(events.select(S.COL_ITEM, S.COL_TS),
                     (F.col(S.COL_TS) < F.col("cutoff")) & (F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 7 DAYS")))
        .groupBy(S.COL_ITEM, T.SNAPSHOT_DATE)
        .agg(F.sum((F.col(S.COL_TS) >= F.col("cutoff") - F.expr("INTERVAL 1 DAYS")).cast("long")).alias("popularity_1d"),
             F.count(F.lit(1)).alias("popularity_7d"))
    )
    grid = items.crossJoin(days_df).where(F.col(S.COL_CREATED_AT) < F.col("cutoff"))
    dense = grid.join(counts, [S.COL_ITEM, T.SNAPSHOT_DATE], "left").select(
        F.col(S.COL_ITEM), F.col("cutoff").alias(S.COL_TS), F.lit(now).cast("timestamp").alias(T.CREATED),
        S.COL_CATEGORY, "tags", "price", "margin", "quality_score", "inventory",
        F.coalesce("popularity_1d", F.lit(0)).alias("popularity_1d"),
        F.coalesce("popularity_7d", F.lit(0)).alias("popularity_7d"),
        S.COL_CREATED_AT, "title", "image_url", F.col(T.SNAPSHOT_DATE),
    ).cache()
    rows = dense.count()
    path = T.table_path(settings, T.ITEM_PROFILE)
    dense.write.mode("overwrite").option("partitionOverwriteMode", "static").partitionBy(T.SNAPSHOT_DATE).parquet(str(path))
    dense.unpersist()
    return rows


def read_table(settings: Settings, table: str) -> pd.DataFrame:
    """A feature table sorted by entity and time, without ``created`` (the run time)."""
    frame = pd.read_parquet(T.table_path(settings, table)).drop(columns=[T.CREATED])
    frame[T.SNAPSHOT_DATE] = frame[T.SNAPSHOT_DATE].astype(str)
    return frame.sort_values([T.entity_key(table), S.COL_TS]).reset_index(drop=True)
