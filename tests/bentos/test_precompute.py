"""The precompute job is the service's engine: `recsys precompute` then a real `bentoml serve` on
the same BentoML model store (index and ranker) answers from the cache exactly what it computes
with the cache off, with the same model versions; a cached answer keeps the versions that computed
it; the active users are the offline log's and the stream's (users only seen live included,
users outside the window not); parallel workers cache what one worker caches."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from bentos.engine import RecommendationEngine
from bentos.factory import build_engine, served_models
from bentos.precompute import PrecomputeConfig, active_users, offline_activity, precompute, precompute_engine
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from models.ranker.export import QUANTIZED_FILE
from pipelines.events import EventProducer, new_event
from recsys import schema as S
from recsys.config import Settings
from recsys.schema import recs_cache_key
from tests.support.feature_workspace import DIM, END
from tests.support.models import train_tiny_ranker
from tests.support.service_process import Server, serve, service_env
from tests.support.serving import build_index, personalised_users
from tests.support.settings import REPO


@pytest.fixture(scope="module")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BentoML model store with the workspace's index and a tiny ranker (its ALS rank the
    workspace's embedding size; no int8 variant, so both paths load the full-precision model)."""
    from models.tracking import save_to_bentoml

    home = tmp_path_factory.mktemp("bentoml-precompute")
    ranker = train_tiny_ranker(home / "build" / "ranker", rank=DIM)
    (ranker / QUANTIZED_FILE).unlink(missing_ok=True)
    save_to_bentoml(BENTO_INDEX_MODEL, build_index(home / "build" / "index"), run_id="index-run", bentoml_home=home)
    save_to_bentoml(BENTO_RANKER_MODEL, ranker, run_id="ranker-run", bentoml_home=home)
    return home


