"""The serving engine's latency techniques on the real stack (Redis, the Feast online store,
FAISS): a bounded ranker call that a stuck ranker cannot turn into stuck requests, its budget
measured at start-up, single flight for concurrent misses, and the reads that start with the
user's features. The rankers here are pure logic injected into a real engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from bentos.cache import cache_key, cache_payload
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.factory import build_engine
from bentos.features import UserFeatures
from pipelines.trending import GLOBAL_KEY, category_key
from recsys.config import Settings
from tests.support.serving import GateScorer, SleepScorer, build_index, personalised_users, wait_until

# small strategy quotas, so that on a 40-item catalogue every strategy contributes
# trending_cache_ttl_s=0: these tests rewrite trending lists between reads (the near cache has its own test)
SMALL: dict[str, Any] = dict(n_als=5, n_similar=3, n_content=5, n_trending=5, new_item_share=0.0,
                             trending_cache_ttl_s=0.0)


@pytest.fixture(scope="module")
def index_dir(feature_ws: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index(tmp_path_factory.mktemp("index") / "index")


@pytest.fixture()
def engine(feature_ws: Settings, index_dir: Path) -> Iterator[RecommendationEngine]:
    eng = build_engine(feature_ws, index_dir, config=ServingConfig(**SMALL))
    yield eng
    eng.close()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _run(engine: RecommendationEngine, out: dict[int, object], user: int, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.__setitem__(user, engine.recommend(user, **kwargs)), daemon=True)
    thread.start()
    return thread


# ---- 4. the ranker's call is bounded ------------------------------------------------------------


def test_a_saturated_ranker_is_skipped_and_other_requests_go_on(feature_ws: Settings, index_dir: Path) -> None:
    # one ranker thread and one waiting slot; a budget long enough that nothing here times out,
    # so what is shown is the bound on threads, not on time
    config = ServingConfig(**SMALL, ranker_timeout_ms=30_000, ranker_workers=1, ranker_queue=1)
    engine = build_engine(feature_ws, index_dir, config=config)
    scorer = GateScorer()
    engine.scoring.scorer = scorer
    a, b, c = personalised_users(feature_ws)[:3]
    stuck: dict[int, object] = {}
    try:
        threads = [_run(engine, stuck, a, k=5, use_cache=False)]
        wait_until(lambda: scorer.calls == 1, what="the first ranker call to start")
        threads.append(_run(engine, stuck, b, k=5, use_cache=False))
        wait_until(lambda: engine.scoring.executor.in_flight == 2, what="the second call to wait for a thread")

        # the executor is full: the next personalised request skips the ranker at once, and its
        # candidates (FAISS and trending on the shared pool) are generated as usual
        busy = engine.recommend(c, k=5, use_cache=False)
        assert busy.degraded and busy.degraded_reasons == ["ranker busy"]
        assert len(busy.items) == 5 and "als" in {i["strategy"] for i in busy.items}  # FAISS, on the shared pool
        assert scorer.calls == 1  # it never reached the ranker
        # cold start and cache hits need no ranker; a cold-start answer is still cached (the
        # cache write runs on the shared pool, which the stuck ranker call does not hold)
        cold = engine.recommend(424250, k=5)
        assert cold.cold_start and not cold.degraded and len(cold.items) == 5
        wait_until(lambda: engine.client.exists(cache_key(424250)), what="the cold-start answer to be cached")
        engine.client.set(cache_key(424251), cache_payload(cold))
        assert engine.recommend(424251, k=3).cached
        # ordering: all of the above finished while both ranker requests were still waiting
        assert all(t.is_alive() for t in threads) and not stuck

        scorer.gate.set()
        for t in threads:
            t.join(30)
        assert set(stuck) == {a, b} and scorer.calls == 2
        assert not any(rec.degraded for rec in stuck.values())  # type: ignore[attr-defined]
    finally:
        scorer.gate.set()
        engine.client.delete(cache_key(424250), cache_key(424251))
        engine.close()


def test_a_hung_ranker_times_out_without_holding_requests(feature_ws: Settings, index_dir: Path) -> None:
    config = ServingConfig(**SMALL, ranker_timeout_ms=50, ranker_workers=1, ranker_queue=1)
    engine = build_engine(feature_ws, index_dir, config=config)
    scorer = GateScorer()
    engine.scoring.scorer = scorer
    users = personalised_users(feature_ws)[:8]
    before = {kind: _sample("recsys_fallbacks_total", kind=kind) for kind in ("ranker_timeout", "ranker_busy")}
    answers: dict[int, object] = {}
    try:
        threads = [_run(engine, answers, user, k=5, use_cache=False) for user in users]
        # each request waits at most the 50 ms budget (or not at all when the executor is full);
        # 30 s is a margin for a loaded machine: without the bound they would wait for the gate
        for t in threads:
            t.join(30)
        assert set(answers) == set(users) and not scorer.gate.is_set()
        # a cold-start answer never reaches the ranker (the workspace is shared: another module
        # may have changed a user's online state); every other answer fell back
        ranked = [rec for rec in answers.values() if not rec.cold_start]  # type: ignore[attr-defined]
        assert len(ranked) >= 2, [(u, rec.cold_start) for u, rec in answers.items()]  # type: ignore[attr-defined]
        reasons = [rec.degraded_reasons for rec in ranked]  # type: ignore[attr-defined]
        assert all(r in (["ranker timeout"], ["ranker busy"]) for r in reasons), reasons
        assert all(len(rec.items) == 5 for rec in answers.values())  # type: ignore[attr-defined]
        after = {kind: _sample("recsys_fallbacks_total", kind=kind) for kind in before}
        assert sum(after.values()) - sum(before.values()) == len(ranked)
        # one call holds the only ranker thread; the calls queued behind it were cancelled when
        # their requests gave up, so they never ran and their slots are free
        assert scorer.calls == 1 and engine.scoring.executor.in_flight == 1
        scorer.gate.set()
        wait_until(lambda: engine.scoring.executor.in_flight == 0, what="the stuck call to finish")
    finally:
        scorer.gate.set()
        engine.close()


def test_the_budget_is_measured_at_start_up(feature_ws: Settings, index_dir: Path) -> None:
    scorer = SleepScorer(0.002)
    engine = build_engine(feature_ws, index_dir, scorer=scorer, config=ServingConfig(ranker_warmup_calls=5))
    try:
        budget = engine.scoring.budget
        assert scorer.calls == 2 + 5  # one untimed warm-up call on each of the 2 ranker threads, then 5 timed
        assert budget.source == "measured"
        assert budget.p99_ms is not None and budget.p99_ms >= 2.0  # each call sleeps 2 ms at least
        assert budget.ms == pytest.approx(max(25.0, budget.p99_ms * 3.0))
        assert _sample("recsys_ranker_budget_seconds") == pytest.approx(budget.seconds)
    finally:
        engine.close()
    fixed = build_engine(feature_ws, index_dir, scorer=SleepScorer(0.0),
                         config=ServingConfig(ranker_timeout_ms=70.0, ranker_warmup_calls=2))
    try:
        assert (fixed.scoring.budget.ms, fixed.scoring.budget.source) == (70.0, "configured")
        assert _sample("recsys_ranker_budget_seconds") == pytest.approx(0.07)
    finally:
        fixed.close()


# ---- 10. single flight, and the reads that start with the features --------------------------------


def test_a_burst_of_concurrent_misses_for_one_user_runs_the_pipeline_once(engine: RecommendationEngine,
                                                                          feature_ws: Settings) -> None:
    user = personalised_users(feature_ws)[0]
    engine.client.delete(cache_key(user))
    gate = threading.Event()
    user_reads: list[int] = []
    read = engine.features.read_features

    def counting_read(user_id: int | None, item_ids: object) -> object:
        if user_id is not None:  # the user's row: once per pipeline run
            user_reads.append(user_id)
            gate.wait(30)
        return read(user_id, item_ids)  # type: ignore[arg-type]

    engine.features.read_features = counting_read
    features_before = _sample("recsys_stage_seconds_count", stage="features")
    coalesced_before = _sample("recsys_coalesced_requests_total")
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(engine.recommend(user, k=10)), daemon=True)
               for _ in range(50)]
    try:
        for t in threads:
            t.start()
        # the leader is held inside the features read until every other request has joined it
        wait_until(lambda: engine.flights.waiting() == 49, what="49 requests to join the first one's flight")
    finally:
        gate.set()
    for t in threads:
        t.join(30)
    assert len(results) == 50 and user_reads == [user]
    assert _sample("recsys_stage_seconds_count", stage="features") - features_before == 1
    assert _sample("recsys_coalesced_requests_total") - coalesced_before == 49
    assert len({id(rec) for rec in results}) == 1  # one answer object, shared
    fresh = engine.recommend(user, k=10, use_cache=False)  # the same pipeline, computed alone
    assert not results[0].cached  # type: ignore[attr-defined]
    assert [i["item_id"] for i in results[0].items] == [i["item_id"] for i in fresh.items]  # type: ignore[attr-defined]
    engine.client.delete(cache_key(user))


def test_purchases_and_overall_trending_are_read_while_the_features_are(engine: RecommendationEngine,
                                                                       feature_ws: Settings) -> None:
    trending_started, purchases_started = threading.Event(), threading.Event()
    seen_in_features_read: list[tuple[bool, bool]] = []
    read, trending, purchased = engine.features.read_features, engine.candidates.overall_trending, \
        engine.features.purchased

    def user_read(user_id: int | None, item_ids: object) -> object:
        if user_id is not None:
            # sequential reads would leave these unset: each wait then ends after 10 s with False
            seen_in_features_read.append((trending_started.wait(10), purchases_started.wait(10)))
        return read(user_id, item_ids)  # type: ignore[arg-type]

    def overall_trending(reasons: list[str]) -> list[int]:
        trending_started.set()
        return trending(reasons)

    def purchases(user_id: int, reasons: list[str]) -> set[int]:
        purchases_started.set()
        return purchased(user_id, reasons)

    engine.features.read_features = user_read
    engine.candidates.overall_trending = overall_trending  # type: ignore[method-assign]
    engine.features.purchased = purchases  # type: ignore[method-assign]
    rec = engine.recommend(personalised_users(feature_ws)[0], k=5, use_cache=False)
    assert seen_in_features_read == [(True, True)]
    assert not rec.degraded and len(rec.items) == 5


def test_trending_takes_the_categories_first_then_the_overall_list(engine: RecommendationEngine) -> None:
    # no vector and no recent items: ALS, similar and content are empty, so the candidates are
    # the trending strategy alone, capped at n_trending = 5
    lonely = UserFeatures(values={}, interactions=50, recent=[], vector=None, preferred_categories=[],
                          categories=[98])
    engine.client.delete(category_key(98))
    try:
        # category 98 has no trending list: the overall list fills the strategy, seen item 2 skipped
        out = engine.candidates.generate(lonely, {2}, [], overall_trending=[1, 2, 3, 4, 5, 6, 7])
        assert out.item_ids == [1, 3, 4, 5, 6] and set(out.strategies) == {"trending"}
        assert out.trending == {1, 2, 3, 4, 5, 6, 7}  # every trending item fetched gets the rule's boost
        # with a list for category 98 (10 above 11), its items come first, each item once
        engine.client.zadd(category_key(98), {"10": 3.0, "11": 2.0})
        out = engine.candidates.generate(lonely, set(), [], overall_trending=[1, 10, 3])
        assert out.item_ids == [10, 11, 1, 3]
        assert out.scores == [1.0, 0.75, 0.5, 0.25]  # rank scores: 1 - r / 4
    finally:
        engine.client.delete(category_key(98))


def test_overall_trending_reads_the_global_list(engine: RecommendationEngine) -> None:
    saved = engine.client.zrevrange(GLOBAL_KEY, 0, -1, withscores=True)
    engine.client.delete(GLOBAL_KEY)
    try:
        engine.client.zadd(GLOBAL_KEY, {str(i): float(i) for i in range(1, 16)})
        reasons: list[str] = []
        # twice the quota (n_trending = 5 -> 10 items), best score first
        assert engine.candidates.overall_trending(reasons) == list(range(15, 5, -1)) and reasons == []
    finally:
        engine.client.delete(GLOBAL_KEY)
        if saved:
            engine.client.zadd(GLOBAL_KEY, {m: s for m, s in saved})


def test_trending_lists_and_item_rows_are_kept_for_their_ttl(feature_ws: Settings, index_dir: Path) -> None:
    engine = build_engine(feature_ws, index_dir, config=ServingConfig(**{**SMALL, "trending_cache_ttl_s": 600.0}))
    saved = engine.client.zrevrange(GLOBAL_KEY, 0, -1, withscores=True)
    try:
        engine.client.delete(GLOBAL_KEY)
        engine.client.zadd(GLOBAL_KEY, {"1": 1.0, "2": 2.0})
        assert engine.candidates.cached_overall_trending() is None  # nothing read yet
        assert engine.candidates.overall_trending([]) == [2, 1]
        engine.client.zadd(GLOBAL_KEY, {"3": 3.0})  # the stream moves the list
        # within the TTL the list read stays (no Redis read, no thread for it); fresh reads see 3
        assert engine.candidates.cached_overall_trending() == [2, 1]
        assert engine.candidates.overall_trending([]) == [2, 1]
        assert engine.recommend(424261, use_cache=False).items  # a miss runs on the cached list
        # the candidates' rows are kept too (ServingConfig's default TTL, 5 s)
        cache = engine.features.item_cache
        assert cache.ttl_s == 5.0 and cache.enabled
        rows = engine.features.items([1, 2], [])
        assert rows is not None and len(cache) >= 2
        assert engine.features.items([2, 1], []) == {name: values[::-1] for name, values in rows.items()}
    finally:
        engine.client.delete(GLOBAL_KEY)
        if saved:
            engine.client.zadd(GLOBAL_KEY, {m: s for m, s in saved})
        engine.close()


def test_single_flight_keys_on_k_and_context(engine: RecommendationEngine) -> None:
    # equal arguments share; a different k or context is another computation (the answers differ)
    a = engine.recommend(424260, k=3, use_cache=False)
    b = engine.recommend(424260, k=4, use_cache=False)
    c = engine.recommend(424260, k=3, context={"categories": [2]}, use_cache=False)
    assert (len(a.items), len(b.items)) == (3, 4) and a is not b
    assert set(engine.catalog.category_of([i["item_id"] for i in c.items]).tolist()) == {2}
    assert engine.flights.waiting() == 0
