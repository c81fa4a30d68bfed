"""The cache-hit path of /recommend, on the service's event loop.

A hit is one Redis GET and a slice: handing it to a worker thread (what BentoML does with a sync
API) costs more than the work itself. The service awaits :meth:`AsyncCacheReader.lookup` first and
only sends misses to a thread, where :meth:`RecommendationEngine.recommend` runs with
``cache_checked=True``. The reader shares the engine's circuit breaker and metrics, so a dead Redis
is skipped here exactly as it is on the miss path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio

from bentos.engine import Recommendation, RecommendationEngine, cache_key


class AsyncCacheReader:
    def __init__(self, engine: RecommendationEngine, url: str, timeout_s: float = 0.25) -> None:
        self.engine = engine
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
        if not self.engine.cache_allowed(context) or self.engine.breaker.open:
            return None
        try:
            raw = await self._redis().get(cache_key(user_id))
        except (redis.RedisError, OSError) as exc:
            self.engine.redis_failed("cache read", exc)
            return None
        self.engine.breaker.ok()
        return self.engine.answer_from_cache(user_id, raw, k) if raw else None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
