"""The recommendation flow against the real stack (Redis, Feast online store, FAISS index)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from bentos.cache import cache_key, cache_payload
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.features import purchased_key
from bentos.factory import build_engine, redis_client
from bentos.precompute import PrecomputeConfig, active_users, precompute
from pipelines.stack import LocalStack
from recsys import schema as S
from recsys.config import Settings
from tests.support.settings import isolated_settings
from tests.support.feature_workspace import N_ITEMS, vector
from tests.support.serving import build_index, personalised_users


@pytest.fixture(scope="module")
def index_dir(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index(tmp_path_factory.mktemp("index") / "index")


@pytest.fixture()
def engine(feature_ws: Settings, index_dir: Path) -> Iterator[RecommendationEngine]:
    # small strategy quotas, so that on a 40-item catalogue every strategy contributes
    eng = build_engine(feature_ws, index_dir,
                       config=ServingConfig(n_als=5, n_similar=3, n_content=5, n_trending=5, new_item_share=0.0))
    yield eng
    eng.close()


def _active_user(settings: Settings) -> int:
    return personalised_users(settings)[0]


def _categories(engine: RecommendationEngine, items: list[dict]) -> list[int]:
    return engine.catalog.category_of([i["item_id"] for i in items]).tolist()


def test_unknown_user_gets_diversified_popular_items(engine: RecommendationEngine) -> None:
    rec = engine.recommend(424242, k=10, use_cache=False)
    assert rec.cold_start and not rec.degraded
    assert len(rec.items) == 10
    cats = _categories(engine, rec.items)
    # popular items taken in turns from the 5 categories (2 each), then re-scored by the rules,
    # which keep at most 3 of a category in the top 10
    assert len(set(cats)) >= 4 and max(cats.count(c) for c in set(cats)) <= 3
    assert {i["strategy"] for i in rec.items} == {"popular"}


def test_cold_start_with_onboarding_categories(engine: RecommendationEngine) -> None:
    rec = engine.recommend(424243, k=10, context={"categories": [2]})
    assert rec.cold_start
    assert set(_categories(engine, rec.items)) == {2}
    frame = engine.catalog.frame
    in_category = int(np.sum((frame[S.COL_CATEGORY] == 2) & (frame["inventory"] > 0)))  # out of stock: removed
    assert len(rec.items) == min(10, in_category)
    # every 5th slot is an exploration item when one exists
    strategies = [i["strategy"] for i in rec.items]
    assert set(strategies) <= {"popular", "exploration"}


def test_cold_start_with_an_onboarding_category_the_catalogue_lacks(engine: RecommendationEngine) -> None:
    # no item has category 99, new or old: the answer is the one a user who named no category
    # gets (globally popular, across categories), not an error and not an empty list
    rec = engine.recommend(424244, k=5, context={"categories": [99]}, use_cache=False)
    plain = engine.recommend(424245, k=5, use_cache=False)
    assert rec.cold_start and not rec.degraded
    assert len(rec.items) == 5
    assert [i["item_id"] for i in rec.items] == [i["item_id"] for i in plain.items]
    assert {i["strategy"] for i in rec.items} == {"popular"}


def test_personalised_answer_excludes_recent_and_purchased(engine: RecommendationEngine,
                                                           feature_ws: Settings) -> None:
    from pipelines import feature_store as fs

    user = _active_user(feature_ws)
    store = fs.get_store(feature_ws, skip_dedup=True)
    fs.push_user_realtime(store, pd.DataFrame({
        S.COL_USER: [user], S.COL_TS: [datetime(2026, 1, 4, 23, tzinfo=timezone.utc)], "last_5_items": [[3, 4]],
        "last_action_ts": [datetime(2026, 1, 4, 23, tzinfo=timezone.utc)], "interaction_count": [50],
        "total_purchases": [1], "preferred_categories": [[1]]}))
    engine.client.sadd(purchased_key(user), 7)
    try:
        rec = engine.recommend(user, k=100, use_cache=False)
    finally:
        engine.client.delete(purchased_key(user))
    ids = [i["item_id"] for i in rec.items]
    assert not rec.cold_start and not rec.degraded
    assert not {3, 4, 7} & set(ids)
    assert len(ids) == len(set(ids)) and all(i > 0 for i in ids)
    assert {i["strategy"] for i in rec.items} <= {"als", "similar", "content", "trending"}
    assert {"als", "similar", "content"} <= {i["strategy"] for i in rec.items}
    assert all(not (i["item_id"] in engine.catalog and engine.catalog.frame.at[i["item_id"], "inventory"] == 0)
               for i in rec.items)


def test_cache_hit_then_invalidation(engine: RecommendationEngine) -> None:
    user = 424244
    engine.client.delete(cache_key(user))
    first = engine.recommend(user, k=3)
    deadline = time.monotonic() + 5
    while not engine.client.exists(cache_key(user)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the cache is written off the response path
    second = engine.recommend(user, k=2)
    assert not first.cached and second.cached
    assert [i["item_id"] for i in second.items] == [i["item_id"] for i in first.items][:2]
    engine.client.delete(cache_key(user))  # what the stream does on every new event
    assert not engine.recommend(user, k=2).cached


@pytest.mark.parametrize("garbage", [b"not json", b'{"no_items": 1}', b"[1, 2"])
def test_an_unreadable_cache_entry_is_a_miss_and_gets_overwritten(engine: RecommendationEngine,
                                                                   garbage: bytes) -> None:
    user = 424246
    engine.client.set(cache_key(user), garbage)
    rec = engine.recommend(user, k=3)
    assert not rec.cached and len(rec.items) == 3
    deadline = time.monotonic() + 5
    while engine.client.get(cache_key(user)) == garbage and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.recommend(user, k=3).cached


class _SlowScorer:
    version = "slow"

    def score(self, *args: object) -> np.ndarray:
        time.sleep(0.5)
        return np.zeros(len(args[2]))  # type: ignore[arg-type]


class _BrokenScorer:
    version = "broken"

    def score(self, *args: object) -> np.ndarray:
        raise RuntimeError("model exploded")


@pytest.mark.parametrize(("scorer", "reason"), [(_SlowScorer(), "ranker timeout"), (_BrokenScorer(), "ranker error")])
def test_ranker_failure_falls_back_to_cosine(engine: RecommendationEngine, feature_ws: Settings,
                                             scorer: object, reason: str) -> None:
    engine.scoring.scorer = scorer  # type: ignore[assignment]
    rec = engine.recommend(_active_user(feature_ws), k=5, use_cache=False)
    assert rec.degraded and reason in rec.degraded_reasons
    assert len(rec.items) == 5 and all(0.0 <= i["score"] <= 1.2 for i in rec.items)


def test_k_larger_than_catalogue_and_index(engine: RecommendationEngine, feature_ws: Settings) -> None:
    rec = engine.recommend(_active_user(feature_ws), k=100, use_cache=False)
    ids = [i["item_id"] for i in rec.items]
    assert 0 < len(ids) <= N_ITEMS and len(ids) == len(set(ids)) and min(ids) > 0


def test_similar_items(engine: RecommendationEngine) -> None:
    items = engine.similar_items(5, k=3)
    assert len(items) == 3 and 5 not in [i["item_id"] for i in items]
    with pytest.raises(KeyError):
        engine.similar_items(999_999, k=3)


def test_redis_down_degrades_then_recovers(feature_ws: Settings, index_dir: Path, tmp_path: Path) -> None:
    own = isolated_settings(tmp_path)
    stack = LocalStack(own)
    stack.up(["redis"])
    engine = build_engine(feature_ws, index_dir, config=ServingConfig(redis_retry_s=0.2),
                          client=redis_client(own))
    try:
        assert not engine.recommend(1, k=5, use_cache=False).degraded
        stack.down(["redis"])
        down = engine.recommend(1, k=5)
        assert down.degraded and len(down.items) == 5  # popular items held in memory
        assert {i["strategy"] for i in down.items} == {"popular"}
        stack.up(["redis"])
        time.sleep(0.3)  # past the circuit breaker's retry window
        assert not engine.recommend(1, k=5).degraded
    finally:
        engine.close()
        stack.down()


def test_precompute_fills_the_cache_with_tiers(engine: RecommendationEngine, feature_ws: Settings) -> None:
    now = datetime(2026, 1, 4, tzinfo=timezone.utc)
    users = active_users(feature_ws, now, 24)
    assert users.is_monotonic_decreasing and len(users) > 0
    stats = precompute(engine, users, PrecomputeConfig(ttl_s=100, hot_ttl_s=1000), progress=False)
    assert stats.written + stats.degraded == len(users) and stats.hot_users == int(np.ceil(len(users) * 0.1))
    hottest, coldest = int(users.index[0]), int(users.index[-1])
    assert 100 < engine.client.ttl(cache_key(hottest)) <= 1000
    assert 0 < engine.client.ttl(cache_key(coldest)) <= 100
    assert engine.recommend(hottest, k=3).cached


def test_redis_client_has_short_timeouts(feature_ws: Settings) -> None:
    client = redis_client(feature_ws)
    assert isinstance(client, redis.Redis)
    assert client.connection_pool.connection_kwargs["socket_timeout"] <= 0.25


def test_new_item_gets_an_exploration_slot(feature_ws: Settings, index_dir: Path) -> None:
    from bentos.factory import add_item

    # ALS alone fills the top 10 (n_als=20 of the 40 items): the test must not depend on earlier
    # tests having given the user recent items or trending lists (it failed when run alone)
    engine = build_engine(feature_ws, index_dir, config=ServingConfig(n_als=20, n_similar=3, n_content=5,
                                                                      n_trending=5, new_item_share=1.0))
    try:
        source = add_item(engine, {S.COL_ITEM: 80_001, "title": "new", S.COL_CATEGORY: 1, "tags": [],
                                   "price": 1.0, "margin": 0.1, "quality_score": 4.0, "inventory": 3,
                                   "image_url": None})
        assert source == "mean of its category's vectors"
        rec = engine.recommend(_active_user(feature_ws), k=10, use_cache=False)
        slots = [i for i, item in enumerate(rec.items) if item["strategy"] == "new_item"]
        assert slots == [9] and rec.items[9]["item_id"] == 80_001  # the last visible slot
    finally:
        engine.close()


# ---- the service's cache-hit path on the event loop (bentos.cache) --------------------------------


def test_async_cache_lookup_hit_miss_and_onboarding(engine: RecommendationEngine, feature_ws: Settings) -> None:
    import asyncio

    from bentos.cache import AsyncCacheReader

    user = 424245
    engine.client.delete(cache_key(user))
    full = engine.recommend(user, k=5, use_cache=False)
    engine.client.set(cache_key(user), cache_payload(full))

    async def scenario() -> tuple[object, object, object]:
        reader = AsyncCacheReader(engine.cache, feature_ws.effective_redis_url)
        try:
            hit = await reader.lookup(user, 3, None)
            onboarding = await reader.lookup(user, 3, {"categories": [2]})  # never from the cache
            miss = await reader.lookup(user + 1_000_000, 3, None)
        finally:
            await reader.aclose()
        return hit, onboarding, miss

    hit, onboarding, miss = asyncio.run(scenario())
    assert hit is not None and hit.cached and [i["item_id"] for i in hit.items] == [i["item_id"] for i in full.items][:3]
    assert onboarding is None and miss is None
    # what the service does after a miss: the engine computes without reading the cache again
    after = engine.recommend(user, k=3, cache_checked=True)
    assert not after.cached and [i["item_id"] for i in after.items] == [i["item_id"] for i in full.items][:3]


def test_async_cache_lookup_with_redis_down_opens_the_shared_breaker(engine: RecommendationEngine,
                                                                     tmp_path: Path) -> None:
    import asyncio

    from bentos.cache import AsyncCacheReader
    from pipelines.stack import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine.breaker.ok()

    async def lookup() -> object:
        reader = AsyncCacheReader(engine.cache, dead)
        try:
            return await reader.lookup(1, 3, None)
        finally:
            await reader.aclose()

    assert asyncio.run(lookup()) is None
    assert engine.breaker.open  # the miss path now skips Redis and answers degraded from memory
    down = engine.recommend(1, k=3, cache_checked=True)
    assert down.degraded and {i["strategy"] for i in down.items} == {"popular"}
    engine.breaker.ok()


def test_ranker_gets_recent_item_similarity_from_the_index(engine: RecommendationEngine) -> None:
    # the index holds vector(i, 0.1) per item; a candidate's inputs are its best and mean cosine
    # with the user's last items (models.ranker.recent_similarity, the training code)
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    v = {i: np.asarray(vector(i, 0.1), np.float64) for i in (1, 2, 3)}
    out = engine.scoring.recent_similarity({"last_5_items": [1, 2, 424242]}, np.array([3, 1, 999_999]))  # 424242: no vector
    assert out["recent_cosine_max"][0] == pytest.approx(max(cos(v[3], v[1]), cos(v[3], v[2])), abs=1e-5)
    assert out["recent_cosine_mean"][0] == pytest.approx((cos(v[3], v[1]) + cos(v[3], v[2])) / 2, abs=1e-5)
    assert out["recent_cosine_max"][1] == pytest.approx(1.0, abs=1e-5)  # item 1 is one of the recent items
    assert np.isnan(out["recent_cosine_max"][2])  # not in the index: imputed by the ranker, as in training
    assert all(np.isnan(x) for x in engine.scoring.recent_similarity({"last_5_items": None}, np.array([3]))["recent_cosine_max"])


def test_the_cosine_fallback_scores_a_candidate_the_index_lacks_as_zero(engine: RecommendationEngine) -> None:
    # a candidate the user-item table does not hold (an item added after the index was built, or
    # -1) must not fail the request: its cosine is 0; a held item's equals the vectors' cosine
    user = np.asarray(vector(3, 0.1), np.float32)
    out = engine.scoring._cosine(user, None, np.array([3, 999_999, -1]))
    assert out is not None
    assert out[0] == pytest.approx(1.0, abs=1e-5)  # the same vector as the user's
    assert out[1] == 0.0 and out[2] == 0.0


def test_index_reads_share_the_lock_and_an_add_waits_for_them(engine: RecommendationEngine) -> None:
    """Searches and vector reads hold the index lock together (an exclusive lock queued concurrent
    misses behind each other's FAISS calls); an added item waits until the readers are done."""
    import threading

    from bentos.factory import add_item

    item = int(next(iter(engine.catalog.by_category.values()))[0])
    with engine.index_lock.read_lock():  # a request mid-search, on another thread
        done = threading.Event()
        threading.Thread(target=lambda: (engine.similar_items(item, k=3), done.set()), daemon=True).start()
        assert done.wait(10), "a second reader was blocked by the first"
        added = threading.Event()
        row = {S.COL_ITEM: 80_002, "title": "new", S.COL_CATEGORY: 1, "tags": [], "price": 1.0, "margin": 0.1,
               "quality_score": 4.0, "inventory": 3, "image_url": None}
        threading.Thread(target=lambda: (add_item(engine, row), added.set()), daemon=True).start()
        assert not added.wait(0.5), "an add ran while a reader held the index"
    assert added.wait(10), "the add never ran once the reader was done"
    assert engine.index.user_to_item.contains(np.array([80_002]))[0]
