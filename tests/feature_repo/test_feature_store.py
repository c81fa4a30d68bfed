"""The feature store end to end: real Spark, real Redis-protocol server, the real Feast CLI.

The workspace (tests/feature_workspace.py) is built once per session by the `feature_ws` fixture.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import feature_store as fs
from pipelines.online_features import OnlineFeatureReader
from pipelines.stack import free_port
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from tests.support.feature_workspace import DIM, END, HAND_USER, N_ITEMS, T1, T2, vector

def _latest(settings: Settings, table: str) -> pd.DataFrame:
    frame = pd.read_parquet(T.table_path(settings, table))
    key = T.entity_key(table)
    return frame.sort_values([key, S.COL_TS]).groupby(key).tail(1).set_index(key)


def test_apply_is_idempotent_and_lists_views(feature_ws: Settings) -> None:
    before = sorted(v.name for v in fs.get_store(feature_ws).list_feature_views())
    fs.apply(feature_ws)  # the real `feast apply`, a second time
    listed = fs.feast_cli(feature_ws, "feature-views", "list").stdout
    for name in T.TABLES:
        assert name in listed
    assert sorted(v.name for v in fs.get_store(feature_ws).list_feature_views()) == before == sorted(T.TABLES)
    services = sorted(s.name for s in fs.get_store(feature_ws).list_feature_services())
    assert services == ["ranker_v1", "retrieval_v1", "two_tower_v1"]


def test_point_in_time_correctness(feature_ws: Settings) -> None:
    labels = pd.DataFrame({
        S.COL_USER: HAND_USER,
        S.COL_ITEM: 1,
        S.COL_TS: [
            T1 - timedelta(hours=1),  # before t1: nothing
            T1,  # at t1: the t1 value (the join is inclusive)
            T1 + timedelta(days=1),  # between: t1's value
            T2 - timedelta(seconds=1),  # just before t2: still t1's, never t2's
            T2 + timedelta(hours=1),  # after t2: t2's
            T2 + timedelta(days=3),  # past user_profile's 2-day TTL: nothing (embedding has no TTL)
        ],
        "label": range(6),
    })
    frame = fs.get_training_frame(labels, "ranker_v1", settings=feature_ws).sort_values("label")
    n_events = [None if pd.isna(v) else int(v) for v in frame["n_events"]]
    assert n_events == [None, 10, 10, 10, 20, None]
    first = [None if not isinstance(v, (list, np.ndarray)) else float(v[0]) for v in frame["user_embedding"]]
    assert first == [None, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_training_frame_never_holds_a_later_value(feature_ws: Settings) -> None:
    events = pd.read_parquet(feature_ws.dataset_path / "events").sample(200, random_state=0)
    labels = events[[S.COL_USER, S.COL_ITEM, S.COL_TS]].reset_index(drop=True)
    frame = fs.get_training_frame(labels, "ranker_v1", settings=feature_ws)
    profiles = pd.read_parquet(T.table_path(feature_ws, T.USER_PROFILE))
    # each joined n_events must equal the latest snapshot at or before the label, within 2 days
    for row in frame.itertuples():
        snaps = profiles[(profiles[S.COL_USER] == row.user_id) & (profiles[S.COL_TS] <= row.event_timestamp)
                         & (profiles[S.COL_TS] > row.event_timestamp - pd.Timedelta(days=2))]
        expected = None if snaps.empty else int(snaps.sort_values(S.COL_TS).iloc[-1]["n_events"])
        got = None if pd.isna(row.n_events) else int(row.n_events)
        assert got == expected


def _by_label(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("label").reset_index(drop=True)


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Array cells as tuples (NaN-free), so two frames compare with DataFrame.equals."""
    return frame.apply(lambda col: col.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
                       if col.dtype == object else col)


