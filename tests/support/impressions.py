"""Impressions for tests: put some on a topic (as the service would), and run the sink once to the
end of its topic into a table of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from kafka import KafkaProducer

from pipelines.impression_sink import ImpressionSink, SinkOptions, SinkStats
from pipelines.impressions import impression_message, impressions_path
from pipelines.stack import ensure_topics
from recsys.config import Settings

#: 2026-01-04 23:59:59 UTC: one second before midnight, so a second impression lands on the next date
LATE_EVENING = 1767571199.0


def produce_impressions(settings: Settings, answers: Sequence[tuple[str, int, float, list[int]]]) -> None:
    """Send (request_id, user_id, served_at epoch s, item ids) answers to the impressions topic;
    scores count down from 0.9 in steps of 0.1, strategies alternate als / trending."""
    producer = KafkaProducer(bootstrap_servers=settings.effective_kafka_bootstrap, acks=1)
    try:
        for request_id, user, served_at, items in answers:
            shown = [{"item_id": i, "score": round(0.9 - 0.1 * n, 6), "strategy": "als" if n % 2 == 0 else "trending"}
                     for n, i in enumerate(items)]
            key, value = impression_message(request_id, user, served_at, shown, {"index": "item_index:t"},
                                            cold_start=False, cached=False, degraded=False)
            producer.send(settings.impressions_topic, key=key, value=value)
        producer.flush(10)
    finally:
        producer.close()


def sink_settings(stack: Settings, tmp: Path) -> Settings:
    """The stack's endpoints, a fresh one-partition impressions topic (created: a producer would
    auto-create it with the broker's default partitions), and a data folder of the test's."""
    settings = stack.with_overrides(impressions_topic=f"served-{uuid.uuid4().hex[:8]}", impressions_partitions=1,
                                    data_dir=tmp / "data")
    ensure_topics(settings)
    return settings


def run_sink_once(settings: Settings, group_id: str, sink_class: type[ImpressionSink] = ImpressionSink) -> SinkStats:
    """One sink member until it has read its topic to the end (then it writes and commits)."""
    options = SinkOptions.from_settings(settings, group_id=group_id, stop_when_caught_up=True, poll_ms=200)
    return sink_class(settings, options).run()


def table_root(settings: Settings) -> Path:
    return impressions_path(settings.dataset_path)
