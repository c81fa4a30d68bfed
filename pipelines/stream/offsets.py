"""The consumer's side of Kafka bookkeeping: its partitions, offset commits, lag, and the rebalance
listener that hands partition changes to the consumer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipelines.stream.dead_letters import DeadLetters
from pipelines.stream.metrics import StreamMetrics, StreamStats

log = logging.getLogger(__name__)


class OffsetKeeper:
    """Commits offsets (after their dead letters), reports lag and throughput, and answers what the
    consumer owns and whether it has caught up."""

    def __init__(self, consumer: Any, topic: str, dlq: DeadLetters, stats: StreamStats, metrics: StreamMetrics) -> None:
        self.consumer = consumer
        self.topic = topic
        self.dlq = dlq
        self.stats = stats
        self.metrics = metrics
        self._last_report = (time.monotonic(), stats.events)  # (when, events then): the rate's start

    def partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())

    def caught_up(self) -> bool:
        assigned = list(self.consumer.assignment())
        if not assigned:
            return False
        ends = self.consumer.end_offsets(assigned)
        return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)

    def commit(self, offsets: dict[int, int], wait: bool = True) -> None:
        """Commit after the dead letters of those offsets are safely in their topic. ``wait=False``
        for a rebalance listener: kafka-python 3 runs it on the consumer's IO thread, where a blocking
        commit raises (and the error stops the consumer), so the commit is queued, ahead of the
        JoinGroup that follows the listener; if it fails, the partitions' next owner re-reads those
        offsets and skips the events already applied (the state's applied-offset watermark)."""
        if not offsets:
            return
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        self.dlq.flush()
        request = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        if not wait:
            self.consumer.commit_async(request, callback=lambda _, result: self._queued_done(offsets, result))
            return
        self.consumer.commit(request)
        self._committed(offsets)

    def _committed(self, offsets: dict[int, int]) -> None:
        self.stats.commits += 1
        for p, o in offsets.items():
            self.metrics.committed.labels(str(p)).set(o)

    def _queued_done(self, offsets: dict[int, int], result: Any) -> None:
        if isinstance(result, BaseException):
            log.warning("commit of %s at a rebalance failed (%s): their next owner re-reads them and skips "
                        "the events already applied", offsets, result)
        else:
            self._committed(offsets)

    def update_lag(self) -> None:
        t, n = self._last_report
        now = time.monotonic()
        rate = (self.stats.events - n) / max(now - t, 1e-9)
        self.metrics.events_per_s.set(rate)
        lags = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                lags[tp.partition] = max(high - self.consumer.position(tp), 0)
                self.metrics.lag.labels(str(tp.partition)).set(lags[tp.partition])
        if now - t >= 10.0:
            log.info("stream events=%d events_per_s=%.0f applied=%d duplicates=%d late=%d dead_letters=%d lag=%s",
                     self.stats.events, rate, self.stats.applied, self.stats.duplicates, self.stats.late,
                     self.stats.dead_letters, lags)
            self._last_report = (now, self.stats.events)


def rebalance_listener(on_revoked: Callable[[Iterable[Any]], None], on_assigned: Callable[[Iterable[Any]], None]) -> Any:
    """A kafka-python rebalance listener that calls ``on_revoked`` and ``on_assigned`` with the partitions."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            on_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            on_assigned(assigned)

    return Listener()
