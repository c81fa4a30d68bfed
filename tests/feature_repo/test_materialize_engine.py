"""The column-wise batch engine (pipelines.materialize) writes exactly what Feast writes.

The same offline rows are materialized into two Feast projects on the same Redis: one with
Feast's own LocalComputeEngine, one with ours; every hash (key, fields, bytes) and every key TTL
must match. The workspace is small and hand-written to hold the awkward values: nulls in every
column, NaN, negative numbers, empty and null lists, null list elements, several snapshots per
entity with ties on the event time, rows outside the window.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from pipelines import feature_store as fs
from pipelines.feast_redis.layout import store_provider
from pipelines.materialize.encoders import _ENCODERS, encode_column
from pipelines.materialize.engine import ENGINE_TYPE, ColumnarRedisEngine
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from tests.support.settings import REPO

END = datetime(2026, 3, 10, tzinfo=timezone.utc)
MID = END - timedelta(days=2)
START = END - timedelta(days=10)
N = 60  # users and items


def _ts(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def _write(settings: Settings, table: str, columns: dict[str, Any], day: datetime | None = None) -> None:
    folder = T.table_path(settings, table)
    if day is not None:
        folder = folder / f"{T.SNAPSHOT_DATE}={day.date()}"
    folder.mkdir(parents=True, exist_ok=True)
    schema = T.table_schema(table)
    n = len(next(iter(columns.values())))
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), folder / f"part-{uuid.uuid4().hex[:6]}.parquet",
                   coerce_timestamps="us")


def _user_profiles(settings: Settings, day: datetime, shift: int) -> None:
    ids = list(range(1, N + 1))
    ts = [_ts(day + timedelta(hours=20))] * N
    created = [_ts(day + timedelta(hours=21 + (u % 2))) for u in ids]
    ints = [None if u % 7 == 0 else (u * 37 - 500) * (1 + shift) for u in ids]  # nulls, negatives
    cats: list[Any] = [[u % 5, -u, 2**40 + u] for u in ids]
    cats[3], cats[4], cats[5] = [], None, [0]
    ratings: list[Any] = [u / 3 for u in ids]
    ratings[1], ratings[2], ratings[6] = None, float("nan"), -0.0
    _write(settings, T.USER_PROFILE, {
        S.COL_USER: ids, S.COL_TS: ts, T.CREATED: created, "n_events": ints, "n_views": [u + shift for u in ids],
        "n_clicks": [0] * N, "mean_rating": ratings, "days_since_first_seen": [u * 1.5 + shift for u in ids],
        "top_categories": cats, "n_events_7d": [2**62 - u for u in ids],
    }, day)


def _items(settings: Settings, day: datetime, shift: int) -> None:
    ids = list(range(1, N + 1))
    ts = [_ts(day + timedelta(hours=20, seconds=i % 3, microseconds=i * 7)) for i in ids]
    tags: list[Any] = [[f"t{i % 4}", "ünï", ""] for i in ids]
    tags[0], tags[1], tags[2] = [], None, ["a", None, "b" * 200]
    titles: list[Any] = [f"Item {i} {'x' * (i * 3)}" for i in ids]
    titles[3], titles[4] = None, ""
    prices: list[Any] = [i * 1.25 + shift for i in ids]
    prices[5], prices[6] = None, float("nan")
    created_at: list[Any] = [_ts(day - timedelta(days=i)) for i in ids]
    created_at[7] = None
    created_at[8] = _ts(datetime(1960, 1, 1, 0, 0, 0, 500_000, tzinfo=timezone.utc))
    _write(settings, T.ITEM_PROFILE, {
        S.COL_ITEM: ids, S.COL_TS: ts, T.CREATED: ts, S.COL_CATEGORY: [i % 5 for i in ids], "tags": tags,
        "price": prices, "margin": [-i / 7 for i in ids], "inventory": [None if i % 3 else i for i in ids],
        "popularity_7d": [i * 1000 for i in ids], S.COL_CREATED_AT: created_at, "title": titles,
        "image_url": [f"https://img.example.com/{i}.jpg" for i in ids],
    }, day)


def _embeddings(settings: Settings, table: str, key: str, ts: datetime, rng: np.random.Generator) -> None:
    vectors: list[Any] = [rng.normal(size=8).astype(np.float32).tolist() for _ in range(N)]
    vectors[0], vectors[1] = None, [-0.0, float("inf"), 1e-40, 3.4e38, 0.0, 1.0, 2.0, 3.0]
    _write(settings, table, {key: list(range(1, N + 1)), S.COL_TS: [_ts(ts)] * N, T.CREATED: [_ts(ts)] * N,
                             "embedding": vectors})


def _realtime(settings: Settings) -> None:
    ids = list(range(1, 11))
    ts = [_ts(MID + timedelta(minutes=i)) for i in ids]
    _write(settings, T.USER_REALTIME, {
        S.COL_USER: ids, S.COL_TS: ts, T.CREATED: ts, "last_5_items": [[i, i + 1] for i in ids],
        "last_action_ts": ts, "interaction_count": ids, "total_purchases": [0] * 10,
        "preferred_categories": [[] for _ in ids]})


@pytest.fixture(scope="module")
def engine_ws(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Settings]]:
    """(ours, Feast's): two projects over the same hand-written offline tables, both applied."""
    tag = uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("engine")
    ours = stack_settings.with_overrides(data_dir=tmp / "data", dataset="engine", feast_project=f"fast{tag}",
                                         online_key_ttl_seconds=3600)
    events = ours.dataset_path / "events"
    events.mkdir(parents=True)
    pq.write_table(S.EVENTS_SCHEMA.empty_table(), events / "part-00000.parquet", coerce_timestamps="us")
    rng = np.random.default_rng(7)
    _user_profiles(ours, END - timedelta(days=4), 0)
    _user_profiles(ours, END - timedelta(days=1), 1)  # newer snapshot: the latest row wins
    _user_profiles(ours, START - timedelta(days=3), 2)  # outside the window: never written
    _items(ours, END - timedelta(days=3), 0)
    _items(ours, END - timedelta(days=1), 5)
    _embeddings(ours, T.USER_EMBEDDING, S.COL_USER, END - timedelta(days=5), rng)
    _embeddings(ours, T.USER_EMBEDDING, S.COL_USER, END - timedelta(hours=5), rng)
    _embeddings(ours, T.ITEM_EMBEDDING, S.COL_ITEM, END - timedelta(hours=5), rng)
    _realtime(ours)
    feast = ours.with_overrides(feast_project=f"feast{tag}")
    fs.apply(ours)
    fs.apply(feast)
    yield ours, feast
    client = redis.Redis.from_url(ours.effective_redis_url)
    for settings in (ours, feast):
        _clear(client, settings)
    shutil.rmtree(tmp, ignore_errors=True)


def _feast_store(settings: Settings, skip_dedup: bool) -> Any:
    """A FeatureStore with Feast's own LocalComputeEngine (the reference)."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    config = fs.repo_config_dict(settings, skip_dedup)
    config["batch_engine"] = "local"
    return FeatureStore(config=RepoConfig(repo_path=fs.feature_repo_path(settings), **config),
                        repo_path=str(fs.feature_repo_path(settings)))


def _feast_materialize(settings: Settings, start: datetime, end: datetime) -> None:
    """What fs.materialize does, with Feast's engine: bulk views skip_dedup, user_realtime checked."""
    bulk, checked = list(fs.BATCH_ONLY_VIEWS), [T.USER_REALTIME]
    _feast_store(settings, skip_dedup=True).materialize(start, end, feature_views=bulk)
    _feast_store(settings, skip_dedup=False).materialize(start, end, feature_views=checked)


def _clear(client: redis.Redis, settings: Settings) -> None:
    keys = list(client.scan_iter(match=b"*" + settings.feast_project.encode(), count=10_000))
    if keys:
        client.delete(*keys)


def _snapshot(client: redis.Redis, settings: Settings) -> dict[bytes, tuple[dict[bytes, bytes], int]]:
    """Entity part of each key -> (HGETALL, TTL) for one project."""
    suffix = settings.feast_project.encode()
    out = {}
    for key in client.scan_iter(match=b"*" + suffix, count=10_000):
        out[key[:-len(suffix)]] = (client.hgetall(key), client.ttl(key))
    return out


def _assert_same_redis(ours: Settings, feast: Settings, expect_ttl: bool = True) -> int:
    client = redis.Redis.from_url(ours.effective_redis_url)
    got, want = _snapshot(client, ours), _snapshot(client, feast)
    assert got.keys() == want.keys()
    assert len(got) >= N
    for key, (hash_want, ttl_want) in want.items():
        hash_got, ttl_got = got[key]
        assert hash_got == hash_want, key
        if expect_ttl:
            assert 0 < ttl_got <= 3600 and abs(ttl_got - ttl_want) <= 120, (key, ttl_got, ttl_want)
        else:
            assert ttl_got == ttl_want == -1
    return len(got)


def test_engine_is_configured_for_plain_feast_and_the_platform(engine_ws: tuple[Settings, Settings]) -> None:
    ours, _ = engine_ws
    shipped = yaml.safe_load((REPO / "feature_repo" / "feature_store.yaml").read_text())
    assert shipped["batch_engine"] == fs.repo_config_dict(ours)["batch_engine"] == fs.batch_engine_config()
    assert shipped["batch_engine"]["fast_views"] == list(fs.BATCH_ONLY_VIEWS)
    store = fs.get_store(ours)
    assert shipped["batch_engine"]["type"] == ENGINE_TYPE
    engine = store_provider(store).batch_engine
    assert isinstance(engine, ColumnarRedisEngine)
    routes = {v.name: engine.fast_path_refusal(v) for v in store.list_feature_views()}
    assert routes == {**{v: None for v in fs.BATCH_ONLY_VIEWS}, T.USER_REALTIME: "not a fast view"}


def test_materialize_writes_what_feast_writes(engine_ws: tuple[Settings, Settings]) -> None:
    ours, feast = engine_ws
    client = redis.Redis.from_url(ours.effective_redis_url)
    for settings in engine_ws:
        _clear(client, settings)
    fs.materialize(ours, START, END)
    _feast_materialize(feast, START, END)
    assert _assert_same_redis(ours, feast) == 2 * N
    # a second, older window over existing hashes: skip_dedup overwrites, as Feast's store does
    fs.materialize(ours, START, MID)
    _feast_materialize(feast, START, MID)
    _assert_same_redis(ours, feast)
    # the registry still records the intervals (FeatureStore.materialize, after the engine)
    view = fs.get_store(ours).get_feature_view(T.USER_PROFILE)
    assert any(i[1] == END for i in view.materialization_intervals)


def test_feast_cli_materialize_uses_the_engine_with_the_timestamp_check(engine_ws: tuple[Settings, Settings]) -> None:
    """Plain `feast materialize` (no skip_dedup): the read-before-write check, exactly as Feast's."""
    ours, feast = engine_ws
    client = redis.Redis.from_url(ours.effective_redis_url)
    for settings in engine_ws:
        _clear(client, settings)
    ref = _feast_store(feast, skip_dedup=False)
    # END first, then MID: every value of the second run is older than what Redis holds, so the
    # read-before-write check skips it, exactly as Feast's own materialization does
    for start, end in ((START, END), (START, MID)):
        result = fs.feast_cli(ours, "--log-level", "INFO", "materialize", start.isoformat(), end.isoformat())
        for view in fs.BATCH_ONLY_VIEWS:
            assert f"materialized {view}:" in result.stderr + result.stdout
        ref.materialize(start, end)
        _assert_same_redis(ours, feast)
    # materialize-incremental picks up from the recorded intervals, through the CLI too
    later = END + timedelta(days=1)
    fs.feast_cli(ours, "materialize-incremental", later.isoformat())
    ref.materialize_incremental(later)
    _assert_same_redis(ours, feast)
    assert all(max(i[1] for i in v.materialization_intervals) == later
               for v in fs.get_store(ours).list_feature_views())


def test_without_key_ttl_no_expire(engine_ws: tuple[Settings, Settings]) -> None:
    ours, feast = (s.model_copy(update={"online_key_ttl_seconds": None}) for s in engine_ws)  # no key TTL
    client = redis.Redis.from_url(ours.effective_redis_url)
    for settings in (ours, feast):
        _clear(client, settings)
    fs.materialize(ours, START, END, views=[T.USER_PROFILE, T.ITEM_EMBEDDING])
    _feast_store(feast, skip_dedup=True).materialize(START, END, feature_views=[T.USER_PROFILE, T.ITEM_EMBEDDING])
    assert _assert_same_redis(ours, feast, expect_ttl=False) == N * 2  # users and items


# ---- column encoders against Feast's converter, value by value ----------------------------------

_CASES = [
    (pa.array([0, 1, -1, 2**40, -2**50, 127, 128, None], pa.int64()), "INT64"),
    (pa.array([2**62, None, 5], pa.int64()), "INT64"),  # Feast goes through float64: its converter decides
    (pa.array([0, 1, -1, 2**62, -2**63, 2**63 - 1], pa.int64()), "INT64"),
    (pa.array([0, 5, -7, None], pa.int32()), "INT64"),
    (pa.array([0.0, 1.9, -1.9, None, float("nan"), 3e15], pa.float64()), "INT64"),
    (pa.array([0.0, -0.0, 1.5, None, float("nan"), float("inf"), -1e300], pa.float64()), "DOUBLE"),
    (pa.array([None, None], pa.float64()), "DOUBLE"),
    (pa.array(["", "a", None, "héllo" * 40], pa.string()), "STRING"),
    (pa.array(["", "a", None, "x" * 300], pa.large_string()), "STRING"),
    (pa.array([0, None, -1_000_000, 10**15, 1_700_000_000_123_456], pa.timestamp("us", tz="UTC")), "UNIX_TIMESTAMP"),
    (pa.array([None, None], pa.timestamp("us", tz="UTC")), "UNIX_TIMESTAMP"),
    (pa.array([[1, 2, 3], [], None, [-1, 2**40, 0]], pa.list_(pa.int64())), "INT64_LIST"),
    (pa.array([[], None], pa.list_(pa.int64())), "INT64_LIST"),
    (pa.array([[1, 2, 3], [], None, [-1]], pa.large_list(pa.int32())), "INT64_LIST"),
    (pa.array([[1.0, -0.0, 3.5], [], None, [1e30, float("inf")]], pa.list_(pa.float32())), "FLOAT_LIST"),
    (pa.array([[0.1] * 64] * 3, pa.list_(pa.float32())), "FLOAT_LIST"),
    (pa.array([["a", "b"], [], None, ["", None, "ü" * 200]], pa.list_(pa.string())), "STRING_LIST"),
]


@pytest.mark.parametrize(("column", "type_name"), _CASES, ids=[f"{t}-{c.type}-{i}" for i, (c, t) in enumerate(_CASES)])
def test_column_encoders_match_feast(column: pa.Array, type_name: str) -> None:
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    value_type = ValueType[type_name]
    for col in (column, column.slice(1), column.slice(1, max(len(column) - 2, 0))):
        fast = _ENCODERS[value_type](col)
        assert (fast is None) == (col.null_count > 0 and 2**62 in col.to_pylist())  # fast path unless inexact
        feast = [b"$%d\r\n%s\r\n" % (len(b), b) for b in
                 (p.SerializeToString() for p in python_values_to_proto_values(
                     col.to_numpy(zero_copy_only=False), value_type))]
        assert encode_column(col, value_type) == feast


def test_feature_store_yaml_in_repo_is_valid(tmp_path: Path) -> None:
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load((REPO / "feature_repo" / "feature_store.yaml").read_text())
    config = RepoConfig(repo_path=tmp_path, **raw)
    assert config.batch_engine.fast_views == list(fs.BATCH_ONLY_VIEWS)
