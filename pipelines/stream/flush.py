"""The offline append of the outboxes: the flush process (:func:`flush_outboxes`: the applied events to
the dataset's events table, the rows to the user_realtime table) and, in the consumer, when to flush
and which offsets each flush makes safe to commit (:class:`OfflineFlusher`)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from pipelines.live_log import append_live_events
from pipelines.stream.metrics import StreamMetrics, StreamStats
from pipelines.stream.online_writer import rows_frame
from pipelines.stream.options import StreamOptions
from pipelines.stream.retry import retry_io
from pipelines.stream.state import Outbox, StateStore
from recsys.config import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineFlush:
    """One finished flush: its partitions, the offsets now safe to commit, the rows and the
    canonical events appended."""

    partitions: list[int]
    offsets: dict[int, int]  # per partition, the offset now safe to commit
    rows: int
    seconds: float
    events: int = 0


# ---- in the flush process -------------------------------------------------------------------------

#: the flush process's feature store, made on its first flush (Spark starts once per process)
_FLUSH_STORES: dict[str, FeatureStore] = {}
#: a flush retries a down Redis or Spark this long, then fails (the consumer then stops uncommitted)
FLUSH_RETRY_S = 300.0


def flush_outboxes(settings: Settings, topic: str, topic_id: str, partitions: list[int]) -> OfflineFlush:
    """Append the outboxes of ``partitions`` offline: their events to the dataset's events table
    (:func:`append_outbox_events`), their rows to the user_realtime table through the push source;
    then trim them. Runs in the consumer's flush process. Returns the offsets safe to commit."""
    from pipelines.feature_store import get_store, push_user_realtime

    started = time.perf_counter()
    state = StateStore(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project, topic, topic_id)
    outboxes = {p: state.read_outbox(p) for p in partitions}
    deadline = time.monotonic() + FLUSH_RETRY_S
    events = append_outbox_events(settings, topic, topic_id, outboxes, lambda: time.monotonic() > deadline)
    rows = [row for box in outboxes.values() for row in box.rows]
    if rows:
        store = _FLUSH_STORES.get(settings.feast_project)
        if store is None:
            store = _FLUSH_STORES[settings.feast_project] = get_store(settings)
        retry_io("offline append", lambda: push_user_realtime(store, rows_frame(rows), online=False, offline=True),
                 lambda: time.monotonic() > deadline)
    state.trim_outbox({p: box.entries for p, box in outboxes.items() if box.entries})
    safe = {p: box.last + 1 for p, box in outboxes.items() if box.entries and box.last is not None}
    return OfflineFlush(partitions, safe, len(rows), time.perf_counter() - started, events)


def events_file_key(topic: str, topic_id: str, partition: int, outbox: Outbox) -> str:
    """The name (after ``live-<date>-``) of the files that hold an outbox's events: the topic, the
    partition, the first offset the entries cover, and a digest of the topic's id and the first
    event (a recreated topic restarts its offsets: the digest keeps its names apart).

    A flush that crashed after writing its files but before trimming the outbox left the same
    entries at its head; the next flush reads them (and perhaps more), so it derives the same key
    and rewrites the same files, whole, with a superset of their rows: no event is logged twice.
    """
    digest = hashlib.sha1(f"{topic_id}\n{outbox.events[0]}".encode()).hexdigest()[:10]
    first = outbox.first if outbox.first is not None else 0
    return f"{topic}-p{partition}-o{first:012d}-{digest}"


def append_outbox_events(settings: Settings, topic: str, topic_id: str, outboxes: dict[int, Outbox],
                         give_up: Callable[[], bool] = lambda: False) -> int:
    """Write the outboxes' applied events to the dataset's events table (one file per partition and
    date, :func:`events_file_key`); returns the events written. Retries I/O errors until ``give_up``."""
    written = 0
    for partition, box in sorted(outboxes.items()):
        if box.events:
            key = events_file_key(topic, topic_id, partition, box)
            written += retry_io("offline event log",
                                lambda: append_live_events(settings.dataset_path, box.events, key), give_up)
    return written


def _exit_with_parent(parent_pid: int) -> None:
    """Flush-process initializer: exit when the consumer is gone (a SIGKILL leaves no orphan)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


# ---- in the consumer ------------------------------------------------------------------------------


class OfflineFlusher:
    """Runs :func:`flush_outboxes` in a separate process, one flush at a time, every
    ``offline_flush_s`` or ``offline_batch_rows``, and returns the offsets each finished flush makes
    safe to commit (the consumer commits them).

    The append runs in its own process: Spark's start-up and the pandas -> Spark conversion of a
    large batch hold the GIL of the process that runs them, which delayed the consumer's online
    writes (freshness) while they ran.
    """

    def __init__(self, settings: Settings, topic: str, options: StreamOptions, stats: StreamStats,
                 metrics: StreamMetrics) -> None:
        self.settings = settings
        self.topic = topic
        self.options = options
        self.stats = stats
        self.metrics = metrics
        #: the id of the topic's incarnation (the outboxes' watermark key), known once the consumer opens
        self.topic_id = ""
        self._pool: ProcessPoolExecutor | None = None
        self._running: Future[OfflineFlush] | None = None
        self._pending_rows = 0
        self._due = False
        self._last = time.monotonic()

    def add_rows(self, n_rows: int) -> None:
        """A batch appended ``n_rows`` to the outboxes."""
        self._pending_rows += n_rows
        self._due = True

    def add_events(self, n_events: int) -> None:
        """A batch appended ``n_events`` applied events to the outboxes (they count as rows do)."""
        self._pending_rows += n_events

    def add_backlog(self) -> None:
        """Outbox entries left by a previous owner: flush them at the next chance."""
        self._due = True
        self._pending_rows = self.options.offline_batch_rows

    def maybe_start(self, partitions: Callable[[], list[int]], now: float) -> None:
        """Start a flush of the ``partitions()`` if none runs and one is due (enough rows or time)."""
        if self._running is None and self._due and (
            self._pending_rows >= self.options.offline_batch_rows or now - self._last >= self.options.offline_flush_s
        ):
            self._running = self._submit(partitions())
            self._pending_rows = 0
            self._due = False
            self._last = time.monotonic()

    def collect(self) -> dict[int, int]:
        """The offsets made safe by the running flush if it has finished, else nothing."""
        if self._running is not None and self._running.done():
            return self.finish()
        return {}

    def finish(self) -> dict[int, int]:
        """Wait for the running flush (if any); returns the offsets it made safe to commit."""
        if self._running is None:
            return {}
        future, self._running = self._running, None
        return self._account(future.result())

    def flush_now(self, partitions: list[int]) -> dict[int, int]:
        """Append the outboxes of ``partitions`` offline now; returns the offsets safe to commit."""
        return self._account(self._submit(partitions).result())

    def shutdown(self) -> None:
        """Stop the flush process; the next flush starts a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _submit(self, partitions: list[int]) -> Future[OfflineFlush]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._pool.submit(flush_outboxes, self.settings, self.topic, self.topic_id, partitions)

    def _account(self, done: OfflineFlush) -> dict[int, int]:
        if done.rows or done.events:
            self.metrics.push_seconds.labels("offline").observe(done.seconds)
            self.stats.rows_offline += done.rows
            self.stats.events_offline += done.events
            log.info("offline append rows=%d events=%d partitions=%s", done.rows, done.events, done.partitions)
        return done.offsets
