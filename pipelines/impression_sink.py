"""The impressions sink (``recsys stream impressions``): a consumer of ``recommendations.served`` that
writes the offline ``impressions`` table in batches and commits the offsets after each write.

Exactly once in effect, from the topic to the table: a batch's files are named by partition and
offset range (:func:`pipelines.impressions.write_batch`), and on assignment the sink reads from
the committed offset but skips what the table already holds (its last offset per partition), so a
crash between a write and its commit neither loses nor repeats a message. (kafka-python runs the
rebalance callbacks on its network thread, where no blocking consumer call may run: hence a skip
rather than a seek, and a write without a commit when partitions are revoked.) A message the producer
sent twice (two offsets) is two rows: :func:`pipelines.impressions.read_impressions` keeps one per
request_id.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pipelines.impressions import decode_impression, impressions_path, incarnation_tag, recover, write_batch, \
    written_offsets
from pipelines.kafka_admin import topic_id
from recsys.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SinkOptions:
    group_id: str = "recsys-impressions"
    batch_rows: int = 10_000
    flush_s: float = 10.0
    poll_ms: int = 500
    stop_when_caught_up: bool = False
    metrics_port: int | None = None
    #: a group joins in seconds with these instead of the defaults' tens of seconds
    session_timeout_ms: int = 6_000
    heartbeat_interval_ms: int = 1_000

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SinkOptions:
        """The settings' values, with the non-None ``overrides`` on top."""
        base = cls(group_id=settings.impressions_group_id, batch_rows=settings.impressions_batch_rows,
                   flush_s=settings.impressions_flush_s)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class SinkStats:
    """The totals of one :meth:`ImpressionSink.run`."""

    messages: int = 0
    rows: int = 0
    rejected: int = 0
    writes: int = 0
    commits: int = 0


