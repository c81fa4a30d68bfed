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
            documentation="Degraded paths taken: ranker_timeout, ranker_error, ranker_busy, redis, popular",
            labelnames=["kind"])

    @cached_property
    def ranker_budget(self) -> Any:
        from prometheus_client import Gauge

        # one value per live worker (each measures its own at start-up)
        return Gauge(
            name="recsys_ranker_budget_seconds",
            documentation="The ranker's time budget per call (configured, or measured scoring p99 x headroom)",
            multiprocess_mode="liveall")

    @cached_property
    def coalesced(self) -> Any:
        from prometheus_client import Counter

        return Counter(
            name="recsys_coalesced_requests_total",
            documentation="Cache misses answered by an identical concurrent miss's computation (single flight)")

    @cached_property
    def unknown_context_keys(self) -> Any:
        from prometheus_client import Counter

        # labelled by endpoint only (a fixed set): a raw key would let clients create series at will
        return Counter(
            name="recsys_context_unknown_keys_total",
            documentation="Keys inside a request's context that this version does not know (accepted, ignored)",
            labelnames=["endpoint"])

    @cached_property
    def impressions_sent(self) -> Any:
        from prometheus_client import Counter

        return Counter(name="recsys_impressions_sent_total",
                       documentation="Impressions (answers of /recommend) acknowledged by Kafka")

    @cached_property
    def impressions_dropped(self) -> Any:
        from prometheus_client import Counter

        # never blocks an answer: an impression that cannot be sent is dropped and counted here
        return Counter(name="recsys_impressions_dropped_total",
                       documentation="Impressions dropped: buffer_full (Kafka slow or down), kafka_error (send failed)",
                       labelnames=["reason"])


METRICS = _Metrics()

#: The endpoints that take a context: the only values of recsys_context_unknown_keys_total's label.
CONTEXT_ENDPOINTS = ("recommend", "events")


def count_unknown_context_keys(endpoint: str, n_keys: int) -> None:
    """Count ``n_keys`` unknown context keys of one ``endpoint`` request (one of CONTEXT_ENDPOINTS)."""
    if endpoint not in CONTEXT_ENDPOINTS:
        raise ValueError(f"endpoint {endpoint!r} is not one of {CONTEXT_ENDPOINTS}: add it there first")
    if n_keys:
        METRICS.unknown_context_keys.labels(endpoint=endpoint).inc(n_keys)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a block into recsys_stage_seconds{stage=name}."""
    start = time.perf_counter()
    try:
        yield
    finally:
        METRICS.stage_seconds.labels(stage=name).observe(time.perf_counter() - start)
