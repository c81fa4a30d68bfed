"""Batch features on hand-computable fixtures (real Spark, local mode), and the sparse
item_profile against dense daily rows through Feast's point-in-time join (real `feast apply`)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines import feature_store as fs
from pipelines.batch_features import DayRange, run_batch_features
from pipelines.canonical import CanonicalWriter
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.spark import get_spark
from tests.support.settings import isolated_settings
from tests.support.snapshots import read_table, write_dataset, write_dense_item_profile

NOW = pd.Timestamp("2026-01-03T18:00:00Z")
DAYS = DayRange(datetime(2026, 1, 1).date(), datetime(2026, 1, 3).date())

# (user, item, type, value, time); items 1 and 2 are categories 7 and 8
EVENTS = [
    (1, 1, "VIEW", None, "2026-01-01T10:00:00Z"),
    (1, 1, "CLICK", None, "2026-01-01T11:00:00Z"),
    (1, 2, "RATING", 4.0, "2026-01-02T09:00:00Z"),
    (2, 2, "VIEW", None, "2026-01-02T10:00:00Z"),
    (1, 2, "PURCHASE", 1.0, "2026-01-03T12:00:00Z"),
    (2, 1, "VIEW", None, "2026-01-03T00:00:00Z"),  # exactly at a cutoff: belongs to the next day
    (1, 1, "VIEW", None, "2026-01-03T19:00:00Z"),  # after "now": never counted
]


def _dataset(root: Path) -> Path:
    out = root / "canonical" / "hand"
    events = pd.DataFrame(EVENTS, columns=[S.COL_USER, S.COL_ITEM, S.COL_EVENT_TYPE, S.COL_VALUE, S.COL_TS])
    events[S.COL_EVENT_ID] = [f"h{i}" for i in range(len(events))]
    events[S.COL_TS] = pd.to_datetime(events[S.COL_TS], utc=True).dt.as_unit("us")
    events[S.COL_SESSION] = None
    events[S.COL_CONTEXT] = None
    events[S.COL_REQUEST_ID] = events[S.COL_POSITION] = None  # no attribution: not live events
    created = pd.to_datetime(["2025-12-01T00:00", "2025-12-01T00:00", "2026-01-02T12:00"], utc=True).as_unit("us")
    items = pd.DataFrame({S.COL_ITEM: [1, 2, 3], "title": ["a", "b", "c"], S.COL_CATEGORY: [7, 8, 8],
                          "tags": [["x"], ["y"], []], "price": 1.0, "margin": 0.1, "quality_score": 4.0,
                          "inventory": 5, S.COL_CREATED_AT: created, "image_url": None})
    with CanonicalWriter(out, source="hand") as writer:
        writer.add_events(pa.Table.from_pandas(events, schema=S.EVENTS_SCHEMA, preserve_index=False))
        writer.add_items(pa.Table.from_pandas(items, schema=S.ITEMS_SCHEMA, preserve_index=False))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("bf")
    _dataset(root)
    settings = Settings(data_dir=root, dataset="hand")
    T.ensure_tables(settings)
    run_batch_features(get_spark(settings), settings, NOW.to_pydatetime(), DAYS)
    return settings


def _read(settings: Settings, table: str) -> pd.DataFrame:
    frame = pd.read_parquet(T.table_path(settings, table))
    key = T.entity_key(table)
    return frame.sort_values([key, S.COL_TS]).reset_index(drop=True)


def test_user_profile_by_hand(built: Settings) -> None:
    up = _read(built, T.USER_PROFILE)
    rows = {(r.user_id, str(r.snapshot_date)): r for r in up.itertuples()}
    # only days on which the user acted; cutoff = next midnight, or "now" on the last day
    assert sorted(rows) == [(1, "2026-01-01"), (1, "2026-01-02"), (1, "2026-01-03"), (2, "2026-01-02"), (2, "2026-01-03")]
    d1, d2, d3 = rows[(1, "2026-01-01")], rows[(1, "2026-01-02")], rows[(1, "2026-01-03")]
    assert d1.event_timestamp == pd.Timestamp("2026-01-02T00:00Z") and d3.event_timestamp == NOW
    assert (d1.n_events, d1.n_views, d1.n_clicks, d1.n_ratings) == (2, 1, 1, 0)
    assert pd.isna(d1.mean_rating)
    assert d1.days_since_first_seen == pytest.approx(14 / 24)  # first seen 01-01 10:00, cutoff 01-02 00:00
    assert list(d1.top_categories) == [7]
    assert (d2.n_events, d2.n_ratings, d2.mean_rating) == (3, 1, 4.0)
    assert list(d2.top_categories) == [7, 8]  # 2 events on category 7, 1 on 8
    assert (d3.n_events, d3.n_purchases, d3.n_events_7d) == (4, 1, 4)  # the 19:00 view is after "now"
    assert list(d3.top_categories) == [8, 7]  # 2 and 2: the more recent category first
    # user 2's midnight view is not in the 01-02 snapshot (strictly before the cutoff)
    assert rows[(2, "2026-01-02")].n_events == 1 and rows[(2, "2026-01-03")].n_events == 2


def test_item_profile_by_hand(built: Settings) -> None:
    # every existing item has a row on each day here: 01-01 is the run's first day (nothing stored
    # before it), each item's popularity changes on 01-02, and 01-03 is still in progress (cutoff "now")
    ip = _read(built, T.ITEM_PROFILE)
    rows = {(r.item_id, str(r.snapshot_date)): (r.popularity_1d, r.popularity_7d) for r in ip.itertuples()}
    assert rows == {
        (1, "2026-01-01"): (2, 2), (1, "2026-01-02"): (0, 2), (1, "2026-01-03"): (1, 3),
        (2, "2026-01-01"): (0, 0), (2, "2026-01-02"): (2, 2), (2, "2026-01-03"): (1, 3),
        # item 3 exists from 2026-01-02 12:00: no snapshot before that
        (3, "2026-01-02"): (0, 0), (3, "2026-01-03"): (0, 0),
    }
    assert set(ip[S.COL_CATEGORY]) == {7, 8} and (ip["price"] == 1.0).all()


def test_rerun_is_idempotent_and_only_touches_its_days(built: Settings) -> None:
    before_up, before_ip = _read(built, T.USER_PROFILE), _read(built, T.ITEM_PROFILE)
    spark = get_spark(built)
    run_batch_features(spark, built, NOW.to_pydatetime(), DAYS)
    run_batch_features(spark, built, NOW.to_pydatetime(), DayRange(DAYS.last, DAYS.last))
    after_up, after_ip = _read(built, T.USER_PROFILE), _read(built, T.ITEM_PROFILE)
    cols = [c for c in before_up.columns if c != T.CREATED]
    pd.testing.assert_frame_equal(before_up[cols], after_up[cols])
    cols = [c for c in before_ip.columns if c != T.CREATED]
    pd.testing.assert_frame_equal(before_ip[cols], after_ip[cols])


def test_each_day_is_one_file(built: Settings) -> None:
    # DAYS is 3 days; every table folder holds one parquet file per day it has rows for (not one
    # per shuffle partition and day: small files slow the writes and the point-in-time reads)
    for table in (T.USER_PROFILE, T.ITEM_PROFILE):
        folders = sorted(p for p in T.table_path(built, table).iterdir() if p.is_dir())
        assert folders, f"{table} wrote no day"
        assert {f.name: len(list(f.glob("*.parquet"))) for f in folders} == {f.name: 1 for f in folders}


def test_empty_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty day range: 2026-01-03 > 2026-01-01: swap the dates"):
        DayRange(DAYS.last, DAYS.first)


# ---- sparse item_profile ------------------------------------------------------------------------


def test_sparse_item_profile_rows_by_hand(tmp_path: Path) -> None:
    """Which days get a row, with a 5-day heartbeat (days since 1970 divisible by 5: 01-02,
    01-07, 01-12, 01-17) over 2026-01-01..01-20, "now" = 01-20 12:00."""
    settings = Settings(data_dir=tmp_path, dataset="sparse")
    write_dataset(settings, [
        (1, 10, "VIEW", None, "2026-01-03T10:00:00Z"),
        (1, 11, "VIEW", None, "2026-01-20T06:00:00Z"),
        (1, 11, "VIEW", None, "2026-01-20T13:00:00Z"),  # after "now": never counted
    ], created={10: "2025-12-01T00:00:00Z", 11: "2026-01-05T15:00:00Z"})
    T.ensure_tables(settings)
    now = datetime(2026, 1, 20, 12, tzinfo=timezone.utc)
    written = run_batch_features(get_spark(settings), settings, now,
                                 DayRange(datetime(2026, 1, 1).date(), now.date()), heartbeat_days=5)
    ip = read_table(settings, T.ITEM_PROFILE)
    rows = {(r.item_id, r.snapshot_date[5:]): (r.popularity_1d, r.popularity_7d) for r in ip.itertuples()}
    assert rows == {
        # item 10: the run's first day; heartbeat; its event; the 1-day window empties; heartbeat;
        # the 7-day window empties (the event's day + 7); heartbeats; the day in progress
        (10, "01-01"): (0, 0), (10, "01-02"): (0, 0), (10, "01-03"): (1, 1), (10, "01-04"): (0, 1),
        (10, "01-07"): (0, 1), (10, "01-10"): (0, 0), (10, "01-12"): (0, 0), (10, "01-17"): (0, 0),
        (10, "01-20"): (0, 0),
        # item 11: created on 01-05; heartbeats; 01-20 counts [01-19 12:00, 01-20 12:00): 1 event
        (11, "01-05"): (0, 0), (11, "01-07"): (0, 0), (11, "01-12"): (0, 0), (11, "01-17"): (0, 0),
        (11, "01-20"): (1, 1),
    }
    assert written[T.ITEM_PROFILE] == 14  # dense daily rows would be 20 + 16 = 36
    # the day in progress is stamped "now"; a complete day at the next midnight
    stamps = dict(zip(ip[T.SNAPSHOT_DATE], ip[S.COL_TS]))
    assert stamps["2026-01-20"] == pd.Timestamp(now) and stamps["2026-01-10"] == pd.Timestamp("2026-01-11T00:00Z")


def test_heartbeat_longer_than_the_ttl_is_rejected(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dataset="none")
    with pytest.raises(ValueError, match="heartbeat_days=31 must be within 1..30"):
        run_batch_features(get_spark(settings), settings, NOW.to_pydatetime(), DAYS, heartbeat_days=31)


# A 70-day history: 2025-10-01 (day 0) .. 2025-12-09 (day 69, in progress at 12:00). With the
# 30-day TTL the heartbeat days are days 8, 38 and 68 (days since 1970 divisible by 30).
LONG_START = datetime(2025, 10, 1, tzinfo=timezone.utc)
LONG_NOW = datetime(2025, 12, 9, 12, tzinfo=timezone.utc)
LONG_DAYS = DayRange(LONG_START.date(), LONG_NOW.date())


def _at(day: int, hour: int = 10, second: int = 0) -> str:
    return (LONG_START + timedelta(days=day, hours=hour, seconds=second)).isoformat()


LONG_EVENTS = [
    *[(1, 1, "VIEW", None, _at(d)) for d in range(10)],  # item 1: busy for 10 days, then days 50-51
    (2, 1, "CLICK", None, _at(50)), (2, 1, "PURCHASE", 1.0, _at(51, 3)),
    # item 2: one event on day 2, then 67 days unchanged (its 7-day window empties on day 9):
    # a stretch longer than the TTL that only the heartbeat keeps joinable
    (2, 2, "VIEW", None, _at(2, 8)),
    # item 4: created on day 40; events at the last second of day 45 and the first of day 46
    (1, 4, "RATING", 4.0, _at(45, 23, 3599)), (2, 4, "VIEW", None, _at(46, 0)),
]
# item 3 never has an event
LONG_CREATED = {1: "2025-01-01T00:00:00Z", 2: "2025-01-01T00:00:00Z", 3: "2025-01-01T00:00:00Z",
                4: _at(40, 13)}


def _long_workspace(root: Path, name: str) -> Settings:
    # no stack: `feast apply` and the offline join need no Redis
    settings = isolated_settings(root / name, dataset="long", feast_project=f"bf{uuid.uuid4().hex[:8]}")
    write_dataset(settings, LONG_EVENTS, LONG_CREATED)
    T.ensure_tables(settings)
    return settings


@pytest.fixture(scope="module")
def long_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Settings]:
    """(sparse, dense) workspaces over the same 70 days of events, each with `feast apply`."""
    root = tmp_path_factory.mktemp("long")
    sparse, dense = _long_workspace(root, "sparse"), _long_workspace(root, "dense")
    spark = get_spark(sparse)
    run_batch_features(spark, sparse, LONG_NOW, LONG_DAYS)
    run_batch_features(spark, dense, LONG_NOW, LONG_DAYS)
    write_dense_item_profile(spark, dense, LONG_NOW, LONG_DAYS)
    fs.apply(sparse)
    fs.apply(dense)
    return sparse, dense


def _label_rows() -> pd.DataFrame:
    """Every item at many times: every 7 hours from a day before the data to 35 days after it
    (past the TTL), plus each snapshot's exact stamp and the microsecond before it."""
    times = list(pd.date_range(LONG_START - timedelta(days=1), LONG_NOW + timedelta(days=35), freq="7h"))
    for day in range(70):
        stamp = pd.Timestamp(LONG_START + timedelta(days=day + 1))
        times += [stamp, stamp - pd.Timedelta(microseconds=1)]
    times += [pd.Timestamp(t) for t in (_at(40, 12), _at(60), LONG_NOW, LONG_NOW + timedelta(days=30),
                                        LONG_NOW + timedelta(days=30, hours=1))]
    rows = pd.DataFrame([(1, item, t) for item in LONG_CREATED for t in sorted(set(times))],
                        columns=[S.COL_USER, S.COL_ITEM, S.COL_TS])
    rows["_row"] = np.arange(len(rows))
    return rows


