"""Batch features on a hand-computable fixture (real Spark, local mode)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from pipelines.batch_features import DayRange, run_batch_features
from pipelines.canonical import CanonicalWriter
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.spark import get_spark

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


def test_empty_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty day range: 2026-01-03 > 2026-01-01: swap the dates"):
        DayRange(DAYS.last, DAYS.first)
