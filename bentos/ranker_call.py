"""The ranker's call, bounded in time and in threads: :class:`RankerExecutor` (its own small
thread pool with a bounded queue, skipped at once when full) and :class:`RankerBudget` (the
per-call timeout: configured, or measured at start-up as the scoring p99 with headroom).

A Python thread cannot be cancelled: a ranker call that outlives its budget keeps its thread
until the model returns. Running it on a pool of its own means such a call holds a ranker thread,
never one that candidate generation or cache writes need; the bounded queue means that once every
ranker thread is stuck and enough requests wait, the next request does not queue behind them but
falls back to the cosine at once (``RankerBusy``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from bentos.config import ServingConfig

log = logging.getLogger(__name__)


class RankerBusy(RuntimeError):
    """Every ranker thread is busy and the queue is full: the request skips the ranker."""


class RankerExecutor:
    """``workers`` threads for ranker calls; at most ``workers + queue`` calls in flight (running
    or waiting). :meth:`call` waits at most the budget; a call still queued when its caller gives
    up is cancelled, so it never runs for nobody."""

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"ranker executor needs workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers = workers
        self.capacity = workers + queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ranker")
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet finished (running, or queued for a thread)."""
        return self._in_flight

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Start ``fn(*args)`` on a ranker thread; raises :class:`RankerBusy` when the executor
        already holds ``capacity`` calls."""
        with self._lock:
            if self._in_flight >= self.capacity:
                raise RankerBusy(f"all {self.capacity} ranker slots are taken (threads and queue)")
            self._in_flight += 1
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())  # also runs when a queued call is cancelled
        return future

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """``fn(*args)``'s result within ``timeout_s``; raises :class:`RankerBusy`, ``TimeoutError``
        (the call is cancelled if it had not started) or whatever ``fn`` raised."""
        future = self.submit(fn, *args)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    def warm_up(self, fn: Callable[[], Any], timeout_s: float = 120.0) -> None:
        """Run ``fn`` once on EVERY thread, so per-thread state (a TFLite interpreter, TensorFlow's
        first-call graph building) exists before the first request: sequential calls would all
        reuse one idle thread and leave the other's first request to time out. A barrier holds
        each call until all threads have one. Raises what ``fn`` raised, or ``TimeoutError``
        when the calls have not all returned within ``timeout_s``."""
        barrier = threading.Barrier(self.workers, timeout=timeout_s)

        def run() -> Any:
            barrier.wait()
            return fn()

        deadline = time.monotonic() + timeout_s
        for future in [self.submit(run) for _ in range(self.workers)]:
            # bounded: a first call that hangs must not keep the service from starting (it then
            # holds its ranker thread, and requests fall back to the cosine, counted)
            future.result(timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


@dataclass(frozen=True)
class RankerBudget:
    """The ranker's time budget per call and where it came from: ``configured``
    (``ServingConfig.ranker_timeout_ms``), ``measured`` (max(floor, p99 x headroom)) or ``floor``
    (no ranker was measured)."""

    ms: float
    source: str
    p99_ms: float | None = None

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0

    def describe(self) -> str:
        measured = f", measured scoring p99 {self.p99_ms:.2f} ms" if self.p99_ms is not None else ""
        return f"{self.ms:.2f} ms ({self.source}{measured})"


def choose_budget(config: ServingConfig, timings_ms: Sequence[float] | None = None) -> RankerBudget:
    """The configured budget if there is one, else max(floor, p99 of ``timings_ms`` x headroom),
    else (nothing measured) the floor. The p99 is numpy's linear-interpolation percentile."""
    p99 = float(np.percentile(np.asarray(timings_ms, dtype=np.float64), 99)) if timings_ms else None
    if config.ranker_timeout_ms is not None:
        return RankerBudget(float(config.ranker_timeout_ms), "configured", p99)
    if p99 is None:
        return RankerBudget(float(config.ranker_timeout_floor_ms), "floor")
    return RankerBudget(max(float(config.ranker_timeout_floor_ms), p99 * config.ranker_timeout_headroom),
                        "measured", p99)


def measure_scoring(executor: RankerExecutor, score: Callable[[], Any], calls: int,
                    timeout_s: float = 120.0) -> list[float]:
    """Milliseconds of ``calls`` timed calls of ``score`` through ``executor`` (what a request
    waits for), after one untimed call on every ranker thread (:meth:`RankerExecutor.warm_up`). A
    call that raises, or a measurement still running ``timeout_s`` after it started, ends it
    (logged): what was timed before is returned, possibly nothing."""
    timings: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        executor.warm_up(score, timeout_s)
        for _ in range(calls):
            start = time.perf_counter()
            executor.submit(score).result(timeout=max(0.0, deadline - time.monotonic()))
            timings.append((time.perf_counter() - start) * 1000.0)
    except Exception:  # noqa: BLE001 - a broken model shows up as fallbacks, counted per request
        log.warning("ranker warm-up failed after %d timed calls: requests may fall back to cosine scores",
                    len(timings), exc_info=True)
    return timings