def _frame(settings: Settings, labels: pd.DataFrame) -> pd.DataFrame:
    frame = fs.get_training_frame(labels, "ranker_v1", settings=settings)
    assert isinstance(frame, pd.DataFrame)
    return frame.sort_values("_row").reset_index(drop=True)


def test_sparse_frames_equal_dense_frames(long_tables: tuple[Settings, Settings]) -> None:
    sparse, dense = long_tables
    sparse_rows, dense_rows = len(read_table(sparse, T.ITEM_PROFILE)), len(read_table(dense, T.ITEM_PROFILE))
    # dense: items 1-3 on 70 days + item 4 on days 40-69 = 240; sparse: a fraction of it
    assert dense_rows == 240 and sparse_rows < dense_rows / 3
    labels = _label_rows()
    got, want = _frame(sparse, labels), _frame(dense, labels)
    assert len(got) == len(labels)
    pd.testing.assert_frame_equal(got, want)
    by = got.set_index([S.COL_ITEM, S.COL_TS])
    # item 2 on day 60: unchanged for 51 days, still joined through the heartbeat of day 38
    assert by.loc[(2, pd.Timestamp(_at(60)))]["popularity_7d"] == 0
    # 30 days after the data's last snapshot every value has aged out: TTL still means stale
    assert by.loc[(2, pd.Timestamp(LONG_NOW + timedelta(days=30)))]["popularity_7d"] == 0  # TTL inclusive
    assert pd.isna(by.loc[(2, pd.Timestamp(LONG_NOW + timedelta(days=30, hours=1)))]["popularity_7d"])
    # before item 4 exists it has no values, and the window of day 46 holds both of its events
    assert pd.isna(by.loc[(4, pd.Timestamp(_at(40, 12)))]["popularity_7d"])
    assert by.loc[(4, pd.Timestamp(LONG_START + timedelta(days=47)))]["popularity_7d"] == 2


def test_incremental_runs_equal_a_full_run(long_tables: tuple[Settings, Settings], tmp_path: Path) -> None:
    """Days 0-29 then 30-69, then days 20-45 again: the tables equal one run over days 0-69."""
    sparse, _ = long_tables
    parts = _long_workspace(tmp_path, "parts")
    spark = get_spark(parts)
    first = LONG_DAYS.first
    for start, end in ((0, 29), (30, 69), (20, 45)):
        run_batch_features(spark, parts, LONG_NOW, DayRange(first + timedelta(days=start), first + timedelta(days=end)))
    for table in (T.ITEM_PROFILE, T.USER_PROFILE):
        pd.testing.assert_frame_equal(read_table(parts, table), read_table(sparse, table))
