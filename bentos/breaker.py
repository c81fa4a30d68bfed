"""The Redis circuit breaker every stage of /recommend calls Redis through: after a failure Redis
is skipped for ``retry_s``, and the next call after that tries it again (automatic recovery)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from bentos.metrics import METRICS

log = logging.getLogger(__name__)


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

    def trip(self, what: str, exc: BaseException) -> None:
        """Open the breaker and count the fallback (the async cache read shares this)."""
        self.failed()
        METRICS.fallbacks.labels(kind="redis").inc()
        log.warning("redis %s failed: %s", what, exc)

    def call(self, fn: Callable[[], Any], reasons: list[str], what: str) -> tuple[bool, Any]:
        """``(True, fn())``, or ``(False, None)`` with a reason appended when the breaker is open
        or Redis fails (a degraded answer says why)."""
        if self.open:
            reasons.append(f"redis unavailable ({what})")
            return False, None
        try:
            result = fn()
        except (redis.RedisError, OSError) as exc:
            self.trip(what, exc)
            reasons.append(f"redis unavailable ({what})")
            return False, None
        self.ok()
        return True, result
