"""Prometheus metrics of the online path, created on first use.

Plain prometheus_client metrics (BentoML 1.4 deprecates ``bentoml.metrics`` for them): under
``bentoml serve`` they appear on the service's own ``/metrics`` endpoint, which aggregates the
workers in prometheus multiprocess mode; they are created lazily, after BentoML has set that mode
up in the worker. Outside a server (tests, the precompute job) they record in-process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Metrics:
    @cached_property
    def stage_seconds(self) -> Any:
        from prometheus_client import Histogram

        return Histogram(
            name="recsys_stage_seconds", documentation="Latency of each stage of /recommend",
            labelnames=["stage"], buckets=_BUCKETS)

    @cached_property
    def cache(self) -> Any:
        from prometheus_client import Counter

        return Counter(
            name="recsys_cache_requests_total", documentation="Recommendation cache lookups by result (hit/miss)",
            labelnames=["result"])

    @cached_property
    def fallbacks(self) -> Any:
        from prometheus_client import Counter

        return Counter(
            name="recsys_fallbacks_total",
            documentation="Degraded paths taken: ranker_timeout, ranker_error, redis, popular",
            labelnames=["kind"])


METRICS = _Metrics()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a block into recsys_stage_seconds{stage=name}."""
    start = time.perf_counter()
    try:
        yield
    finally:
        METRICS.stage_seconds.labels(stage=name).observe(time.perf_counter() - start)