def test_chunked_frame_equals_one_shot_and_feasts_own(feature_ws: Settings) -> None:
    events = pd.read_parquet(feature_ws.dataset_path / "events").sample(300, random_state=1)
    labels = events[[S.COL_USER, S.COL_ITEM, S.COL_TS]].reset_index(drop=True).assign(label=np.arange(300))
    chunked = _by_label(fs.get_training_frame(labels, "ranker_v1", settings=feature_ws, chunk_rows=70))  # 5 chunks
    one_shot = _by_label(fs.get_training_frame(labels, "ranker_v1", settings=feature_ws))
    store = fs.get_store(feature_ws)
    feast_own = store.get_historical_features(entity_df=labels.copy(),
                                              features=store.get_feature_service("ranker_v1")).to_df()
    feast_own[S.COL_TS] = pd.to_datetime(feast_own[S.COL_TS], utc=True)
    feast_own = _by_label(feast_own)[list(one_shot.columns)]
    assert len(chunked) == len(one_shot) == 300  # one row per label, whatever the chunking
    assert chunked["label"].tolist() == list(range(300))
    assert _comparable(chunked).equals(_comparable(one_shot))
    # the same values as Feast's own collect (its to_df), column by column
    for column in one_shot.columns:
        assert _comparable(one_shot[[column]]).equals(_comparable(feast_own[[column]]).astype(
            one_shot[[column]].dtypes.to_dict())), column


def test_training_frame_over_the_row_cap_names_the_setting(feature_ws: Settings) -> None:
    labels = pd.DataFrame({S.COL_USER: [1, 2, 3], S.COL_ITEM: [1, 1, 1], S.COL_TS: [END] * 3})
    with pytest.raises(fs.FeatureStoreError, match=r"3 entity rows, over max_rows=2 .*--max-users.*TRAINING_FRAME_MAX_ROWS"):
        fs.get_training_frame(labels, "ranker_v1", settings=feature_ws, max_rows=2)
    with pytest.raises(fs.FeatureStoreError, match=r"chunk_rows=0 must be >= 1"):
        fs.get_training_frame(labels, "ranker_v1", settings=feature_ws, chunk_rows=0)


def test_training_frame_leaves_no_scratch_files(feature_ws: Settings) -> None:
    labels = pd.DataFrame({S.COL_USER: [HAND_USER], S.COL_ITEM: [1], S.COL_TS: [T2 + timedelta(hours=1)]})
    fs.get_training_frame(labels, "ranker_v1", settings=feature_ws)
    assert list((feature_ws.data_path / "tmp").glob("training-frame-*")) == []


def test_training_frame_as_spark(feature_ws: Settings) -> None:
    labels = pd.DataFrame({S.COL_USER: [HAND_USER], S.COL_ITEM: [1], S.COL_TS: [T2 + timedelta(hours=1)]})
    sdf = fs.get_training_frame(labels, "ranker_v1", settings=feature_ws, output="spark")
    assert sdf.count() == 1 and "n_events" in sdf.columns


def test_training_frame_bad_input(feature_ws: Settings) -> None:
    with pytest.raises(fs.FeatureStoreError, match="entity_df needs an 'event_timestamp' column"):
        fs.get_training_frame(pd.DataFrame({S.COL_USER: [1]}), settings=feature_ws)
    with pytest.raises(fs.FeatureStoreError, match="unknown feature service 'ranker_v9'"):
        fs.get_training_frame(pd.DataFrame({S.COL_USER: [1], S.COL_TS: [END]}), "ranker_v9", settings=feature_ws)


