"""Backfill of ``user_realtime`` history from the offline events, with the stream's rules.

A Spark job: events up to a cutoff, joined to their items' categories, grouped by user, and each
user's events folded by :func:`fold_frame` (``applyInPandas``), which calls the one implementation
of the rules (:mod:`pipelines.realtime_rules`). It writes one row after every applied event
(``event_timestamp`` = the event's time; several events at the same instant give one row, the
state after all of them; ``created`` = when the job ran) into the ``user_realtime`` offline table,
so point-in-time training frames get the real-time features as they were at every past moment.

Idempotent: the job's files are ``backfill-*.parquet`` in the table folder and a rerun replaces
them (the stream's own files are left alone). With ``seed_state`` it also writes each user's final
fold state to Redis and pushes the final rows online, so ``recsys stream run`` continues from the
cutoff as if it had consumed everything before it, and replaces each user's purchased-item set
(:func:`recsys.schema.purchased_key`, the latest ``stream_purchased_max`` purchases, which serving
never recommends) with the one in that state; run it with the stream stopped.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.realtime_rules import PURCHASED_MAX, DedupeWindow, Event, Outcome, UserState, fold_user
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

BACKFILL_PREFIX = "backfill-"
_FOLD_SCHEMA = (
    "user_id long, last_us long, last_5_items array<long>, interaction_count long, total_purchases long, "
    "preferred_categories array<long>, state binary"
)
_EVENT_COLUMNS = [S.COL_EVENT_ID, S.COL_USER, S.COL_ITEM, S.COL_EVENT_TYPE, S.COL_VALUE, "ts_us", S.COL_CATEGORY]


def frame_events(pdf: pd.DataFrame) -> list[Event]:
    """Rows with ``_EVENT_COLUMNS`` (``ts_us`` in epoch microseconds) as rule events."""
    return [
        Event(str(eid), int(user), int(item), str(etype), None if value != value or value is None else float(value),
              int(ts), None if cat != cat or cat is None else int(cat))
        for eid, user, item, etype, value, ts, cat in pdf[_EVENT_COLUMNS].itertuples(index=False, name=None)
    ]


def fold_frame(pdf: pd.DataFrame, window: DedupeWindow, purchased_max: int = PURCHASED_MAX) -> pd.DataFrame:
    """One user's events -> a row after each applied event (the last one per instant); the final
    state (serialized, purchased items bounded by ``purchased_max``) is on the user's last row."""
    rows: list[list[object]] = []
    state = UserState()
    for _, outcome, st in fold_user(frame_events(pdf), window, state, purchased_max):
        if outcome is not Outcome.APPLIED:
            continue
        row = [int(pdf[S.COL_USER].iat[0]), st.last_us, st.last_5_items, st.count, st.purchases,
               st.preferred_categories, None]
        if rows and rows[-1][1] == st.last_us:
            rows[-1] = row
        else:
            rows.append(row)
    if rows:
        rows[-1][6] = state.dumps()
    return pd.DataFrame(rows, columns=["user_id", "last_us", "last_5_items", "interaction_count", "total_purchases",
                                       "preferred_categories", "state"])


@dataclass(frozen=True)
class BackfillResult:
    rows: int
    users: int
    seeded: int
    path: Path


def dedupe_window(settings: Settings) -> DedupeWindow:
    return DedupeWindow(settings.stream_dedupe_window_s * 1_000_000, settings.stream_dedupe_max_ids)


def run_backfill(spark: SparkSession, settings: Settings, end: datetime, seed_state: bool = False) -> BackfillResult:
    """Fold every event up to ``end`` into user_realtime history rows (see the module docstring)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    end = end if end.tzinfo else end.replace(tzinfo=timezone.utc)
    window, purchased_max = dedupe_window(settings), settings.stream_purchased_max

    def fold(pdf: pd.DataFrame) -> pd.DataFrame:  # typed, so Spark knows it is a grouped-map function
        return fold_frame(pdf, window, purchased_max)

    created = datetime.now(timezone.utc)
    events = spark.read.parquet(str(settings.dataset_path / "events")).where(F.col(S.COL_TS) <= F.lit(end))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM, S.COL_CATEGORY)
    folded = (events.join(items, S.COL_ITEM, "left")
              .withColumn("ts_us", F.unix_micros(S.COL_TS))
              .select(*_EVENT_COLUMNS)
              .groupBy(S.COL_USER)
              .applyInPandas(fold, schema=_FOLD_SCHEMA)
              .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        table = T.table_path(settings, T.USER_REALTIME)
        staging = table.parent / f".{T.USER_REALTIME}-backfill-{uuid.uuid4().hex[:8]}"
        rows = (folded.withColumn(S.COL_TS, F.timestamp_micros("last_us"))
                .withColumn(T.CREATED, F.lit(created))
                .withColumn("last_action_ts", F.col(S.COL_TS))
                .select(*T.table_schema(T.USER_REALTIME).names))
        rows.write.mode("overwrite").parquet(str(staging))
        n_rows = _replace_backfill_files(staging, table)
        users = folded.where(F.col("state").isNotNull())
        n_users = users.count()
        seeded = _seed_state(settings, users.select("user_id", "state").toLocalIterator()) if seed_state else 0
    finally:
        folded.unpersist()
    log.info("backfill end=%s rows=%d users=%d seeded=%d", end.isoformat(), n_rows, n_users, seeded)
    return BackfillResult(n_rows, n_users, seeded, table)


def _replace_backfill_files(staging: Path, table: Path) -> int:
    """Swap the previous run's backfill files for this run's (a rerun never duplicates rows)."""
    import pyarrow.parquet as pq

    table.mkdir(parents=True, exist_ok=True)
    for old in table.glob(f"{BACKFILL_PREFIX}*.parquet"):
        old.unlink()
    n_rows = 0
    for i, part in enumerate(sorted(staging.glob("part-*.parquet"))):
        n_rows += pq.read_metadata(part).num_rows
        part.rename(table / f"{BACKFILL_PREFIX}{i:05d}.parquet")
    shutil.rmtree(staging, ignore_errors=True)
    return n_rows


def _seed_state(settings: Settings, states: object, chunk: int = 5_000) -> int:
    """Write final states to the stream's Redis keys, their purchased-item sets (each replaced by
    the state's list: a rerun never leaves a stale item) and their rows online (Feast push)."""
    import redis

    from pipelines.feature_store import get_store, push_user_realtime
    from pipelines.stream.online_writer import rows_frame, state_row
    from pipelines.stream.state import StateStore

    client = redis.Redis.from_url(settings.effective_redis_url)
    store = StateStore(client, settings.feast_project, settings.events_topic)
    feast = get_store(settings, skip_dedup=True)
    created_us = int(datetime.now(timezone.utc).timestamp() * 1_000_000)
    n = 0
    batch: list[tuple[int, UserState]] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=True)  # serving never sees a set deleted and not yet refilled
        for user, st in batch:
            pipe.set(store.state_key(user), st.dumps())
            pipe.delete(S.purchased_key(user))
            if st.bought:
                pipe.sadd(S.purchased_key(user), *st.purchased_items)
        pipe.execute()
        push_user_realtime(feast, rows_frame([state_row(u, st, created_us) for u, st in batch]), online=True)
        batch.clear()

    for row in states:  # type: ignore[attr-defined]
        batch.append((int(row["user_id"]), UserState.loads(bytes(row["state"]))))
        n += 1
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    client.close()
    return n
