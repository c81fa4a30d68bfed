"""The stream consumer (:class:`StreamProcessor`): polls Kafka, folds each micro-batch into the users'
states and online rows in one transaction, and commits offsets once the offline append covers them."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import redis

from pipelines import trending
from pipelines.canonical import UNKNOWN_ITEM_REASON
from pipelines.events import decode_batch
from pipelines.realtime_rules import LATE_REASON
from pipelines.stream.catalogue import ItemCatalogue
from pipelines.stream.dead_letters import DeadLetters
from pipelines.stream.flush import OfflineFlusher
from pipelines.stream.fold import BatchFolder, FoldedBatch, events_by_partition, group_by_user, rows_by_partition
from pipelines.stream.metrics import StreamMetrics, StreamStats, observe_many, reason_label
from pipelines.stream.offsets import OffsetKeeper, rebalance_listener
from pipelines.stream.online_writer import OnlineRowWriter
from pipelines.stream.options import StreamOptions, topic_id
from pipelines.stream.retry import retry_io
from pipelines.stream.state import StateCache, StateStore
from pipelines.stream.transaction import BatchWrite, commit_batch
from recsys.config import Settings

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class StreamProcessor:
    """One consumer-group member: ``run()`` until ``request_stop()`` (or caught up, if asked)."""

    def __init__(self, settings: Settings, options: StreamOptions | None = None) -> None:
        self.settings = settings
        self.options = options or StreamOptions.from_settings(settings)
        self.topic = settings.events_topic
        self.stats = StreamStats()
        self.metrics = StreamMetrics()
        self._stop = threading.Event()
        #: set once the group has assigned partitions to this consumer
        self.assigned = threading.Event()
        self.flusher = OfflineFlusher(settings, self.topic, self.options, self.stats, self.metrics)
        self.folder = BatchFolder(self.options.window, self.options.trending, self.options.purchased_max,
                                  self.options.activity_retention_s)
        self.cache = StateCache(self.options.state_cache_users)
        self._trending_dirty = False
        self._last_publish = 0.0
        self._last_lag = 0.0
        self.consumer: Any = None

    # ---- life cycle -------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Finish the current batch, flush, commit and return from ``run`` (safe in a signal handler)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> StreamStats:
        """Consume until stopped; always flushes and commits what was processed before returning."""
        started = time.monotonic()
        self._open()
        try:
            while not self._stop.is_set():
                batch = self.consumer.poll(timeout_ms=self.options.batch_ms, max_records=self.options.batch_events)
                if batch:
                    self._process(batch)
                elif self.options.stop_when_caught_up and self.offsets.caught_up():
                    log.info("stream caught up with every assigned partition: stopping")
                    break
                self._housekeeping()
        finally:
            self._close()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _open(self) -> None:
        from pipelines.feature_store import check_online_store, get_store
        from pipelines.stack import ensure_topics

        s = self.settings
        self.cache.clear()
        check_online_store(s)
        ensure_topics(s)
        self.catalogue = ItemCatalogue(s.dataset_path, min_reload_s=self.options.catalogue_reload_s)
        self.redis = redis.Redis.from_url(s.effective_redis_url)
        self.state = StateStore(self.redis, s.feast_project, self.topic, topic_id(s, self.topic))
        self.flusher.topic_id = self.state.topic_id
        self.online = OnlineRowWriter(get_store(s, skip_dedup=True))
        self.dlq = DeadLetters(s.effective_kafka_bootstrap, s.dlq_topic)
        self._server = self.metrics.serve(self.options.metrics_port) if self.options.metrics_port is not None else None
        self.consumer = kafka_consumer(s, self.options)
        self.offsets = OffsetKeeper(self.consumer, self.topic, self.dlq, self.stats, self.metrics)
        self.consumer.subscribe([self.topic], listener=rebalance_listener(self.on_revoked, self.on_assigned))
        log.info("stream consuming topic=%s group=%s redis=%s", self.topic, self.options.group_id,
                 s.effective_redis_url)

    def _close(self) -> None:
        try:
            self.offsets.commit(self.flusher.finish())
            if self.consumer.assignment():
                self.offsets.commit(self.flusher.flush_now(self.offsets.partitions()))
            if self._trending_dirty and self.folder.watermark_us is not None:
                trending.publish(self.redis, self.folder.watermark_us, self.options.trending)
        finally:
            self.consumer.close(autocommit=False)  # may still revoke partitions, which flushes them
            self.flusher.shutdown()  # a later run() starts a new flush process
            self.dlq.close()
            if self._server is not None:
                self._server.shutdown()
            log.info("stream stopped events=%d applied=%d duplicates=%d late=%d dead_letters=%d commits=%d",
                     self.stats.events, self.stats.applied, self.stats.duplicates, self.stats.late,
                     self.stats.dead_letters, self.stats.commits)

    # ---- one micro-batch ------------------------------------------------------------------

    def _process(self, batch: dict[Any, list[ConsumerRecord]]) -> None:
        batch, skipped = self.state.skip_applied(batch)
        if skipped:
            self.stats.duplicates += skipped
            self.metrics.events.labels("duplicate").inc(skipped)
        if not batch:
            return
        records = [r for recs in batch.values() for r in recs]
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.monotonic()
        now = time.time()
        max_ts = pd.Timestamp(now + self.options.max_future_s, unit="s", tz="UTC")
        self.catalogue.maybe_reload()
        decoded = decode_batch([r.value for r in records], self.catalogue.known_items, max_ts)
        unknown_items = any(reason.startswith(UNKNOWN_ITEM_REASON) for _, reason in decoded.rejected)
        if unknown_items and self.catalogue.reload_now():
            # items added while streaming (POST /items appends them to the table): a new catalogue
            # may know them, so judge the batch again before dead-lettering its events
            decoded = decode_batch([r.value for r in records], self.catalogue.known_items, max_ts)
        dead: list[tuple[ConsumerRecord, str]] = [(records[i], reason) for i, reason in decoded.rejected]

        index = decoded.index.tolist()
        groups, misrouted = group_by_user(records, decoded, index)
        dead.extend(misrouted)
        users = list(groups)
        states = self.cache.take(users, self.state)
        folded = self.folder.fold(decoded, groups, states, self.catalogue)
        self._count(folded)
        dead.extend((records[index[j]], LATE_REASON) for j in folded.late)
        rows = rows_by_partition(batch, records, index, groups, folded.changed, int(now * 1_000_000))
        events = events_by_partition(batch, records, index, folded.applied_at)

        for record, reason in dead:
            self.dlq.send(record, reason)
            self.metrics.dead_letters.labels(reason_label(reason)).inc()
        n_rows = self._write(BatchWrite(batch, folded.changed, rows, users, folded.counts,
                                        purchased=folded.purchased, activity=folded.activity,
                                        events_by_partition=events))
        self.cache.remember(states)
        self._account(records, len(dead), n_rows, time.time())
        self.flusher.add_events(sum(len(e) for e in events.values()))
        self.stats.last_batch_at = time.monotonic()

    def _write(self, write: BatchWrite) -> int:
        """The batch's online rows and state transaction (retried until done); returns the rows written."""
        rows = [row for part in write.rows_by_partition.values() for row in part]
        write.online = self.online.mappings(rows) if rows and self.online.in_transaction else None
        if rows and write.online is None:
            self._timed("online", lambda: self._retry("online push", lambda: self.online.write(rows)))

        def commit() -> None:
            self._retry("state transaction",
                        lambda: commit_batch(self.redis, self.state, self.online, write, self.options.trending,
                                             self.options.activity_retention_s))
            if write.counts:
                self._trending_dirty = True

        if write.online:
            self._timed("online", commit)  # the online write is part of the transaction
        else:
            commit()
        return len(rows)

    def _count(self, folded: FoldedBatch) -> None:
        st, events = self.stats, self.metrics.events
        st.applied += folded.applied
        st.duplicates += folded.duplicates
        st.late += len(folded.late)
        events.labels("applied").inc(folded.applied)
        events.labels("duplicate").inc(folded.duplicates)
        events.labels("late").inc(len(folded.late))

    def _account(self, records: list[ConsumerRecord], n_dead: int, n_rows: int, visible_at: float) -> None:
        st = self.stats
        st.batches += 1
        st.events += len(records)
        st.dead_letters += n_dead
        st.rows_online += n_rows
        self.flusher.add_rows(n_rows)
        created = np.fromiter((r.timestamp for r in records), dtype=np.float64, count=len(records))
        fresh_ms = visible_at * 1000.0 - created
        if self.options.record_freshness:
            st.freshness_ms.append(fresh_ms)
        observe_many(self.metrics.freshness, fresh_ms / 1000.0)
        self.metrics.events.labels("dead_letter").inc(n_dead)

    # ---- housekeeping: offline flush, commit, trending, lag -----------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.offsets.commit(self.flusher.collect())
        self.flusher.maybe_start(self.offsets.partitions, now)
        if self._trending_dirty and now - self._last_publish >= self.options.trending_publish_s:
            trending.publish(self.redis, self.folder.watermark_us or 0, self.options.trending)
            self._trending_dirty = False
            self._last_publish = now
        if now - self._last_lag >= 2.0:
            self.offsets.update_lag()
            self._last_lag = now

    # ---- rebalancing ---------------------------------------------------------------------------

    def on_revoked(self, partitions: Iterable[Any]) -> None:
        """Before giving partitions away: append their outboxes and commit, so the next owner starts
        exactly where this one stopped. The commits are queued (``wait=False``): this runs on the
        Kafka client's IO thread."""
        self.offsets.commit(self.flusher.finish(), wait=False)
        self.cache.clear()
        revoked = sorted(tp.partition for tp in partitions)
        if revoked:
            self.offsets.commit(self.flusher.flush_now(revoked), wait=False)

    def on_assigned(self, partitions: Iterable[Any]) -> None:
        """A previous owner may have left outbox entries (it crashed): append them soon. Another
        consumer may have written states of these partitions meanwhile: forget the cached ones."""
        self.cache.clear()
        if self.state.outbox_size(tp.partition for tp in partitions):
            self.flusher.add_backlog()
        self.assigned.set()

    # ---- helpers --------------------------------------------------------------------------------

    def _timed(self, store: str, action: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        result = action()
        self.metrics.push_seconds.labels(store).observe(time.perf_counter() - started)
        return result

    def _retry(self, what: str, action: Callable[[], _T]) -> _T:
        return retry_io(what, action, self._stop.is_set)


def kafka_consumer(settings: Settings, options: StreamOptions) -> Any:
    """The group member's KafkaConsumer: manual commits, batches of ``batch_events``."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=settings.effective_kafka_bootstrap,
        group_id=options.group_id,
        client_id=f"{options.group_id}-consumer",
        enable_auto_commit=False,  # offsets are committed only after the offline append
        auto_offset_reset="earliest",
        max_poll_records=options.batch_events,
        fetch_max_wait_ms=options.batch_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        # the broker checked the CRC on produce and TCP checks the transfer; checking again in
        # pure Python was the largest share of the consumer's CPU
        check_crcs=False,
        session_timeout_ms=options.session_timeout_ms,
        heartbeat_interval_ms=options.heartbeat_interval_ms,
    )
