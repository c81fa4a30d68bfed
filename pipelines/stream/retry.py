"""Retrying the stream's writes (Redis, the online and offline stores) through infrastructure errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def retry_io(what: str, action: Callable[[], _T], give_up: Callable[[], bool] = lambda: False) -> _T:
    """Retry a write on infrastructure errors with backoff, until it succeeds or ``give_up()``."""
    delay = 0.2
    while True:
        try:
            return action()
        except (redis.RedisError, OSError, ConnectionError) as exc:
            if give_up():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