def test_materialize_serves_latest_offline_values(feature_ws: Settings) -> None:
    store = fs.get_store(feature_ws)
    users = _latest(feature_ws, T.USER_PROFILE)
    items = _latest(feature_ws, T.ITEM_PROFILE)
    got = store.get_online_features(
        features=["user_profile:n_events", "user_profile:top_categories", "user_profile:mean_rating"],
        entity_rows=[{S.COL_USER: int(u)} for u in users.index]).to_df().set_index(S.COL_USER)
    assert got["n_events"].tolist() == users["n_events"].tolist()
    assert [list(v) for v in got["top_categories"]] == [list(v) for v in users["top_categories"]]
    got_items = store.get_online_features(
        features=["item_profile:popularity_7d", "item_profile:price", "item_profile:tags"],
        entity_rows=[{S.COL_ITEM: int(i)} for i in items.index]).to_df().set_index(S.COL_ITEM)
    assert got_items["popularity_7d"].tolist() == items["popularity_7d"].tolist()
    assert got_items["price"].tolist() == pytest.approx(items["price"].tolist())
    # online reads ignore the view TTL (Feast #6821): user 1001's 2025 profile is still served
    hand = store.get_online_features(features=["user_profile:n_events"], entity_rows=[{S.COL_USER: HAND_USER}])
    assert hand.to_dict()["n_events"] == [20]


def _ranker_refs(store: object, prefix: str) -> list[str]:
    svc = store.get_feature_service("ranker_v1")  # type: ignore[attr-defined]
    return [f"{p.name}:{f.name}" for p in svc.feature_view_projections for f in p.features if p.name.startswith(prefix)]


def test_fast_reader_equals_get_online_features(feature_ws: Settings) -> None:
    store = fs.get_store(feature_ws)
    user_refs, item_refs = _ranker_refs(store, "user"), _ranker_refs(store, "item")
    reader = OnlineFeatureReader(feature_ws, user_refs, item_refs, store=store)
    items = [*range(1, N_ITEMS + 1), 999_999]  # an unknown item reads as all-None
    for user in (3, HAND_USER, 424242):
        row = reader.read(user, items)
        expected_user = store.get_online_features(features=user_refs, entity_rows=[{S.COL_USER: user}]).to_dict()
        assert row.user == {k: v[0] for k, v in expected_user.items() if k != S.COL_USER}
    expected_items = store.get_online_features(
        features=item_refs, entity_rows=[{S.COL_ITEM: i} for i in items]).to_dict()
    assert row.items == {k: v for k, v in expected_items.items() if k != S.COL_ITEM}
    assert all(v is None for k, v in row.items.items() if k != "item_embedding" for v in [v[-1]])
    matrix, found = row.item_matrix("item_embedding")
    assert matrix.shape == (N_ITEMS + 1, DIM) and found.tolist() == [True] * N_ITEMS + [False]
    assert matrix[1].tolist() == pytest.approx(vector(2, 0.1))


def test_fast_reader_recovers_from_a_server_error_mid_batch(feature_ws: Settings) -> None:
    import redis

    store = fs.get_store(feature_ws)
    reader = OnlineFeatureReader(feature_ws, _ranker_refs(store, "user"), _ranker_refs(store, "item"), store=store)
    expected = reader.read(3, [1, 2, 3])
    bad_key = reader.item.key(777_777)
    reader.client.set(bad_key, b"not a hash")  # HMGET on a string: WRONGTYPE for that one command
    try:
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            reader.read(3, [1, 777_777, 2])
    finally:
        reader.client.delete(bad_key)
    # the connection with unread replies was dropped, not reused: the next read is clean
    assert reader.read(3, [1, 2, 3]) == expected
    assert reader.read(None, []).items == {k: [] for k in expected.items}


def _realtime(user: int, ts: datetime, count: int) -> pd.DataFrame:
    return pd.DataFrame({
        S.COL_USER: [user], S.COL_TS: [ts], "last_5_items": [[1, 2, 3]], "last_action_ts": [ts],
        "interaction_count": [count], "total_purchases": [0], "preferred_categories": [[2]],
    })


def _online_count(store: object, user: int) -> int | None:
    out = store.get_online_features(  # type: ignore[attr-defined]
        features=["user_realtime:interaction_count"], entity_rows=[{S.COL_USER: user}])
    return out.to_dict()["interaction_count"][0]