@pytest.fixture(scope="module")
def server(feature_ws: Settings, store_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a fixed, generous ranker budget: the test is about which answer is served, and a loaded
    # machine must not turn a fresh answer into a timeout fallback
    env = service_env(feature_ws, store_home, RECSYS_RANKER_TIMEOUT_MS="5000")
    with serve(env, tmp_path_factory.mktemp("serve-precompute") / "serve.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(feature_ws: Settings, store_home: Path) -> Iterator[RecommendationEngine]:
    """The precompute job's engine, in process, on the same store."""
    eng = precompute_engine(feature_ws, PrecomputeConfig(workers=4), bentoml_home=store_home)
    yield eng
    eng.close()


def _hour() -> int:
    return int(datetime.now(timezone.utc).timestamp() // 3600)


def _cached(client: redis.Redis, users: list[int]) -> dict[int, Any]:
    """What the cache holds per user (parsed), None where nothing is cached."""
    return {u: (orjson.loads(raw) if (raw := client.get(recs_cache_key(u))) else None) for u in users}


#: How far two answers' scores may differ. The ranker reads the time of day as a continuous hour
#: (sin/cos of hour + minute / 60), so an answer computed a few minutes after another scores every
#: item slightly differently (a few 1e-5 on a loaded machine, where minutes pass between the two);
#: the items and their order must still be equal.
SCORE_ATOL = 1e-3


def _same_answer(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Same items in the same order (the exploration item included: its slot does not depend on
    k), scores within :data:`SCORE_ATOL`."""
    n = min(len(a), len(b))
    return len(a) == len(b) and [i["item_id"] for i in a[:n]] == [i["item_id"] for i in b[:n]] and \
        np.allclose([i["score"] for i in a[:n]], [i["score"] for i in b[:n]], atol=SCORE_ATOL, rtol=0)


# ---- one engine everywhere ------------------------------------------------------------------------


def test_served_models_are_the_stores_latest_with_their_runs(store_home: Path) -> None:
    models = served_models(store_home)
    assert models.index_dir is not None and models.index_dir.is_dir()
    assert models.ranker_dir is not None and models.ranker_dir.is_dir()
    assert models.versions["index"].startswith(f"{BENTO_INDEX_MODEL}:")
    assert models.versions["ranker"].startswith(f"{BENTO_RANKER_MODEL}:")
    assert (models.versions["index_mlflow_run"], models.versions["ranker_mlflow_run"]) == ("index-run", "ranker-run")


def test_an_empty_store_serves_without_models(tmp_path: Path) -> None:
    models = served_models(tmp_path / "empty-home")
    assert (models.index_dir, models.ranker_dir) == (None, None)
    assert models.versions == {"index": "absent", "ranker": "absent", "two_tower": "absent"}


def test_precomputed_answers_equal_fresh_ones_from_bentoml_serve(server: Server, feature_ws: Settings,
                                                                 store_home: Path) -> None:
    """`recsys precompute` (the CLI, its own process) then `/recommend`: the cached answer (flag
    ``cached``) equals the service's own answer with the cache entry removed, versions included."""
    client = redis.Redis.from_url(feature_ws.effective_redis_url)
    active = set(offline_activity(feature_ws, END, 24).index)
    users = [u for u in personalised_users(feature_ws) if u in active][:3]
    assert len(users) == 3
    env = service_env(feature_ws, store_home)
    recsys_cli = str(Path(sys.executable).with_name("recsys"))
    for attempt in range(2):  # the ranker reads the time of day: retry once across an hour (or day) change
        hour = _hour()
        client.delete(*[recs_cache_key(u) for u in users])
        done = subprocess.run([recsys_cli, "--as-of", END.isoformat(), "precompute", "--workers", "2"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "cached" in done.stdout and "ranker ranker:" in done.stdout, done.stdout
        pairs = []
        for user in users:
            status, _, cached = server.call("/recommend", {"user_id": user, "k": 20})
            assert status == 200 and cached["cached"] is True, cached
            client.delete(recs_cache_key(user))
            status, _, fresh = server.call("/recommend", {"user_id": user, "k": 20})
            assert status == 200 and fresh["cached"] is False and fresh["degraded"] is False, fresh
            pairs.append((cached, fresh))
        if _hour() != hour and attempt == 0:
            continue
        for cached, fresh in pairs:
            assert cached["model_versions"] == fresh["model_versions"]
            assert cached["model_versions"]["ranker_mlflow_run"] == "ranker-run"
            assert cached["cold_start"] == fresh["cold_start"] is False
            assert len(cached["items"]) == 20 and _same_answer(cached["items"], fresh["items"]), (cached, fresh)
        return


def test_a_cached_answer_keeps_the_versions_that_computed_it(feature_ws: Settings, tmp_path: Path) -> None:
    """A hit carries the versions that computed it; another index's engine (a promotion since)
    does not serve it: a miss, recomputed with its own versions."""
    index = build_index(tmp_path / "index")
    first = build_engine(feature_ws, index, model_versions={"index": "item_index:first"})
    second = build_engine(feature_ws, index, model_versions={"index": "item_index:second"})
    user = personalised_users(feature_ws)[0]
    try:
        stats = precompute(first, pd.Series([1], index=[user]), PrecomputeConfig(workers=1), progress=False)
        assert (stats.written, stats.degraded) == (1, 0)
        hit = first.recommend(user, k=5)
        assert hit.cached and hit.model_versions == {"index": "item_index:first"}
        other = second.recommend(user, k=5)
        assert not other.cached and other.model_versions == {"index": "item_index:second"}
    finally:
        first.close()
        second.close()


# ---- who is precomputed ------------------------------------------------------------------------------


LIVE_ONLY, LIVE_TOO_OLD, BOTH, OFFLINE_ONLY, OFFLINE_TOO_OLD = 920_001, 920_002, 920_003, 920_004, 920_005


def _offline_log(settings: Settings, rows: list[tuple[int, datetime]]) -> None:
    folder = settings.dataset_path / "events"
    folder.mkdir(parents=True)
    events = [new_event(user, 1, "VIEW", ts=ts) for user, ts in rows]
    pq.write_table(pa.Table.from_pylist(events, schema=S.EVENTS_SCHEMA), folder / "part-0.parquet",
                   coerce_timestamps="us")


def test_active_users_are_the_offline_logs_and_the_streams(feature_ws: Settings, engine: RecommendationEngine,
                                                           tmp_path: Path) -> None:
    """Offline log (hand-written): BOTH x3 at now-3h, OFFLINE_ONLY x1 at now-5h, OFFLINE_TOO_OLD x2
    at now-26h. Stream (through Kafka, folded by the consumer): LIVE_ONLY x1 at now-2h,
    LIVE_TOO_OLD x1 at now-30h, BOTH x2 at now-1h. In the 24 h before now: BOTH 3 + 2 = 5,
    LIVE_ONLY 1, OFFLINE_ONLY 1 (ties by user id); the two too old are neither counted nor cached."""
    from pipelines.stream import StreamOptions, StreamProcessor

    now = datetime.now(timezone.utc).replace(microsecond=0)
    offline = feature_ws.with_overrides(data_dir=tmp_path / "data", dataset="act")  # same Redis and project
    _offline_log(offline, [(BOTH, now - timedelta(hours=3))] * 3 + [(OFFLINE_ONLY, now - timedelta(hours=5))]
                 + [(OFFLINE_TOO_OLD, now - timedelta(hours=26))] * 2)
    live = [new_event(LIVE_ONLY, 2, "VIEW", ts=now - timedelta(hours=2)),
            new_event(LIVE_TOO_OLD, 3, "VIEW", ts=now - timedelta(hours=30)),
            new_event(BOTH, 4, "VIEW", ts=now - timedelta(hours=1)),
            new_event(BOTH, 5, "CLICK", ts=now - timedelta(hours=1) + timedelta(seconds=1))]
    with EventProducer(feature_ws.effective_kafka_bootstrap, feature_ws.events_topic) as producer:
        producer.send_many(live)
    StreamProcessor(feature_ws, StreamOptions.from_settings(feature_ws, stop_when_caught_up=True,
                                                            group_id=f"act-{uuid.uuid4().hex[:6]}")).run()

    users = active_users(offline, now, 24)
    mine = users[users.index.isin([LIVE_ONLY, LIVE_TOO_OLD, BOTH, OFFLINE_ONLY, OFFLINE_TOO_OLD])]
    assert list(mine.items()) == [(BOTH, 5), (LIVE_ONLY, 1), (OFFLINE_ONLY, 1)]
    assert users.is_monotonic_decreasing

    client = engine.client
    everyone = [LIVE_ONLY, LIVE_TOO_OLD, BOTH, OFFLINE_ONLY, OFFLINE_TOO_OLD]
    client.delete(*[recs_cache_key(u) for u in everyone])
    stats = precompute(engine, users, PrecomputeConfig(workers=2), progress=False)
    assert stats.written == len(users) and stats.degraded == 0, stats
    cached = _cached(client, everyone)
    assert {u for u, body in cached.items() if body is not None} == {LIVE_ONLY, BOTH, OFFLINE_ONLY}
    assert cached[LIVE_ONLY]["cold_start"] is True  # one event: below the cold-start threshold
    assert cached[LIVE_ONLY]["model_versions"] == engine.model_versions


# ---- parallel workers --------------------------------------------------------------------------------


def test_parallel_workers_cache_what_one_worker_caches(feature_ws: Settings, engine: RecommendationEngine) -> None:
    users = active_users(feature_ws, END, 24)
    ids = users.index.tolist()
    assert len(ids) >= 10
    # hot_share 0.5: the first half gets the long TTL, the rest the short one, whatever the workers
    cfg = {"hot_share": 0.5, "ttl_s": 1_000, "hot_ttl_s": 100_000, "batch": 3}
    client = engine.client
    for attempt in range(2):  # the ranker reads the time of day: retry once across an hour (or day) change
        hour = _hour()
        runs = []
        for workers in (1, 4):
            client.delete(*[recs_cache_key(u) for u in ids])
            stats = precompute(engine, users, PrecomputeConfig(workers=workers, **cfg), progress=False)
            assert (stats.written, stats.degraded, stats.failed, stats.workers) == (len(ids), 0, 0, workers), stats
            long_ttl = {u for u in ids if client.ttl(recs_cache_key(u)) > 1_000}
            runs.append((_cached(client, ids), long_ttl))
        if _hour() != hour and attempt == 0:
            continue
        (one, one_hot), (four, four_hot) = runs
        assert one_hot == four_hot == set(ids[: int(np.ceil(len(ids) * 0.5))])
        assert one.keys() == four.keys() and all(v is not None for v in one.values())
        for user in ids:
            assert one[user]["model_versions"] == four[user]["model_versions"] == engine.model_versions
            assert _same_answer(one[user]["items"], four[user]["items"]), user
        return


def test_the_hot_tier_refreshes_only_the_most_active(feature_ws: Settings, engine: RecommendationEngine) -> None:
    # 10 users, hot_share 0.2: the two most active (ids 3 and 1: activity 9 and 7) are the hot tier
    users = pd.Series([9, 7, 5, 5, 4, 3, 3, 2, 1, 1], index=[3, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    engine.client.delete(*[recs_cache_key(u) for u in users.index])
    stats = precompute(engine, users, PrecomputeConfig(hot_share=0.2, workers=3), tier="hot", progress=False)
    assert (stats.active_users, stats.hot_users, stats.written) == (10, 2, 2)
    assert {u for u, body in _cached(engine.client, users.index.tolist()).items() if body} == {3, 1}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": 0}, "workers=0 must be >= 1"),
    ({"hot_share": 1.5}, r"hot_share=1.5 must be within \[0, 1\]"),
    ({"ranker_timeout_ms": 0}, "ranker_timeout_ms=0 must be > 0"),
])
def test_bad_precompute_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrecomputeConfig(**kwargs)
