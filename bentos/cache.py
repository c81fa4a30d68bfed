"""The recommendation cache ``recs:{user_id}``: its key and payload, the read of a request (in a
worker thread, or on the service's event loop) and the write, off the response path.

A hit is one Redis GET and a slice: handing it to a worker thread (what BentoML does with a sync
API) costs more than the work itself. The service awaits :meth:`AsyncCacheReader.lookup` first and
only sends misses to a thread, where the engine runs with ``cache_checked=True``. Both reads share
one circuit breaker and the metrics, so a dead Redis is skipped on the event loop exactly as it is
on the miss path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import orjson
import redis
import redis.asyncio

from bentos.answer import Recommendation
from bentos.breaker import RedisBreaker
from bentos.experiments import EXPERIMENT_KEY, ArmPolicy
from bentos.metrics import METRICS
from recsys.schema import recs_cache_key as cache_key  # one definition: the stream deletes it

#: The ``model_versions`` keys naming the models: a cached answer of other ones is not served.
#: the two-tower is one of them: its candidates change the answer, so an answer cached before a
#: new two-tower was promoted is stale, and a new one must trigger the hot reload (bentos.reload)
#: and tell engines apart (bentos.arm_engines.model_set), as a new index or ranker does
MODEL_KEYS = ("index", "ranker", "two_tower")

#: what a cached answer must share with a fresh one: the models and the experiment
_COMPARED = (*MODEL_KEYS, EXPERIMENT_KEY)

__all__ = ["AsyncCacheReader", "RecommendationCache", "cache_allowed", "cache_key", "cache_payload"]

log = logging.getLogger(__name__)


def cache_allowed(context: Mapping[str, Any] | None) -> bool:
    """Onboarding categories change the answer: only plain requests read the cache."""
    return not (context or {}).get("categories")


def cache_payload(rec: Recommendation) -> bytes:
    """What ``recs:{user_id}`` holds: the full top list, cold start flag, model versions and arm (JSON)."""
    return orjson.dumps({"items": rec.top, "cold_start": rec.cold_start, "model_versions": rec.model_versions,
                         "arm": rec.arm})


class RecommendationCache:
    """Reads and writes ``recs:{user_id}`` through the shared Redis breaker."""

    def __init__(self, client: redis.Redis, breaker: RedisBreaker, pool: Executor, ttl_s: int,
                 model_versions: dict[str, str], arms: ArmPolicy | None = None) -> None:
        self.client = client
        self.breaker = breaker
        self.pool = pool
        self.ttl_s = ttl_s
        self.model_versions = model_versions
        self.arms = arms or ArmPolicy(None, model_versions)

    def read(self, user_id: int, k: int, context: Mapping[str, Any] | None) -> Recommendation | None:
        """The cached answer, or None (a miss, a request that may not use the cache, Redis down).
        A failed read does not degrade the answer: the request computes it instead."""
        if not cache_allowed(context):
            return None
        ok, raw = self.breaker.call(lambda: self.client.get(cache_key(user_id)), [], "cache read")
        return self.from_raw(user_id, raw, k) if ok and raw else None

    def from_raw(self, user_id: int, raw: bytes, k: int) -> Recommendation | None:
        """A cache hit: the stored top list (JSON) sliced to k; None if the entry is unreadable,
        was computed by another index or ranker than this engine's, or in another arm or experiment
        than the user's now (then it is a miss, and the fresh answer overwrites it). The key stays
        one per user (the stream deletes it): a user is in one arm, so one entry is enough."""
        try:
            cached = orjson.loads(raw)
            body = cached if isinstance(cached, dict) else {"items": cached}
            items = list(body["items"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("unreadable cache entry for user %s (%s): recomputing", user_id, exc)
            return None
        arm = self.arms.arm(user_id)
        name = arm.name if arm is not None else None
        if body.get("arm") != name:
            return None  # another arm's answer (the experiment changed since): never served
        expected = self.arms.versions(arm)
        versions = dict(body.get("model_versions") or expected)
        if any(versions.get(key) != expected.get(key) for key in _COMPARED):
            return None  # computed by other models (a promotion since): a miss, and overwritten
        METRICS.cache.labels(result="hit").inc()
        return Recommendation(user_id, items[:k], bool(body.get("cold_start")), False, True, versions, arm=name)

    def write(self, rec: Recommendation) -> None:
        """Store the answer's top list with the TTL, in the pool: off the response path."""
        payload = cache_payload(rec)
        key, ttl = cache_key(rec.user_id), self.ttl_s

        def write() -> None:
            self.breaker.call(lambda: self.client.set(key, payload, ex=ttl), [], "cache write")

        self.pool.submit(write)


class AsyncCacheReader:
    """The cache read of /recommend on the service's event loop (redis.asyncio)."""

    def __init__(self, cache: RecommendationCache, url: str, timeout_s: float = 0.25) -> None:
        self.cache = cache
        self.url = url
        self.timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None  # made on first use, inside the serving loop

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                health_check_interval=0)
        return self._client

    async def lookup(self, user_id: int, k: int, context: Mapping[str, Any] | None) -> Recommendation | None:
        """The cached answer, or None (a miss, a request that may not use the cache, Redis down)."""
        breaker = self.cache.breaker
        if not cache_allowed(context) or breaker.open:
            return None
        try:
            raw = await self._redis().get(cache_key(user_id))
        except (redis.RedisError, OSError) as exc:
            breaker.trip("cache read", exc)
            return None
        breaker.ok()
        return self.cache.from_raw(user_id, raw, k) if raw else None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
