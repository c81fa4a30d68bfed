"""The recommendation flow, free of any web framework: the orchestrator the BentoML service and
the precompute job both call. :meth:`RecommendationEngine.recommend` runs the stages in order:

1. cache (bentos.cache): ``recs:{user_id}`` (JSON, the top ``cache_size``) -> sliced to k on a hit;
   concurrent misses with the same user, k and context are computed once (single flight,
   bentos.single_flight) and share the answer;
2. features (bentos.features): one pipelined read of the user's profile, real-time and embedding
   features; what needs only the user id (the items bought, the overall trending list) is read
   at the same time in the pool;
3. candidates (bentos.candidates): cold start below ``cold_start_threshold`` interactions (history
   and stream together) or with onboarding categories: popular items with exploration items;
   otherwise the strategies run concurrently (ALS, the two-tower model when one is served, similar
   items, content, trending), seen and purchased items removed;
4. scoring (bentos.scoring): the ranker in one batch on its own bounded executor under its time
   budget (bentos.ranker_call), with its fallbacks, to scores in [0, 1];
5. rules (bentos.rules): stock, purchases, margin, quality, trending, diversity;
6. answer (bentos.answer): the top ``cache_size`` cached (off the response path), the first k
   returned; a ``new_item_share`` of personalised answers show one new item at ``new_item_slot``.

In an experiment (bentos.experiments) the user's arm decides the scoring: ``ranker`` as above,
``blend`` the same stages with the ranker skipped, ``popularity`` popular items only (no
features, candidates or scoring); the answer and its cached copy carry the arm. An arm that pins
model versions is answered by the engine of those models (bentos.arm_engines).

Redis down: answers still come from the in-memory catalogue (popular items), flagged
``degraded``; a circuit breaker (bentos.breaker) skips Redis for ``redis_retry_s`` after a
failure, and the next call after that tries it again, so recovery is automatic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import fasteners
import numpy as np
import redis

from bentos import rules
from bentos.answer import Answer, RankedList, Recommendation
from bentos.breaker import RedisBreaker
from bentos.cache import RecommendationCache
from bentos.candidates.cold_start import ColdStart
from bentos.candidates.merge import CandidateSet
from bentos.candidates.strategies import Candidates
from bentos.candidates.two_tower import TwoTowerRetriever
from bentos.catalog import ItemCatalog
from bentos.config import ServingConfig
from bentos.experiments import Arm, ArmPolicy, Experiment
from bentos.features import OnlineFeatures, UserFeatures
from bentos.item_cache import ItemFeatureCache
from bentos.metrics import METRICS, stage
from bentos.scoring import Scorer, Scoring
from bentos.single_flight import SingleFlight

#: threads shared by candidate generation, the reads started with the features, and cache writes
#: (the ranker has its own: bentos.ranker_call); they mostly wait on Redis or run FAISS, which
#: releases the GIL
POOL_THREADS = 8


class RecommendationEngine:
    """Holds the shared resources (catalogue, Redis client, FAISS index and its lock, worker pool,
    breaker, single flight) and one object per stage; ``recommend`` calls them in order."""

    def __init__(
        self,
        catalog: ItemCatalog,
        client: redis.Redis,
        read_features: Callable[[int | None, Sequence[int]], Any],
        index: Any | None = None,
        scorer: Scorer | None = None,
        config: ServingConfig | None = None,
        now: Callable[[], datetime] | None = None,
        model_versions: Mapping[str, str] | None = None,
        experiment: Experiment | None = None,
        two_tower: TwoTowerRetriever | None = None,
    ) -> None:
        self.catalog = catalog
        self.client = client
        self.index = index
        self.config = cfg = config or ServingConfig()
        self.now = now or (lambda: catalog.snapshot_time or datetime.now().astimezone())
        self.model_versions = dict(model_versions or {})
        self.arms = ArmPolicy(experiment, self.model_versions)
        self.breaker = RedisBreaker(cfg.redis_retry_s)
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="recsys")
        self.flights: SingleFlight[Recommendation] = SingleFlight()
        #: FAISS may not be searched while an item is being added (POST /items). Searches and
        #: vector reads share it (FAISS reads are thread-safe, and one exclusive lock made concurrent
        #: misses queue behind each other's searches); an add takes it alone, before later readers
        self.index_lock = fasteners.ReaderWriterLock()
        self.cache = RecommendationCache(client, self.breaker, self._pool, cfg.cache_ttl_s, self.model_versions,
                                         self.arms)
        self.features = OnlineFeatures(read_features, client, self.breaker,
                                       ItemFeatureCache(cfg.item_feature_ttl_s, cfg.item_feature_cache_items))
        self.cold_start = ColdStart(catalog, cfg.cache_size, cfg.exploration_every, self.now)
        self.two_tower = two_tower
        self.candidates = Candidates(catalog, client, self.breaker, self._pool, index, self.index_lock, cfg, self.now,
                                     two_tower)
        self.scoring = Scoring(scorer, index, self.index_lock, cfg)
        self.answer = Answer(catalog, cfg.cache_size, self.model_versions, self.arms)

    def recommend(self, user_id: int, k: int = 10, context: Mapping[str, Any] | None = None,
                  use_cache: bool = True, cache_checked: bool = False) -> Recommendation:
        """``use_cache=False`` neither reads nor writes ``recs:{user_id}`` (the precompute job
        writes the cache itself, with its own TTLs). ``cache_checked=True``: the caller already
        looked the cache up and missed (the service does that on its event loop), so skip the read.
        Concurrent misses with equal arguments share one computation and its answer object. A user
        whose arm pins other models is answered by that arm's engine (bentos.arm_engines)."""
        arm = self.arms.arm(user_id)
        routed = self.arms.engine(arm)
        if routed is not None and routed is not self:
            return routed.recommend(user_id, k, context, use_cache, cache_checked)
        context = dict(context or {})
        if use_cache and not cache_checked:
            hit = self.cache.read(user_id, k, context)
            if hit is not None:
                return hit
        METRICS.cache.labels(result="miss").inc()
        key = (user_id, k, use_cache, repr(sorted(context.items())))
        rec, shared = self.flights.run(key, lambda: self._compute(user_id, k, context, use_cache, arm))
        if shared:
            METRICS.coalesced.inc()
        return rec

    def similar_items(self, item_id: int, k: int = 10) -> list[dict[str, Any]]:
        """Nearest items by cosine of ALS vectors; category neighbours when the item has no vector.
        Raises KeyError for an unknown item."""
        return self.answer.items(*self.candidates.similar_to(item_id, k))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.scoring.close()

    # ---- the three paths of a cache miss -----------------------------------------------------

    def _compute(self, user_id: int, k: int, context: Mapping[str, Any], use_cache: bool,
                 arm: Arm | None = None) -> Recommendation:
        """A cache miss: the features (with the reads that need only the user id started beside
        them), then cold start, the personalised flow, or popular items when Redis is down; in a
        ``popularity`` arm, popular items only."""
        reasons: list[str] = []
        if arm is not None and arm.mode == "popularity":
            return self._popularity_arm(user_id, k, reasons, arm, use_cache)
        onboarding = [int(c) for c in context.get("categories") or []]
        purchased_read = self._pool.submit(_with_reasons, self.features.purchased, user_id)
        cached_trending = self.candidates.cached_overall_trending()
        trending_read = (_done((cached_trending, [])) if cached_trending is not None
                         else self._pool.submit(_with_reasons, self.candidates.overall_trending))
        with stage("features"):
            user = self.features.user(user_id, reasons)
            if user is None:  # Redis is down: popular items from memory
                trending_read.cancel()
                return self._popular_answer(user_id, k, reasons, arm)
            purchased = _collect(purchased_read, reasons)
        if user.interactions < self.config.cold_start_threshold or onboarding:
            trending_read.cancel()  # cold start needs no trending list: skip the read if not begun
            return self._cold_start(user_id, user, k, onboarding, purchased, reasons,
                                    cache=use_cache and not onboarding, arm=arm)
        return self._personalised(user_id, user, k, context, purchased, trending_read, reasons, cache=use_cache,
                                  arm=arm)

    def _personalised(self, user_id: int, user: UserFeatures, k: int, context: Mapping[str, Any],
                      purchased: set[int], trending_read: Future[tuple[list[int], list[str]]],
                      reasons: list[str], cache: bool, arm: Arm | None = None) -> Recommendation:
        seen = set(user.recent) | purchased
        with stage("candidates"):
            cands = self.candidates.generate(user, seen, reasons, _collect(trending_read, reasons), user_id)
        if not cands.item_ids:
            return self._cold_start(user_id, user, k, [], purchased, reasons, cache, arm)
        with stage("item_features"):
            item_feats = self.features.items(cands.item_ids, reasons)
        with stage("scoring"):
            scores = self.scoring.score(user, item_feats, cands, context, reasons,
                                        use_ranker=arm is None or arm.mode == "ranker")
        with stage("rules"):
            ruled = rules.apply_rules(scores, rules.facts_for(self.catalog, cands.item_ids, cands.trending, item_feats),
                                      purchased)
        ranked = RankedList.from_ruled(ruled, cands.strategies, item_feats)
        new_item = self.candidates.new_item(user_id, seen | set(ranked.item_ids), user.preferred_categories)
        if new_item is not None and ranked.item_ids:
            # a fixed slot (the default k's last): exploration without burying the best, and the
            # same position in a cached top list as in a fresh answer, whatever k either asked for
            ranked.insert(min(self.config.new_item_slot, len(ranked)) - 1, new_item, "new_item")
        return self._finish(user_id, ranked, k, False, reasons, cache, arm)

    def _cold_start(self, user_id: int, user: UserFeatures, k: int, onboarding: list[int], purchased: set[int],
                    reasons: list[str], cache: bool, arm: Arm | None = None) -> Recommendation:
        with stage("cold_start"):
            cands = self.cold_start.candidates(user, onboarding)
            ruled = self._rule_popular(cands, purchased)
        return self._finish(user_id, RankedList.from_ruled(ruled, cands.strategies), k, True, reasons, cache, arm)

    def _popular_answer(self, user_id: int, k: int, reasons: list[str], arm: Arm | None = None) -> Recommendation:
        """Redis is down: popular items from memory, never cached."""
        METRICS.fallbacks.labels(kind="popular").inc()
        cands = self.cold_start.popular_only()
        ruled = self._rule_popular(cands, set())
        return self._finish(user_id, RankedList.from_ruled(ruled, cands.strategies), k, False,
                            reasons or ["degraded"], cache=False, arm=arm)

    def _popularity_arm(self, user_id: int, k: int, reasons: list[str], arm: Arm, cache: bool) -> Recommendation:
        """An experiment's ``popularity`` arm: popular items across categories, the user's purchases
        removed by the rules; no features, candidates or ranker (the baseline of personalisation)."""
        with stage("features"):
            purchased = self.features.purchased(user_id, reasons)
        with stage("cold_start"):
            cands = self.cold_start.popular_only()
            ruled = self._rule_popular(cands, purchased)
        return self._finish(user_id, RankedList.from_ruled(ruled, cands.strategies), k, False, reasons, cache, arm)

    # ---- shared steps ------------------------------------------------------------------------

    def _rule_popular(self, cands: CandidateSet, purchased: set[int]) -> rules.Ruled:
        """The business rules on popularity scores, with the catalogue's facts only."""
        return rules.apply_rules(np.asarray(cands.scores, dtype=np.float64),
                                 rules.facts_for(self.catalog, cands.item_ids), purchased)

    def _finish(self, user_id: int, ranked: RankedList, k: int, cold_start: bool, reasons: list[str],
                cache: bool, arm: Arm | None = None) -> Recommendation:
        rec = self.answer.build(user_id, ranked, k, cold_start, reasons, arm)
        if cache and not reasons:  # a degraded answer is never cached: the next request retries
            self.cache.write(rec)
        return rec


def _with_reasons(read: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    """Run a read in the pool with reasons of its own: the request's list only takes them in
    :func:`_collect`, so a read that finishes after the answer was built cannot change it."""
    reasons: list[str] = []
    return read(*args, reasons), reasons


def _done(value: Any) -> Future[Any]:
    """A future that already holds ``value`` (a read the near cache answered)."""
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _collect(future: Future[tuple[Any, list[str]]], reasons: list[str]) -> Any:
    value, why = future.result()
    reasons.extend(why)
    return value
