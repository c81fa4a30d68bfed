"""A consumer group's lag as Kafka records it: per partition, the end of the log minus the group's
committed offset (the start of the log where the group has committed nothing).

The stream commits an offset only once the offline append covers it, so this lag counts the
events not yet durable on both sides (online and offline), and it is the group's whole figure
whichever worker owns a partition, whether the workers run or not.

The end of the log is the high watermark of a fetch, not a ListOffsets answer: the Tansu broker of
the local stack answers ListOffsets(latest) with the last record batch's base offset + 1 (one for
a batch of three records), while its fetch responses carry the right high watermark, as Kafka's do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pipelines.stack.health import tcp_open

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupLag:
    """Per partition of ``topic``: events after the group's committed offset."""

    group: str
    topic: str
    partitions: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.partitions.values())


def group_lag(bootstrap: str, group: str, topic: str, timeout_s: float = 5.0) -> GroupLag | None:
    """The lag of ``group`` on ``topic``; None when Kafka cannot say (unreachable, no such topic)."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.errors import KafkaError

    if not tcp_open(bootstrap):  # a client would retry its bootstrap for half a minute
        return None
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="recsys-lag",
                                 request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError, ValueError):
        log.debug("Kafka at %s unreachable for the lag", bootstrap, exc_info=True)
        return None
    try:
        described = admin.describe_topics([topic])
        parts = [TopicPartition(topic, p["partition_index"]) for d in described for p in d.get("partitions") or []]
        committed = admin.list_group_offsets({group: parts}).get(group, {}) if parts else {}
        ends = _high_watermarks(bootstrap, parts, committed, timeout_s) if parts else {}
    except (KafkaError, OSError, ValueError):
        log.debug("could not read the offsets of group %s on %s", group, topic, exc_info=True)
        return None
    finally:
        admin.close()
    if not parts or len(ends) < len(parts):
        return None
    lag = {}
    for tp in parts:
        done = committed.get(tp)
        base = done.offset if done is not None and done.offset is not None and done.offset >= 0 else 0
        lag[tp.partition] = max(ends[tp] - base, 0)
    return GroupLag(group, topic, dict(sorted(lag.items())))


def _high_watermarks(bootstrap: str, parts: list[Any], committed: dict[Any, Any], timeout_s: float) -> dict[Any, int]:
    """Each partition's high watermark, from one fetch at the group's committed offset (no group joined)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             client_id="recsys-lag", auto_offset_reset="earliest",
                             max_partition_fetch_bytes=1024)  # the watermark, not the records
    try:
        consumer.assign(parts)
        for tp in parts:
            done = committed.get(tp)
            if done is not None and done.offset is not None and done.offset >= 0:
                consumer.seek(tp, done.offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in parts):
            consumer.poll(timeout_ms=100, max_records=1, update_offsets=False)
        return {tp: hw for tp in parts if (hw := consumer.highwater(tp)) is not None}
    finally:
        consumer.close(autocommit=False)
