"""What the stream consumer reports: its Prometheus metrics (:class:`StreamMetrics`) and its run totals
(:class:`StreamStats`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class StreamMetrics:
    """Prometheus metrics of one consumer, in their own registry (served on ``metrics_port``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("recsys_stream_events", "Events by outcome (applied, duplicate, late, dead_letter).",
                              ["outcome"], registry=r)
        self.dead_letters = Counter("recsys_stream_dead_letters", "Messages sent to the dead-letter topic, by reason.",
                                    ["reason"], registry=r)
        self.events_per_s = Gauge("recsys_stream_events_per_second", "Events consumed per second (last interval).",
                                  registry=r)
        self.lag = Gauge("recsys_stream_consumer_lag", "Messages not yet consumed, per partition.", ["partition"],
                         registry=r)
        self.push_seconds = Histogram("recsys_stream_push_seconds", "Latency of a push, online or offline.", ["store"],
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                      registry=r)
        self.freshness = Histogram("recsys_stream_freshness_seconds", "Kafka create time to online write.",
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.committed = Gauge("recsys_stream_committed_offset", "Last committed offset, per partition.",
                               ["partition"], registry=r)

    def serve(self, port: int) -> Any:
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, registry=self.registry)
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
        return server


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, a batch at a time: the bucket counts come from
    numpy (prometheus_client's own per-value loop cost more than the rest of the bookkeeping)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values.tolist():  # another prometheus_client: the public way
            histogram.observe(value)
        return
    if not len(values):
        return
    # observe() counts a value in the first bucket whose upper bound is >= the value
    per_bucket = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left"),
                             minlength=len(bounds))
    for i, n in enumerate(per_bucket.tolist()):
        if n:
            buckets[i].inc(n)
    total.inc(float(values.sum()))


def reason_label(reason: str) -> str:
    """A bounded metric label from a reason ("malformed JSON: Expecting..." -> "malformed JSON")."""
    return reason.split(":", 1)[0][:60]


@dataclass
class StreamStats:
    """The totals of one ``StreamProcessor.run`` (what ``recsys stream run`` prints at the end)."""

    events: int = 0
    applied: int = 0
    duplicates: int = 0
    late: int = 0
    dead_letters: int = 0
    batches: int = 0
    rows_online: int = 0
    rows_offline: int = 0
    #: canonical events appended to the dataset's events table
    events_offline: int = 0
    commits: int = 0
    seconds: float = 0.0
    #: monotonic times of the first and the last batch (throughput without the group join)
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    freshness_ms: list[np.ndarray] = field(default_factory=list, repr=False)

    def freshness_percentiles(self, *qs: float) -> list[float]:
        if not self.freshness_ms:
            return [math.nan for _ in qs]
        values = np.concatenate(self.freshness_ms)
        return [float(np.percentile(values, q)) for q in qs]
