"""The recommendation flow, free of any web framework: the BentoML service and the precompute job
both call :class:`RecommendationEngine`.

``recommend(user_id, k, context)``:

1. cache: ``recs:{user_id}`` (JSON, the top ``cache_size``) -> sliced to k on a hit;
2. features: one pipelined read of the user's profile, real-time and embedding features;
3. cold start (fewer than ``cold_start_threshold`` interactions, history and stream together):
   popular items in the onboarding categories (``context.categories``, else the user's preferred
   categories) interleaved with exploration items; no categories -> globally popular,
   round-robin across categories;
4. candidates from four strategies run concurrently: ALS nearest items (FAISS, inner product),
   items similar to each recent item (FAISS, cosine), content (top categories and tags of recent
   items), trending in preferred categories; deduplicated (first strategy wins), seen items
   removed, capped at ``n_candidates`` in strategy order;
5. scoring: the ranker in one batch; on timeout or error the cosine of user and item embeddings
   (counted, flagged ``degraded``); with no ranker a weighted blend of the strategies'
   min-max-normalised scores;
6. business rules (bentos.rules) on scores in [0, 1], then the top ``cache_size`` are cached
   (off the response path) and the first k returned.

Redis down: answers still come from the in-memory catalogue (popular items), flagged
``degraded``; a circuit breaker skips Redis for ``redis_retry_s`` after a failure, and the next
call after that tries it again, so recovery is automatic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import orjson
import redis

from bentos import rules
from bentos.catalog import ItemCatalog
from bentos.metrics import METRICS, stage
from pipelines.trending import GLOBAL_KEY, category_key
from recsys import schema as S
from recsys.schema import recs_cache_key as cache_key  # one definition: the stream deletes it

log = logging.getLogger(__name__)

USER_FEATURES = (
    "user_profile:n_events",
    "user_profile:n_events_7d",
    "user_profile:mean_rating",
    "user_profile:days_since_first_seen",
    "user_profile:top_categories",
    "user_realtime:last_5_items",
    "user_realtime:interaction_count",
    "user_realtime:total_purchases",
    "user_realtime:preferred_categories",
    "user_embedding:user_embedding",
)
ITEM_FEATURES = (
    "item_profile:category_id",
    "item_profile:inventory",
    "item_profile:margin",
    "item_profile:quality_score",
    "item_profile:popularity_1d",
    "item_profile:popularity_7d",
    "item_profile:title",
    "item_profile:price",
    "item_profile:image_url",
    "item_embedding:item_embedding",
)
STRATEGIES = ("als", "similar", "content", "trending")


def purchased_key(user_id: int) -> str:
    """A Redis set of the items a user bought (rule: already purchased items are removed)."""
    return f"purchased:{user_id}"


@dataclass(frozen=True)
class ServingConfig:
    n_candidates: int = 150
    n_als: int = 50
    n_similar: int = 10
    n_content: int = 30
    n_trending: int = 20
    cold_start_threshold: int = 10
    exploration_every: int = 5  # cold start: every 5th slot is an exploration item
    new_item_share: float = 0.1  # share of personalised answers that show one new item (exploration)
    new_item_days: int = 7
    cache_size: int = 100
    cache_ttl_s: int = 600
    ranker_timeout_ms: float = 50.0
    redis_retry_s: float = 1.0
    blend_weights: Mapping[str, float] = field(
        default_factory=lambda: {"als": 1.0, "similar": 0.8, "content": 0.5, "trending": 0.6})


class Scorer(Protocol):
    """The ranker as the service sees it: logits for one user against a batch of candidates."""

    version: str

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray: ...


@dataclass
class CandidateSet:
    item_ids: list[int] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def add(self, item_ids: Sequence[int], scores: Sequence[float], strategy: str, seen: set[int], limit: int) -> None:
        """Append up to ``limit`` items of one strategy, skipping padding (-1), seen and present."""
        present = set(self.item_ids)
        added = 0
        for item, score in zip(item_ids, scores):
            if added >= limit:
                break
            item = int(item)
            if item < 0 or item in seen or item in present:
                continue
            self.item_ids.append(item)
            self.strategies.append(strategy)
            self.scores.append(float(score))
            present.add(item)
            added += 1


@dataclass
class Recommendation:
    user_id: int
    items: list[dict[str, Any]]
    cold_start: bool
    degraded: bool
    cached: bool
    model_versions: dict[str, str]
    degraded_reasons: list[str] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)  # the full top list (what the cache holds)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "items": self.items, "cold_start": self.cold_start,
                "degraded": self.degraded, "cached": self.cached, "model_versions": self.model_versions,
                "degraded_reasons": self.degraded_reasons}


class RedisBreaker:
    """Skip Redis for ``retry_s`` after a failure instead of paying a timeout on every request."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return time.monotonic() < self._down_until

    def failed(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_s

    def ok(self) -> None:
        self._down_until = 0.0


class RecommendationEngine:
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
    ) -> None:
        self.catalog = catalog
        self.client = client
        self.read_features = read_features
        self.index = index
        self.scorer = scorer
        self.config = config or ServingConfig()
        self.now = now or (lambda: catalog.snapshot_time or datetime.now().astimezone())
        self.model_versions = dict(model_versions or {})
        self.breaker = RedisBreaker(self.config.redis_retry_s)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="recsys")
        #: FAISS may not be searched while an item is being added (POST /items): both take this lock
        self.index_lock = threading.Lock()

    # ---- public ------------------------------------------------------------------------------

    def recommend(self, user_id: int, k: int = 10, context: Mapping[str, Any] | None = None,
                  use_cache: bool = True, cache_checked: bool = False) -> Recommendation:
        """``use_cache=False`` neither reads nor writes ``recs:{user_id}`` (the precompute job
        writes the cache itself, with its own TTLs). ``cache_checked=True``: the caller already
        looked the cache up and missed (the service does that on its event loop), so skip the read."""
        context = dict(context or {})
        onboarding = [int(c) for c in context.get("categories") or []]
        if use_cache and not cache_checked and self.cache_allowed(context):
            raw = self._cache_get(user_id)
            hit = self.answer_from_cache(user_id, raw, k) if raw is not None else None
            if hit is not None:
                return hit
        METRICS.cache.labels(result="miss").inc()
        reasons: list[str] = []
        with stage("features"):
            user = self._user_features(user_id, reasons)
        if user is None:  # Redis is down: popular items from memory
            return self._popular_answer(user_id, k, reasons, cold_start=False)
        interactions = max(int(user.get("n_events") or 0), int(user.get("interaction_count") or 0))
        if interactions < self.config.cold_start_threshold or onboarding:
            return self._cold_start(user_id, user, k, onboarding, reasons, cache=use_cache and not onboarding)
        return self._personalised(user_id, user, k, context, reasons, cache=use_cache)

    def similar_items(self, item_id: int, k: int = 10) -> list[dict[str, Any]]:
        """Nearest items by cosine of ALS vectors; category neighbours when the item has no vector."""
        with self.index_lock:
            found = self.index is not None and self.index.item_to_item.contains(np.array([item_id]))[0]
            if found:
                vec = self.index.item_to_item.vectors(np.array([item_id]))
                scores, ids = self.index.item_to_item.search(vec, k + 1)
        if found:
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != item_id][:k]
            return self._decorate([p[0] for p in pairs], [p[1] for p in pairs], ["similar"] * len(pairs))
        if item_id not in self.catalog:
            raise KeyError(item_id)
        cat = int(self.catalog.category_of([item_id])[0])
        ids = [int(i) for i in self.catalog.by_category.get(cat, []) if i != item_id][:k]
        return self._decorate(ids, [1.0 - n / max(len(ids), 1) for n in range(len(ids))], ["content"] * len(ids))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # ---- Redis helpers -----------------------------------------------------------------------

    def _redis(self, fn: Callable[[], Any], reasons: list[str], what: str) -> tuple[bool, Any]:
        if self.breaker.open:
            reasons.append(f"redis unavailable ({what})")
            return False, None
        try:
            result = fn()
        except (redis.RedisError, OSError) as exc:
            self.redis_failed(what, exc)
            reasons.append(f"redis unavailable ({what})")
            return False, None
        self.breaker.ok()
        return True, result

    def redis_failed(self, what: str, exc: BaseException) -> None:
        """Open the breaker and count the fallback (the async cache read shares this)."""
        self.breaker.failed()
        METRICS.fallbacks.labels(kind="redis").inc()
        log.warning("redis %s failed: %s", what, exc)

    @staticmethod
    def cache_allowed(context: Mapping[str, Any] | None) -> bool:
        """Onboarding categories change the answer: only plain requests read the cache."""
        return not (context or {}).get("categories")

    def _cache_get(self, user_id: int) -> bytes | None:
        ok, raw = self._redis(lambda: self.client.get(cache_key(user_id)), [], "cache read")
        return raw if ok and raw else None

    def cache_payload(self, rec: Recommendation) -> bytes:
        return orjson.dumps({"items": rec.top, "cold_start": rec.cold_start, "model_versions": rec.model_versions})

    def _cache_put(self, rec: Recommendation) -> None:
        payload = self.cache_payload(rec)
        key, ttl = cache_key(rec.user_id), self.config.cache_ttl_s

        def write() -> None:
            self._redis(lambda: self.client.set(key, payload, ex=ttl), [], "cache write")

        self._pool.submit(write)  # off the response path

    def answer_from_cache(self, user_id: int, raw: bytes, k: int) -> Recommendation | None:
        """A cache hit: the stored top list (JSON) sliced to k; None if the entry is unreadable
        (then it is a miss, and the fresh answer overwrites it)."""
        try:
            cached = orjson.loads(raw)
            body = cached if isinstance(cached, dict) else {"items": cached}
            items = list(body["items"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("unreadable cache entry for user %s (%s): recomputing", user_id, exc)
            return None
        METRICS.cache.labels(result="hit").inc()
        return Recommendation(user_id, items[:k], bool(body.get("cold_start")), False, True,
                              dict(body.get("model_versions") or self.model_versions))

    def _user_features(self, user_id: int, reasons: list[str]) -> dict[str, Any] | None:
        ok, row = self._redis(lambda: self.read_features(user_id, []), reasons, "features")
        return row.user if ok else None

    # ---- answers -----------------------------------------------------------------------------

    def _finish(self, user_id: int, item_ids: list[int], scores: np.ndarray, strategies: list[str], k: int,
                cold_start: bool, reasons: list[str], item_feats: Mapping[str, Sequence[Any]] | None = None,
                cache: bool = True) -> Recommendation:
        items = self._decorate(item_ids, scores.tolist(), strategies, item_feats)[: self.config.cache_size]
        rec = Recommendation(user_id, items[:k], cold_start, bool(reasons), False, self.model_versions, reasons)
        rec.top = items
        if cache and not reasons:  # a degraded answer is never cached: the next request retries
            self._cache_put(rec)
        return rec

    def _decorate(self, item_ids: Sequence[int], scores: Sequence[float], strategies: Sequence[str],
                  item_feats: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        meta = self.catalog.metadata(item_ids)
        if item_feats is not None:  # fresher values from the online store where present
            for col in ("title", "price", "image_url"):
                online = item_feats.get(col)
                if online is not None:
                    meta[col] = [o if o is not None else m for o, m in zip(online, meta[col])]
        return [{"item_id": int(i), "score": round(float(s), 6), "title": t, "price": p, "image_url": u,
                 "strategy": st}
                for i, s, st, t, p, u in zip(item_ids, scores, strategies, meta["title"], meta["price"],
                                             meta["image_url"])]

    def _facts_from_catalog(self, item_ids: Sequence[int], trending: set[int]) -> rules.ItemFacts:
        f = self.catalog.rule_values(item_ids)
        return rules.ItemFacts(
            item_ids=np.asarray(item_ids, dtype=np.int64),
            category=np.nan_to_num(f[S.COL_CATEGORY], nan=-1).astype(np.int64),
            inventory=f["inventory"], margin=f["margin"], quality=f["quality_score"],
            trending=np.array([i in trending for i in item_ids], dtype=bool),
        )

    def _popular_answer(self, user_id: int, k: int, reasons: list[str], cold_start: bool) -> Recommendation:
        METRICS.fallbacks.labels(kind="popular").inc()
        ids = self._round_robin_popular(self.config.cache_size, set())
        scores = np.linspace(1.0, 0.5, num=len(ids)) if ids else np.empty(0)
        ruled = rules.apply_rules(scores, self._facts_from_catalog(ids, set()))
        return self._finish(user_id, ruled.item_ids.tolist(), ruled.scores, ["popular"] * len(ruled.item_ids), k,
                            cold_start, reasons or ["degraded"], cache=False)

    def _round_robin_popular(self, n: int, seen: set[int], categories: Sequence[int] | None = None) -> list[int]:
        """Popular items taking turns across categories: the given ones in order, else every
        category, ordered by the overall rank of its most popular item."""
        if categories:
            cats = [int(c) for c in categories]
        else:  # by_category is built in that order (groups in order of first appearance)
            cats = list(self.catalog.by_category)
        return _take_turns([self.catalog.by_category.get(c, np.empty(0, np.int64)) for c in cats], n, seen)

    def _cold_start(self, user_id: int, user: Mapping[str, Any], k: int, onboarding: list[int],
                    reasons: list[str], cache: bool) -> Recommendation:
        with stage("cold_start"):
            categories = onboarding or list(user.get("preferred_categories") or [])
            seen = set(int(i) for i in (user.get("last_5_items") or []))
            n = self.config.cache_size
            if categories:
                popular = self._round_robin_popular(n, seen, categories)
                explore = [int(i) for i in self.catalog.new_items(self.now(), categories=categories) if int(i) not in seen]
                if not explore:  # no new items there: the long tail of those categories
                    explore = [i for c in categories for i in self.catalog.by_category.get(int(c), [])[::-1].tolist()]
                ids, strategies = _interleave(popular, explore, self.config.exploration_every, n)
            else:
                ids = self._round_robin_popular(n, seen)
                strategies = ["popular"] * len(ids)
            scores = np.linspace(1.0, 0.5, num=len(ids)) if ids else np.empty(0)
            ruled = rules.apply_rules(scores, self._facts_from_catalog(ids, set()), self._purchased(user_id, reasons))
        order = ruled.positions.tolist()
        return self._finish(user_id, ruled.item_ids.tolist(), ruled.scores, [strategies[p] for p in order], k,
                            True, reasons, cache=cache)

    def _purchased(self, user_id: int, reasons: list[str]) -> set[int]:
        ok, members = self._redis(lambda: self.client.smembers(purchased_key(user_id)), reasons, "purchases")
        return {int(m) for m in members} if ok and members else set()

    def _personalised(self, user_id: int, user: Mapping[str, Any], k: int, context: Mapping[str, Any],
                      reasons: list[str], cache: bool) -> Recommendation:
        recent = [int(i) for i in (user.get("last_5_items") or [])][::-1]  # most recent first
        purchased = self._purchased(user_id, reasons)
        seen = set(recent) | purchased
        vector = user.get("user_embedding")
        user_vec = np.asarray(vector, dtype=np.float32) if vector else None
        with stage("candidates"):
            cands, trending = self._candidates(user, recent, seen, user_vec, reasons)
        if not cands.item_ids:
            return self._cold_start(user_id, user, k, [], reasons, cache)
        with stage("item_features"):
            ok, row = self._redis(lambda: self.read_features(None, cands.item_ids), reasons, "item features")
        item_feats = row.items if ok else None
        with stage("scoring"):
            scores01 = self._score(user, item_feats, cands, user_vec, context, reasons)
        with stage("rules"):
            facts = self._facts(cands.item_ids, item_feats, trending)
            ruled = rules.apply_rules(scores01, facts, purchased)
        order = ruled.positions.tolist()
        feats = {c: [item_feats[c][p] for p in order] for c in ("title", "price", "image_url")} if item_feats else None
        ids, scores, strategies = ruled.item_ids.tolist(), ruled.scores, [cands.strategies[p] for p in order]
        new_item = self._new_item_for(user_id, seen | set(ids), prefs=user.get("preferred_categories"))
        if new_item is not None and ids:
            slot = min(k, len(ids)) - 1  # the last visible slot: exploration without burying the best
            ids.insert(slot, new_item)
            scores = np.insert(scores, slot, scores[slot])
            strategies.insert(slot, "new_item")
            if feats is not None:
                for col in feats:
                    feats[col].insert(slot, None)
        return self._finish(user_id, ids, scores, strategies, k, False, reasons, feats, cache=cache)

    def _new_item_for(self, user_id: int, exclude: set[int], prefs: Sequence[int] | None) -> int | None:
        """The newest unseen new item (preferred categories first) for a ``new_item_share`` of
        users, chosen by a stable hash of the user and the hour so an answer is reproducible."""
        share = self.config.new_item_share
        if share <= 0 or (hash((user_id, int(self.now().timestamp() // 3600))) % 10_000) >= share * 10_000:
            return None
        for categories in ([int(c) for c in prefs] if prefs else None, None):
            for item in self.catalog.new_items(self.now(), self.config.new_item_days, categories):
                if int(item) not in exclude:
                    return int(item)
        return None

    def _candidates(self, user: Mapping[str, Any], recent: list[int], seen: set[int],
                    user_vec: np.ndarray | None, reasons: list[str]) -> tuple[CandidateSet, set[int]]:
        cfg = self.config
        prefs = [int(c) for c in (user.get("preferred_categories") or user.get("top_categories") or [])]
        futures = {
            "faiss": self._pool.submit(self._faiss_candidates, user_vec, recent, seen),
            "trending": self._pool.submit(self._trending, prefs, cfg.n_trending + len(seen), reasons),
        }
        content = self._content(recent, seen, cfg.n_content)
        als, similar = futures["faiss"].result()
        trending = futures["trending"].result()
        out = CandidateSet()
        out.add(*als, "als", seen, cfg.n_als)
        out.add(*similar, "similar", seen, cfg.n_similar * 5)  # up to n_similar for each of 5 recent items
        out.add(*content, "content", seen, cfg.n_content)
        out.add(trending, [1.0 - n / max(len(trending), 1) for n in range(len(trending))], "trending", seen,
                cfg.n_trending)
        del out.item_ids[cfg.n_candidates:], out.strategies[cfg.n_candidates:], out.scores[cfg.n_candidates:]
        return out, set(trending)

    def _faiss_candidates(self, user_vec: np.ndarray | None, recent: list[int],
                          seen: set[int]) -> tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]:
        from models.retrieval import CandidateConfig, generate_candidates

        empty: tuple[list[int], list[float]] = ([], [])
        if self.index is None:
            return empty, empty
        with self.index_lock:
            cands = generate_candidates(
                self.index, user_vec, recent, seen,
                CandidateConfig(n_als=self.config.n_als, n_similar=self.config.n_similar, max_recent=5))
        als = [(int(i), float(s)) for i, s, src in zip(cands.item_ids, cands.scores, cands.sources) if src == "als"]
        sim = [(int(i), float(s)) for i, s, src in zip(cands.item_ids, cands.scores, cands.sources) if src != "als"]
        return ([i for i, _ in als], [s for _, s in als]), ([i for i, _ in sim], [s for _, s in sim])

    def _content(self, recent: list[int], seen: set[int], n: int) -> tuple[list[int], list[float]]:
        """Top categories and tags of the recent items -> their most popular items, in turns."""
        if not recent:
            return [], []
        cats = self.catalog.category_of(recent)
        cat_order = [int(c) for c, _ in sorted(
            {int(c): int((cats == c).sum()) for c in cats if c >= 0}.items(), key=lambda kv: (-kv[1], kv[0]))][:2]
        tag_counts: dict[str, int] = {}
        for item in recent:
            for tag in self.catalog.tags_of(item):
                tag_counts[tag] = tag_counts.get(tag, 0) + 1
        tags = [t for t, _ in sorted(tag_counts.items(), key=lambda kv: (-kv[1], kv[0]))][:3]
        lists = [self.catalog.by_category.get(c, np.empty(0, np.int64)) for c in cat_order]
        lists += [self.catalog.by_tag.get(t, np.empty(0, np.int64)) for t in tags]
        ids = _take_turns([lst[: n + len(seen)] for lst in lists], n, seen)
        return ids, [1.0 - r / max(len(ids), 1) for r in range(len(ids))]

    def _trending(self, categories: list[int], n: int, reasons: list[str]) -> list[int]:
        keys = [category_key(c) for c in categories[:5]] or [GLOBAL_KEY]

        def fetch() -> list[list[bytes]]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.zrevrange(key, 0, n - 1)
            return pipe.execute()

        ok, lists = self._redis(fetch, reasons, "trending")
        if not ok:
            return []
        return _take_turns([[int(m) for m in lst] for lst in lists], n, set())

    def _score(self, user: Mapping[str, Any], item_feats: Mapping[str, Sequence[Any]] | None, cands: CandidateSet,
               user_vec: np.ndarray | None, context: Mapping[str, Any], reasons: list[str]) -> np.ndarray:
        ids = np.asarray(cands.item_ids, dtype=np.int64)
        strat_scores = np.asarray(cands.scores, dtype=np.float64)
        if self.scorer is not None and item_feats is not None:
            inputs = {**item_feats, **self._recent_similarity(user, ids)}
            future = self._pool.submit(self.scorer.score, user, inputs, ids, strat_scores, context)
            try:
                logits = np.asarray(future.result(timeout=self.config.ranker_timeout_ms / 1000.0), dtype=np.float64)
                if logits.shape == ids.shape and np.isfinite(logits).all():
                    return rules.to_unit(logits, "logit")
                raise ValueError(f"ranker returned shape {logits.shape} or non-finite scores")
            except (FutureTimeout, Exception) as exc:  # noqa: BLE001 - any ranker failure degrades, never 500s
                kind = "ranker_timeout" if isinstance(exc, FutureTimeout) else "ranker_error"
                METRICS.fallbacks.labels(kind=kind).inc()
                reasons.append(kind.replace("_", " "))
                log.warning("ranker fell back to cosine: %s", exc)
                cosine = self._cosine(user_vec, item_feats, ids)
                if cosine is not None:
                    return rules.to_unit(cosine, "cosine")
        return self._blend(cands)

    def _index_vectors(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, known) of ``item_ids`` from the item-item index (-1 and unknown ids: zeros)."""
        assert self.index is not None
        unique, inverse = np.unique(np.asarray(item_ids, dtype=np.int64), return_inverse=True)
        with self.index_lock:
            known = self.index.item_to_item.contains(unique) & (unique >= 0)
            vectors = np.zeros((len(unique), self.index.item_to_item.dim), dtype=np.float32)
            if known.any():
                vectors[known] = self.index.item_to_item.vectors(unique[known])
        return vectors[inverse], known[inverse]

    def _recent_similarity(self, user: Mapping[str, Any], ids: np.ndarray) -> dict[str, list[float]]:
        """The ranker's recent-item inputs (each candidate's best and mean cosine with the user's
        last 5 items) by the training code (models.ranker.recent_similarity) on the index's
        vectors; empty without an index, so the ranker imputes them as in training."""
        from models.ranker import RECENT, recent_matrix, recent_similarity

        if self.index is None or not len(ids):
            return {}
        recent = recent_matrix([user.get("last_5_items")] * len(ids))
        candidates, _ = self._index_vectors(ids)
        values = recent_similarity(candidates, recent, self._index_vectors)
        return {name: values[:, col].tolist() for col, (name, _) in enumerate(RECENT)}

    def _cosine(self, user_vec: np.ndarray | None, item_feats: Mapping[str, Sequence[Any]] | None,
                ids: np.ndarray) -> np.ndarray | None:
        if user_vec is None or not np.any(user_vec):
            return None
        if self.index is not None:
            with self.index_lock:
                vectors = self.index.user_to_item.vectors(ids)
        elif item_feats is not None and item_feats.get("item_embedding") is not None:
            vectors = np.array([v if v else np.zeros_like(user_vec) for v in item_feats["item_embedding"]],
                               dtype=np.float32)
        else:
            return None
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(user_vec)
        return np.where(norms > 0, vectors @ user_vec / np.where(norms > 0, norms, 1.0), 0.0)

    def _blend(self, cands: CandidateSet) -> np.ndarray:
        """Weighted blend of each strategy's min-max-normalised scores, in [0, 1]."""
        scores = np.asarray(cands.scores, dtype=np.float64)
        strategies = np.asarray(cands.strategies)
        out = np.zeros(len(scores))
        weights = self.config.blend_weights
        top = max(weights.values()) if weights else 1.0
        for name in set(cands.strategies):
            mask = strategies == name
            s = scores[mask]
            span = s.max() - s.min()
            norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
            out[mask] = norm * weights.get(name, 0.5) / top
        return np.clip(out, 0.0, 1.0)

    def _facts(self, item_ids: list[int], item_feats: Mapping[str, Sequence[Any]] | None,
               trending: set[int]) -> rules.ItemFacts:
        """Rule inputs from the online features, falling back to the catalogue per missing value."""
        base = self._facts_from_catalog(item_ids, trending)
        if item_feats is None:
            return base

        def merged(name: str, fallback: np.ndarray) -> np.ndarray:
            online = np.array([np.nan if v is None else float(v) for v in item_feats[name]], dtype=np.float64)
            return np.where(np.isnan(online), fallback, online)

        category = merged(S.COL_CATEGORY, base.category.astype(np.float64))
        return rules.ItemFacts(
            item_ids=base.item_ids, category=np.nan_to_num(category, nan=-1).astype(np.int64),
            inventory=merged("inventory", base.inventory), margin=merged("margin", base.margin),
            quality=merged("quality_score", base.quality), trending=base.trending)


def _take_turns(lists: Sequence[Sequence[int]], n: int, seen: set[int]) -> list[int]:
    """Merge ranked lists by taking one item from each in turn, skipping seen and repeats."""
    out: list[int] = []
    taken: set[int] = set()
    iters = [iter(lst) for lst in lists]
    while iters and len(out) < n:
        alive = []
        for it in iters:
            for item in it:
                item = int(item)
                if item not in seen and item not in taken:
                    out.append(item)
                    taken.add(item)
                    alive.append(it)
                    break
            if len(out) >= n:
                break
        iters = alive
    return out


def _interleave(popular: list[int], explore: list[int], every: int, n: int) -> tuple[list[int], list[str]]:
    """Popular items with an exploration item in every ``every``-th slot."""
    ids: list[int] = []
    strategies: list[str] = []
    taken: set[int] = set()
    pop, exp = iter(popular), iter(explore)
    while len(ids) < n:
        source, label = (exp, "exploration") if every and (len(ids) + 1) % every == 0 else (pop, "popular")
        item = next((i for i in source if i not in taken), None)
        if item is None:
            other, other_label = (pop, "popular") if label == "exploration" else (exp, "exploration")
            item, label = next((i for i in other if i not in taken), None), other_label
            if item is None:
                break
        ids.append(item)
        strategies.append(label)
        taken.add(item)
    return ids, strategies