class ImpressionSink:
    """One member of the sink's consumer group: ``run()`` until ``request_stop()`` (or caught up)."""

    def __init__(self, settings: Settings, options: SinkOptions | None = None) -> None:
        self.settings = settings
        self.options = options or SinkOptions.from_settings(settings)
        self.topic = settings.impressions_topic
        self.root = impressions_path(settings.dataset_path)
        self.stats = SinkStats()
        self._stop = threading.Event()
        self._pending: dict[int, list[Any]] = {}  # partition -> records not yet written
        self._first_pending = 0.0
        #: per partition, the last offset the table already holds (set on assignment)
        self._skip: dict[int, int] = {}
        self.consumer: Any = None
        self.tag = "0"
        self._server: Any = None

    def request_stop(self, *_: object) -> None:
        """Write what is pending, commit and return from ``run`` (safe in a signal handler)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> SinkStats:
        """Consume until stopped; always writes and commits what it read before returning."""
        self._open()
        try:
            while not self._stop.is_set():
                batch = self.consumer.poll(timeout_ms=self.options.poll_ms, max_records=self.options.batch_rows)
                for tp, records in batch.items():
                    skip = self._skip.get(tp.partition)
                    if skip is not None and records[0].offset <= skip:
                        records = [r for r in records if r.offset > skip]
                        if not records:
                            continue
                    if not self._pending:
                        self._first_pending = time.monotonic()
                    self._pending.setdefault(tp.partition, []).extend(records)
                    self.stats.messages += len(records)
                waiting = sum(len(r) for r in self._pending.values())
                if waiting and (waiting >= self.options.batch_rows
                                or time.monotonic() - self._first_pending >= self.options.flush_s):
                    self._write(list(self._pending))
                if not batch and self.options.stop_when_caught_up and self._caught_up():
                    log.info("impressions sink caught up: stopping")
                    break
        finally:
            self._close()
        return self.stats

    # ---- internals ----------------------------------------------------------------------------

    def _open(self) -> None:
        from kafka import KafkaConsumer

        from pipelines.stack import ensure_topics

        s = self.settings
        ensure_topics(s)
        self.tag = incarnation_tag(topic_id(s.effective_kafka_bootstrap, self.topic, "recsys-impressions-admin"))
        recover(self.root)
        if self.options.metrics_port is not None:
            from prometheus_client import start_http_server

            # the default registry: the sink's counters
            self._server = start_http_server(self.options.metrics_port)[0]
        self.consumer = KafkaConsumer(
            bootstrap_servers=s.effective_kafka_bootstrap, group_id=self.options.group_id,
            client_id=f"{self.options.group_id}-sink", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=self.options.session_timeout_ms,
            heartbeat_interval_ms=self.options.heartbeat_interval_ms)
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        log.info("impressions sink topic=%s group=%s table=%s", self.topic, self.options.group_id, self.root)

    def _close(self) -> None:
        try:
            if self._pending:
                self._write(list(self._pending))
        finally:
            self.consumer.close(autocommit=False)
            if self._server is not None:
                self._server.shutdown()
            log.info("impressions sink stopped messages=%d rows=%d rejected=%d writes=%d", self.stats.messages,
                     self.stats.rows, self.stats.rejected, self.stats.writes)

    def _caught_up(self) -> bool:
        assigned = list(self.consumer.assignment())
        if not assigned:
            return False
        ends = self.consumer.end_offsets(assigned)
        return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)

    def _write(self, partitions: Iterable[int]) -> None:
        """Write the pending records of ``partitions`` (one file set each), then commit their offsets."""
        self._commit(self._write_files(partitions))

    def _write_files(self, partitions: Iterable[int]) -> dict[int, int]:
        """The table's side of :meth:`_write`; returns the offsets to commit per partition."""
        offsets = {}
        for p in partitions:
            records = self._pending.pop(p, [])
            if not records:
                continue
            rows = []
            for r in records:
                try:
                    rows.append(decode_impression(r.value))
                except ValueError as exc:  # never stop the sink for one bad message: log it, count it
                    self.stats.rejected += 1
                    _metrics().rejected.inc()
                    log.warning("impressions: skipped offset %d of partition %d: %s", r.offset, p, exc)
            self.stats.rows += write_batch(self.root, self.tag, p, records[0].offset, records[-1].offset, rows)
            _metrics().rows.inc(len(rows))
            self.stats.writes += 1
            offsets[p] = records[-1].offset + 1
            log.info("impressions: wrote %d rows of partition %d, offsets %d..%d", len(rows), p, records[0].offset,
                     records[-1].offset)
        return offsets

    def _commit(self, offsets: dict[int, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if offsets:
            self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                                  for p, o in offsets.items()})
            self.stats.commits += 1

    def on_revoked(self, revoked: Iterable[Any]) -> None:
        """Write what was read from partitions this member is losing; their next owner skips it."""
        self._write_files([tp.partition for tp in revoked if tp.partition in self._pending])

    def on_assigned(self, assigned: Iterable[Any]) -> None:
        """Skip, in each partition, the offsets the table already holds (a crash between a write
        and its commit, or a previous owner that wrote on revocation)."""
        in_table = written_offsets(self.root, self.tag)
        self._skip = {tp.partition: in_table[tp.partition] for tp in assigned if tp.partition in in_table}


def _Listener(sink: ImpressionSink) -> Any:  # noqa: N802 - a factory that reads as the class it returns
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            sink.on_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            sink.on_assigned(assigned)

    return Listener()


class _SinkMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter

        self.rows = Counter("recsys_impressions_sink_rows", "Impressions written to the offline table.")
        self.rejected = Counter("recsys_impressions_sink_rejected", "Messages of the topic that did not decode.")


_METRICS: list[_SinkMetrics] = []


def _metrics() -> _SinkMetrics:
    """The sink's counters in the default registry, made once per process on first use."""
    if not _METRICS:
        _METRICS.append(_SinkMetrics())
    return _METRICS[0]


def run_impression_sink(settings: Settings, **overrides: Any) -> SinkStats:
    """Run one sink member until SIGTERM/SIGINT (or caught up, with ``stop_when_caught_up=True``):
    the entry point of ``recsys stream impressions`` and of a managed process."""
    sink = ImpressionSink(settings, SinkOptions.from_settings(settings, **overrides))
    if threading.current_thread() is threading.main_thread():
        sink.install_signal_handlers()
    return sink.run()
