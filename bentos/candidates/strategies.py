"""The candidates of a personalised answer, from five strategies run concurrently: ALS nearest
items (FAISS, inner product), the two-tower model's nearest items (when one is served:
bentos.candidates.two_tower), items similar to each recent item (FAISS, cosine), content (top
categories and tags of the recent items), trending in the preferred categories, filled up from
the overall trending list (read before the user's features arrive); plus the new-item exploration
slot and the neighbours of one item (/similar_items)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from datetime import datetime
from typing import Any

import fasteners
import numpy as np
import redis

from bentos.breaker import RedisBreaker
from bentos.candidates.merge import CandidateSet, rank_scores, take_turns
from bentos.candidates.two_tower import TwoTowerRetriever
from bentos.catalog import ItemCatalog
from bentos.config import ServingConfig
from bentos.features import UserFeatures
from bentos.metrics import METRICS
from pipelines.trending import GLOBAL_KEY, category_key

#: the strategies, in the order their candidates are kept (deduplication: the first one wins)
STRATEGIES = ("als", "two_tower", "similar", "content", "trending")

Ranked = tuple[list[int], list[float]]  # item ids, best first, and their scores

log = logging.getLogger(__name__)


class Candidates:
    """Candidate generation: FAISS and trending in the pool, content on the calling thread."""

    def __init__(self, catalog: ItemCatalog, client: redis.Redis, breaker: RedisBreaker, pool: Executor,
                 index: Any | None, index_lock: fasteners.ReaderWriterLock, config: ServingConfig,
                 now: Callable[[], datetime], two_tower: TwoTowerRetriever | None = None) -> None:
        self.catalog = catalog
        self.client = client
        self.breaker = breaker
        self.pool = pool
        self.index = index
        self.index_lock = index_lock  # FAISS may not be searched while an item is being added
        self.config = config
        self.now = now
        self.two_tower = two_tower if two_tower is not None and two_tower.ready else None
        # the near cache of trending lists, key -> (expires, n read, top items): every miss reads
        # the overall list and its categories', the same few lists for everyone, which the stream
        # moves by the second; ``trending_cache_ttl_s`` of staleness saves a read and a thread each
        self._lists: dict[str, tuple[float, int, list[int]]] = {}
        self._lists_lock = threading.Lock()

    @property
    def overall_trending_n(self) -> int:
        """How many overall trending items to read: twice the quota, so that the user's seen
        items (unknown when the read starts) rarely leave the strategy short."""
        return 2 * self.config.n_trending

    def overall_trending(self, reasons: list[str]) -> list[int]:
        """The overall trending list, best first: it needs no user features, so the engine reads
        it while they are read (unless :meth:`cached_overall_trending` has it)."""
        return self._trending([GLOBAL_KEY], self.overall_trending_n, reasons)

    def cached_overall_trending(self) -> list[int] | None:
        """The overall trending list from the near cache, None when it is not fresh there."""
        return self._cached_trending([GLOBAL_KEY], self.overall_trending_n)

    def generate(self, user: UserFeatures, seen: set[int], reasons: list[str],
                 overall_trending: Sequence[int] = (), user_id: int | None = None) -> CandidateSet:
        """Deduplicated (first strategy wins), seen items removed, capped at ``n_candidates`` in
        strategy order. Trending: the user's categories' lists in turns, then ``overall_trending``
        (from :meth:`overall_trending`) for what they leave; ``trending`` holds every trending
        item fetched (the rules boost them). ``user_id``: the two-tower's user id feature (None:
        masked as missing)."""
        cfg = self.config
        faiss = self.pool.submit(self._faiss, user.vector, user.recent, seen)
        towers = (self.pool.submit(self.two_tower.retrieve, user_id, user.values, seen, cfg.n_two_tower)
                  if self.two_tower is not None and cfg.n_two_tower > 0 else None)
        keys, n = [category_key(c) for c in user.categories[:5]], cfg.n_trending + len(seen)
        by_category = self._cached_trending(keys, n) if keys else []
        read = self.pool.submit(self._trending, keys, n, reasons) if by_category is None else None
        content = self._content(user.recent, seen, cfg.n_content)
        als, similar = faiss.result()
        two_tower = self._two_tower_result(towers)
        fetched = [*(read.result() if read is not None else by_category or []), *overall_trending]
        trending = list(dict.fromkeys(fetched))  # the categories' items first, each item once
        out = CandidateSet()
        out.add(*als, "als", seen, cfg.n_als)
        out.add(*two_tower, "two_tower", seen, cfg.n_two_tower)
        out.add(*similar, "similar", seen, cfg.n_similar * 5)  # up to n_similar for each of 5 recent items
        out.add(*content, "content", seen, cfg.n_content)
        out.add(trending, rank_scores(len(trending)), "trending", seen, cfg.n_trending)
        out.truncate(cfg.n_candidates)
        out.trending = set(fetched)
        return out

    @staticmethod
    def _two_tower_result(future: Future[Ranked] | None) -> Ranked:
        """The two-tower's candidates; none, logged, when its call failed: one strategy fewer is
        a smaller candidate set, not a failed answer (and not a degraded one: no data is stale)."""
        if future is None:
            return [], []
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - a strategy's failure must not fail the request
            METRICS.fallbacks.labels(kind="two_tower_error").inc()  # counted: a model failing every call shows
            log.exception("two-tower retrieval failed: answering without its candidates")
            return [], []

    def _faiss(self, user_vec: np.ndarray | None, recent: list[int], seen: set[int]) -> tuple[Ranked, Ranked]:
        """(ALS nearest items, items similar to the recent ones); empty without an index."""
        from models.retrieval import CandidateConfig, generate_candidates

        empty: Ranked = ([], [])
        if self.index is None:
            return empty, empty
        with self.index_lock.read_lock():
            cands = generate_candidates(
                self.index, user_vec, recent, seen,
                CandidateConfig(n_als=self.config.n_als, n_similar=self.config.n_similar, max_recent=5))
        als = [(int(i), float(s)) for i, s, src in zip(cands.item_ids, cands.scores, cands.sources) if src == "als"]
        sim = [(int(i), float(s)) for i, s, src in zip(cands.item_ids, cands.scores, cands.sources) if src != "als"]
        return ([i for i, _ in als], [s for _, s in als]), ([i for i, _ in sim], [s for _, s in sim])

    def _content(self, recent: list[int], seen: set[int], n: int) -> Ranked:
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
        ids = take_turns([lst[: n + len(seen)] for lst in lists], n, seen)
        return ids, rank_scores(len(ids))

    def _trending(self, keys: list[str], n: int, reasons: list[str]) -> list[int]:
        """The top ``n`` of each trending list in ``keys``, merged in turns: the lists fresh in the
        near cache, the others in one pipelined read (Redis down: those are left out)."""
        now = time.monotonic()
        lists = self._fresh_lists(keys, n, now)
        missing = [key for key in keys if key not in lists]

        def fetch() -> list[list[bytes]]:
            pipe = self.client.pipeline(transaction=False)
            for key in missing:
                pipe.zrevrange(key, 0, n - 1)
            return pipe.execute()

        if missing:
            ok, fetched = self.breaker.call(fetch, reasons, "trending")
            if ok:
                read = {key: [int(m) for m in lst] for key, lst in zip(missing, fetched)}
                lists.update(read)
                self._remember(read, n, now)
        return take_turns([lists[key] for key in keys if key in lists], n, set())

    def _cached_trending(self, keys: list[str], n: int) -> list[int] | None:
        """``_trending(keys, n)`` when every list is fresh in the near cache, else None."""
        lists = self._fresh_lists(keys, n, time.monotonic())
        if len(lists) < len(set(keys)):
            return None
        return take_turns([lists[key] for key in keys], n, set())

    def _fresh_lists(self, keys: list[str], n: int, now: float) -> dict[str, list[int]]:
        """The top ``n`` of each list in ``keys`` that the near cache holds fresh: read with at
        least ``n`` items, or whole (it had fewer than were asked for)."""
        out: dict[str, list[int]] = {}
        with self._lists_lock:
            for key in keys:
                entry = self._lists.get(key)
                if entry is not None and entry[0] > now and (entry[1] >= n or len(entry[2]) < entry[1]):
                    out[key] = entry[2][:n]
        return out

    def _remember(self, lists: dict[str, list[int]], n: int, now: float) -> None:
        ttl = self.config.trending_cache_ttl_s
        if ttl <= 0:
            return
        with self._lists_lock:
            if len(self._lists) > 10_000:  # one key per category and the overall list; be sure anyway
                self._lists.clear()
            for key, items in lists.items():
                entry = self._lists.get(key)
                if entry is None or entry[0] <= now or n >= entry[1]:  # never replace a longer fresh read
                    self._lists[key] = (now + ttl, n, items)

    def new_item(self, user_id: int, exclude: set[int], prefs: Sequence[int]) -> int | None:
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

    def similar_to(self, item_id: int, k: int) -> tuple[list[int], list[float], list[str]]:
        """Nearest items by cosine of ALS vectors; category neighbours when the item has no vector.
        Raises KeyError for an item in neither."""
        nearest = None
        with self.index_lock.read_lock():
            if self.index is not None and self.index.item_to_item.contains(np.array([item_id]))[0]:
                vec = self.index.item_to_item.vectors(np.array([item_id]))
                nearest = self.index.item_to_item.search(vec, k + 1)
        if nearest is not None:
            scores, ids = nearest
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != item_id][:k]
            return [p[0] for p in pairs], [p[1] for p in pairs], ["similar"] * len(pairs)
        if item_id not in self.catalog:
            raise KeyError(item_id)
        cat = int(self.catalog.category_of([item_id])[0])
        neighbours = [int(i) for i in self.catalog.by_category.get(cat, []) if i != item_id][:k]
        return neighbours, rank_scores(len(neighbours)), ["content"] * len(neighbours)
