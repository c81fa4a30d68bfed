"""How the stream consumer batches, remembers and reports (:class:`StreamOptions`), and the topic's id."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipelines import kafka_admin, trending
from pipelines.stream.activity import ACTIVITY_RETENTION_S, HOUR_S
from pipelines.realtime_rules import PURCHASED_MAX, DedupeWindow
from recsys.config import Settings


@dataclass(frozen=True)
class StreamOptions:
    """How the consumer batches, remembers and reports; defaults come from Settings."""

    group_id: str = "recsys-stream"
    batch_events: int = 5_000
    batch_ms: int = 100
    offline_flush_s: float = 60.0
    offline_batch_rows: int = 100_000
    window: DedupeWindow = field(default_factory=DedupeWindow)
    max_future_s: int = 300
    metrics_port: int | None = None
    trending: trending.TrendingConfig = field(default_factory=trending.TrendingConfig)
    trending_publish_s: float = 5.0
    #: Exit (after flushing and committing) once every assigned partition is read to its end.
    stop_when_caught_up: bool = False
    #: Keep every event's freshness (ms) in the stats, for the benchmark.
    record_freshness: bool = False
    session_timeout_ms: int = 6_000
    #: Fold states kept in memory between micro-batches (the most recently used; 0 = none). The
    #: consumer is the only writer of its partitions' states, so they stay what Redis holds; the
    #: cache is dropped on every rebalance and a state goes back in only after its transaction.
    state_cache_users: int = 50_000
    heartbeat_interval_ms: int = 1_000
    #: Purchased items kept per user (the latest purchases): the Redis set serving filters with.
    purchased_max: int = PURCHASED_MAX
    #: How long the activity set keeps each hour (:mod:`.activity`): the longest window that
    #: ``recsys precompute --hours`` can take live users from.
    activity_retention_s: int = ACTIVITY_RETENTION_S
    #: An event for an item outside the catalogue reloads the items table first (items added while
    #: streaming), at most this often; an item still unknown then is dead-lettered.
    catalogue_reload_s: float = 1.0

    def __post_init__(self) -> None:
        if self.purchased_max < 1:
            raise ValueError(f"purchased_max {self.purchased_max} must be at least 1 "
                             "(set stream_purchased_max to the purchases to keep per user)")
        if self.activity_retention_s < HOUR_S:
            raise ValueError(f"activity_retention_s {self.activity_retention_s} must be at least {HOUR_S} "
                             "(one hour: the activity set counts by the hour)")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> StreamOptions:
        base = cls(
            group_id=settings.stream_group_id,
            batch_events=settings.stream_batch_events,
            batch_ms=settings.stream_batch_ms,
            offline_flush_s=settings.stream_offline_flush_s,
            offline_batch_rows=settings.stream_offline_batch_rows,
            window=DedupeWindow(settings.stream_dedupe_window_s * 1_000_000, settings.stream_dedupe_max_ids),
            max_future_s=settings.stream_max_future_s,
            metrics_port=settings.stream_metrics_port,
            trending=trending.TrendingConfig.from_settings(settings),
            purchased_max=settings.stream_purchased_max,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def topic_id(settings: Settings, topic: str) -> str:
    """The broker's id of this incarnation of the topic ("" when the broker does not say)."""
    return kafka_admin.topic_id(settings.effective_kafka_bootstrap, topic, "recsys-stream-admin")
