"""Single flight for cache misses: concurrent calls with the same key run the computation once
and all get its result (or its exception). Only calls that overlap in time share: a call that
starts after the first one finished computes again (by then the cache usually answers it)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One in-flight computation per key; the first caller (the leader) runs it on its own
    thread, later callers with that key (followers) wait for the leader's result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Future[T]] = {}
        self._waiting: dict[Hashable, int] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> tuple[T, bool]:
        """``(result, shared)``: ``shared`` is True for a follower, which got the leader's
        result object itself (callers must not mutate it). The leader's exception is raised in
        every caller of its flight."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = Future()
                leader = True
            else:
                self._waiting[key] = self._waiting.get(key, 0) + 1
                leader = False
        if not leader:
            try:
                return flight.result(), True
            finally:
                with self._lock:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
        try:
            result = compute()
        except BaseException as exc:
            self._land(key, flight)
            flight.set_exception(exc)
            raise
        self._land(key, flight)
        flight.set_result(result)
        return result, False

    def waiting(self, key: Hashable | None = None) -> int:
        """Followers now waiting for the flight of ``key`` (None: for any flight)."""
        with self._lock:
            return self._waiting.get(key, 0) if key is not None else sum(self._waiting.values())

    def _land(self, key: Hashable, flight: Future[T]) -> None:
        # removed before the result is set: a caller arriving after this starts a new flight
        # rather than joining one that has already finished
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