def test_push_is_visible_including_two_in_one_second(feature_ws: Settings) -> None:
    store = fs.get_store(feature_ws)
    base = datetime(2026, 1, 4, 12, 0, 0, tzinfo=timezone.utc)
    fs.push_user_realtime(store, _realtime(5, base, 1))
    assert _online_count(store, 5) == 1
    fs.push_user_realtime(store, _realtime(5, base + timedelta(milliseconds=300), 2))  # same second
    assert _online_count(store, 5) == 2
    # the exact same instant: Feast's deduplicating write keeps the first; the stream's writer
    # (skip_dedup, a single ordered writer per user) must not lose the update
    same = base + timedelta(milliseconds=300)
    fs.push_user_realtime(store, _realtime(5, same, 3))
    assert _online_count(store, 5) == 2
    fs.push_user_realtime(fs.get_store(feature_ws, skip_dedup=True), _realtime(5, same, 3))
    assert _online_count(store, 5) == 3


def test_push_offline_lands_in_training_frames(feature_ws: Settings) -> None:
    store = fs.get_store(feature_ws)
    ts = datetime(2026, 1, 3, 8, 0, tzinfo=timezone.utc)
    fs.push_user_realtime(store, _realtime(6, ts, 41), online=False, offline=True)
    frame = fs.get_training_frame(
        pd.DataFrame({S.COL_USER: [6, 6], S.COL_TS: [ts - timedelta(seconds=1), ts + timedelta(hours=1)]}),
        "retrieval_v1", settings=feature_ws).sort_values(S.COL_TS)
    assert [list(v) if v is not None else None for v in frame["last_5_items"]] == [None, [1, 2, 3]]


def test_key_ttl_drops_every_view_of_the_entity_at_once(feature_ws: Settings) -> None:
    expiring = feature_ws.with_overrides(online_key_ttl_seconds=1)
    store = fs.get_store(expiring)
    assert store.get_online_features(features=["user_profile:n_events"], entity_rows=[{S.COL_USER: 7}]).to_dict()[
        "n_events"][0] is not None
    fs.push_user_realtime(store, _realtime(7, datetime(2026, 1, 4, 13, tzinfo=timezone.utc), 9))
    assert _online_count(store, 7) == 9
    time.sleep(2.0)
    after = store.get_online_features(
        features=["user_profile:n_events", "user_realtime:interaction_count", "user_embedding:user_embedding"],
        entity_rows=[{S.COL_USER: 7}]).to_dict()
    assert after["n_events"] == after["interaction_count"] == after["user_embedding"] == [None]


@pytest.mark.timeout(60)
def test_wrong_redis_address_fails_fast(feature_ws: Settings) -> None:
    broken = feature_ws.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(fs.FeatureStoreError, match=r"online store at redis://127.0.0.1:\d+/0 is not reachable: check REDIS_URL"):
        fs.materialize(broken, END - timedelta(days=1), END)


def test_missing_parquet_path_is_named(feature_ws: Settings, tmp_path: Path) -> None:
    empty = feature_ws.with_overrides(data_dir=tmp_path / "nothing-here")
    with pytest.raises(fs.FeatureStoreError, match=r"no canonical events at .*nothing-here.*: run `recsys data generate`"):
        fs.apply(empty)
    with pytest.raises(fs.FeatureStoreError, match=r"offline feature tables missing: .*run `recsys features apply`"):
        fs.materialize(empty, END - timedelta(days=1), END)


def test_rendered_yaml_carries_the_environment(feature_ws: Settings) -> None:
    import yaml

    remote = feature_ws.with_overrides(redis_url="redis://:pw@cache.internal:6380/3", spark_master="spark://m:7077")
    rendered = yaml.safe_load(fs.render_feature_store_yaml(remote, Path(feature_ws.data_path) / "r.yaml").read_text())
    assert rendered["online_store"]["connection_string"] == "cache.internal:6380,db=3,password=pw"
    assert rendered["offline_store"]["spark_conf"]["spark.master"] == "spark://m:7077"
