"""The clickstream consumer (``recsys stream run``): Kafka -> real-time user features, exactly once
in effect.

One micro-batch (up to ``batch_events`` events or ``batch_ms`` of waiting):

1. decode and validate every message (:func:`pipelines.events.decode_batch`); bad ones go to the
   dead-letter topic with the reason and the original bytes;
2. load the users' fold states from Redis (one MGET) and fold the events with the one
   implementation of the rules (:mod:`pipelines.realtime_rules`), skipping event ids already in the
   state's dedupe window; events older than the window go to the dead-letter topic as late;
3. in one Redis transaction (one round trip): the users' new rows in the online store, written
   as Feast's Redis store writes them (:class:`OnlineRowWriter` says how, and why not
   ``FeatureStore.push``), the new states, the batch's rows appended to the partition's *outbox*,
   the partition's applied-offset watermark, ``recs:{user_id}`` deleted for every user with an
   event, and the trending counts.

In the background, every ``offline_flush_s`` or ``offline_batch_rows``, the outboxes are appended
to the offline store through the same push source (a Spark job, so in large batches, run by a
separate flush process so that it never holds the consumer's GIL) and trimmed;
only then are the Kafka offsets that those outbox entries cover committed (after the dead letters
are flushed). So a committed offset always means: online written, offline appended.

Where the state lives, and why a crash is harmless: each user's fold state (features, their hidden
inputs such as category counts, and the ids of recent events) is one Redis value,
``rt:{project}:u:{user_id}``, written in the same transaction as the outbox. After a SIGKILL the
consumer restarts from the last committed offsets: the outbox entries still waiting are appended
offline first, and the redelivered events are skipped by the per-partition applied-offset
watermark stored in the same transaction (event ids catch replays of the same events at new
offsets). The online rows change in that same transaction, so the online store never shows a
row that the state has not recorded, nor the other way round. (Where Feast is configured for a
Redis cluster or sentinel, Feast writes the rows itself just before the transaction; a crash in
between redelivers events that the state has not seen: they are folded again into the same rows
and written again.) The offline append is at least once: a crash
between the append and the outbox trim appends identical rows (same event_timestamp and created)
a second time, which point-in-time joins read as one.

Partition ownership makes the consumer the single writer of its users' states (events are keyed by
user); a message whose key is not its user_id would break that, so it is dead-lettered.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
import redis

from recsys.arrays import positions
from pipelines import trending
from pipelines.events import decode_batch
from pipelines.realtime_rules import LATE_REASON, DedupeWindow, Event, Outcome, UserState
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.schema import recs_cache_key

if TYPE_CHECKING:
    from feast import FeatureStore
    from kafka.consumer.fetcher import ConsumerRecord

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_TRENDING = frozenset(trending.TRENDING_TYPES)


def _topic_id(settings: Settings, topic: str) -> str:
    """The broker's id of this incarnation of the topic ("" when the broker does not say)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.effective_kafka_bootstrap, client_id="recsys-stream-admin")
    try:
        described = admin.describe_topics([topic])
        return str(described[0].get("topic_id") or "") if described else ""
    except Exception:  # noqa: BLE001 - an old broker without topic ids: the watermark key stays generic
        log.warning("could not read the topic id of %s", topic, exc_info=True)
        return ""
    finally:
        admin.close()


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
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---- the item catalogue (item -> category) ---------------------------------------------------------


class ItemCatalogue:
    """Known item ids and their categories, from the canonical items table; reloaded when the table
    changes (checked at most every ``refresh_s``), so new items are picked up without a restart."""

    def __init__(self, dataset_path: Path, refresh_s: float = 300.0) -> None:
        self.path = Path(dataset_path) / "items"
        self.refresh_s = refresh_s
        self._stamp: float | None = None
        self._checked = 0.0
        self.known_items = np.empty(0, dtype=np.int64)
        self._categories = np.empty(0, dtype=np.int64)
        self.maybe_reload(force=True)

    def _mtime(self) -> float:
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"no items table at {self.path}: run `recsys data generate` or `recsys data load PATH` first")
        return max((p.stat().st_mtime for p in self.path.glob("*.parquet")), default=0.0)

    def maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return
        self._checked = now
        stamp = self._mtime()
        if stamp == self._stamp:
            return
        table = pq.read_table(self.path, columns=[S.COL_ITEM, S.COL_CATEGORY]).to_pandas()
        table = table.sort_values(S.COL_ITEM)
        self.known_items = table[S.COL_ITEM].to_numpy(dtype=np.int64)
        self._categories = table[S.COL_CATEGORY].to_numpy(dtype=np.int64)
        self._stamp = stamp
        log.info("item catalogue loaded items=%d", len(self.known_items))

    def categories(self, item_ids: np.ndarray) -> np.ndarray:
        """The category of each item; -1 for an item outside the catalogue."""
        pos, known = positions(self.known_items, item_ids)
        return np.where(known, self._categories[pos], -1) if len(self.known_items) else np.full(len(pos), -1)


# ---- the state kept in Redis --------------------------------------------------------------------------

#: A row of user_realtime as it travels through the outbox:
#: (user_id, last_us, last_5_items, interaction_count, total_purchases, preferred_categories, created_us)
Row = tuple[int, int, list[int], int, int, list[int], int]


def state_row(user_id: int, state: UserState, created_us: int) -> Row:
    return (user_id, state.last_us, state.last_5_items, state.count, state.purchases,
            state.preferred_categories, created_us)


def rows_frame(rows: Sequence[Row]) -> pd.DataFrame:
    """Outbox rows as the user_realtime push frame (event_timestamp = last_action_ts)."""
    cols: list[Sequence[Any]] = list(zip(*rows)) if rows else [() for _ in range(7)]
    last = pd.to_datetime(np.asarray(cols[1], dtype=np.int64), unit="us", utc=True)
    return pd.DataFrame({
        S.COL_USER: np.asarray(cols[0], dtype=np.int64),
        S.COL_TS: last,
        T.CREATED: pd.to_datetime(np.asarray(cols[6], dtype=np.int64), unit="us", utc=True),
        "last_5_items": list(cols[2]),
        "last_action_ts": last,
        "interaction_count": np.asarray(cols[3], dtype=np.int64),
        "total_purchases": np.asarray(cols[4], dtype=np.int64),
        "preferred_categories": list(cols[5]),
    })


class OnlineRowWriter:
    """Writes user_realtime rows into the online store exactly as Feast's Redis store does, on the
    stream's own Redis transaction.

    Feast's Redis layout for a row (``RedisOnlineStore.online_write_batch``): one hash per entity key
    (Feast's ``_redis_key``), fields ``mmh3("{view}:{feature}")`` -> the ``Value`` proto and
    ``_ts:{view}`` -> the event time as a ``Timestamp`` proto, then ``EXPIRE`` when the store has a
    key TTL. :meth:`queue` puts those commands on the consumer's state transaction, so the online
    rows, the fold states, the outbox and the applied offsets change together, in one round trip.
    The key and field names come from Feast's own helpers (checked against ``_redis_key`` for a few
    ids at start); only the values are built here, as the protos ``push`` builds for these types (the
    tests read them back with ``get_online_features``). ``FeatureStore.push`` converts a DataFrame
    through Arrow and re-reads the registry on every call, and Feast's writer builds its keys and
    protos through slower generic paths: at micro-batch sizes those were most of the consumer's time.

    Where the online store is not a plain Redis (a cluster or sentinel), :meth:`write` falls back to
    Feast's own ``online_write_batch`` (``get_store(skip_dedup=True)``: one round trip, no dropped
    same-instant write) before the state transaction.
    """

    def __init__(self, store: FeatureStore) -> None:
        import struct

        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.infra.online_stores.redis import _versioned_fv_name
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        from pipelines.online_features import int64_key_prefix
        from pipelines.realtime_rules import FEATURES

        self.store = store
        self.view = store.get_feature_view(T.USER_REALTIME)
        self.provider = store._get_provider()  # noqa: SLF001 - the store's own online writer (fallback)
        config = store.config
        online = config.online_store
        # the stream's Redis is the online store's (both come from REDIS_URL), unless Feast is told
        # to use a cluster or sentinel: then Feast writes, in its own round trip
        self.in_transaction = online.type == "redis" and online.redis_type == "redis"
        self.ttl_s = getattr(online, "key_ttl_seconds", None)
        name = _versioned_fv_name(self.view, config)
        self.ts_field = f"_ts:{name}".encode()
        self.fields = [_mmh3(f"{name}:{feature}") for feature in FEATURES]

        def feast_key(user: int) -> bytes:
            key = EntityKey(join_keys=[S.COL_USER], entity_values=[Value(int64_val=user)])
            version = config.entity_key_serialization_version
            return _redis_key(config.project, key, entity_key_serialization_version=version)

        # Feast's key for an int64 entity: a header, the id as 8 little-endian bytes, the project
        head = int64_key_prefix(S.COL_USER, config.entity_key_serialization_version)
        tail = config.project.encode()
        pack = struct.Struct("<q").pack
        if all(feast_key(u) == head + pack(u) + tail for u in (0, 1, 42, 2**40 + 7, -3)):
            self.key: Callable[[int], bytes] = lambda user: head + pack(user) + tail
        else:  # another key encoding: ask Feast every time
            self.key = feast_key

    def mappings(self, rows: Sequence[Row]) -> list[tuple[bytes, list[bytes]]]:
        """Each row's Redis key and its hash fields and values (flat), as Feast's Redis store writes them."""
        from feast.protos.feast.types.Value_pb2 import Int64List, Value
        from google.protobuf.timestamp_pb2 import Timestamp

        f_items, f_last, f_count, f_purchases, f_cats = self.fields
        ts_field, key = self.ts_field, self.key
        out = []
        for user, last_us, items, count, purchases, cats, _ in rows:
            seconds, micros = divmod(last_us, 1_000_000)
            out.append((key(user), [
                ts_field, Timestamp(seconds=seconds, nanos=micros * 1000).SerializeToString(),
                f_items, Value(int64_list_val=Int64List(val=items)).SerializeToString(),
                f_last, Value(unix_timestamp_val=seconds).SerializeToString(),  # Feast keeps whole seconds
                f_count, Value(int64_val=count).SerializeToString(),
                f_purchases, Value(int64_val=purchases).SerializeToString(),
                f_cats, Value(int64_list_val=Int64List(val=cats)).SerializeToString(),
            ]))
        return out

    def queue(self, pipe: redis.client.Pipeline, mappings: list[tuple[bytes, list[bytes]]]) -> None:
        """Queue the rows' online writes (from :meth:`mappings`) on ``pipe``, the state transaction."""
        ttl = self.ttl_s
        queue = pipe.execute_command
        for key, fields in mappings:
            queue("HSET", key, *fields)
            if ttl:
                queue("EXPIRE", key, ttl)

    def write(self, rows: Sequence[Row]) -> None:
        """Write the rows with Feast's own online writer (its own round trip)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Int64List, Value

        from pipelines.realtime_rules import from_us

        data: list[tuple[EntityKey, dict[str, Value], datetime, datetime | None]] = []
        for user, last_us, items, count, purchases, cats, created_us in rows:
            key = EntityKey(join_keys=[S.COL_USER], entity_values=[Value(int64_val=user)])
            values = {
                "last_5_items": Value(int64_list_val=Int64List(val=items)),
                "last_action_ts": Value(unix_timestamp_val=last_us // 1_000_000),  # Feast keeps whole seconds
                "interaction_count": Value(int64_val=count),
                "total_purchases": Value(int64_val=purchases),
                "preferred_categories": Value(int64_list_val=Int64List(val=cats)),
            }
            data.append((key, values, from_us(last_us), from_us(created_us)))
        self.provider.online_write_batch(self.store.config, self.view, data, None)


class StateStore:
    """Redis keys of the stream: per-user fold state and per-partition outbox of offline rows."""

    def __init__(self, client: redis.Redis, project: str, topic: str, topic_id: str = "") -> None:
        self.client = client
        self.prefix = f"rt:{project}"
        self.topic = topic
        # offsets restart at 0 when a topic is recreated (the local broker keeps topics in
        # memory), so the applied watermark belongs to one incarnation of the topic
        self.topic_id = topic_id or "unknown"

    def applied_key(self) -> str:
        return f"{self.prefix}:applied:{self.topic}:{self.topic_id}"

    def applied_offsets(self) -> dict[int, int]:
        """The highest offset of each partition already folded into the states."""
        return {int(p): int(o) for p, o in self.client.hgetall(self.applied_key()).items()}

    def state_key(self, user_id: int) -> str:
        return f"{self.prefix}:u:{int(user_id)}"

    def outbox_key(self, partition: int) -> str:
        return f"{self.prefix}:outbox:{self.topic}:{int(partition)}"

    def load(self, user_ids: Sequence[int]) -> list[UserState]:
        if not user_ids:
            return []
        return [UserState.loads(raw) for raw in self.client.mget([self.state_key(u) for u in user_ids])]

    def load_one(self, user_id: int) -> UserState:
        return self.load([user_id])[0]

    def queue_outbox(self, pipe: redis.client.Pipeline, partition: int, last_offset: int, rows: list[Row]) -> None:
        pipe.rpush(self.outbox_key(partition), orjson.dumps([last_offset, rows]))

    def read_outbox(self, partition: int) -> tuple[int, int | None, list[Row]]:
        """(entries, the last offset they cover, their rows)."""
        entries = self.client.lrange(self.outbox_key(partition), 0, -1)
        rows: list[Row] = []
        last: int | None = None
        for raw in entries:
            offset, batch_rows = orjson.loads(raw)
            last = offset if last is None else max(last, offset)
            rows.extend(tuple(r) for r in batch_rows)  # type: ignore[misc]
        return len(entries), last, rows

    def trim_outbox(self, done: dict[int, int]) -> None:
        """Drop the first ``n`` entries of each partition's outbox (more may have been appended)."""
        if done:
            pipe = self.client.pipeline(transaction=True)
            for partition, n in done.items():
                pipe.ltrim(self.outbox_key(partition), n, -1)
            pipe.execute()

    def outbox_size(self, partitions: Iterable[int]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.llen(self.outbox_key(p))
        return sum(pipe.execute())


# ---- metrics -------------------------------------------------------------------------------------------


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
    events: int = 0
    applied: int = 0
    duplicates: int = 0
    late: int = 0
    dead_letters: int = 0
    batches: int = 0
    rows_online: int = 0
    rows_offline: int = 0
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


class _DeadLetters:
    """Produces rejected messages to the dead-letter topic: value = the original bytes, the reason
    and the source position in headers."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)

    def send(self, record: ConsumerRecord, reason: str) -> None:
        headers = [("reason", reason.encode()), ("source_topic", record.topic.encode()),
                   ("source_partition", str(record.partition).encode()), ("source_offset", str(record.offset).encode())]
        self._producer.send(self.topic, key=record.key, value=record.value, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()


# ---- the consumer ----------------------------------------------------------------------------------------


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
        # The offline append runs in its own process: Spark's start-up and the pandas -> Spark
        # conversion of 100,000 rows held this process's GIL for seconds (freshness p99 1.75 s at
        # 5,000 events/s, 0.23 s without it, measured side by side)
        self._flusher: ProcessPoolExecutor | None = None
        self._flush: Future[OfflineFlush] | None = None
        self._pending_rows = 0
        self._flush_due = False
        self._last_flush = time.monotonic()
        self._watermark_us: int | None = None
        self._trending_dirty = False
        self._last_publish = 0.0
        self._last_lag = 0.0
        self._last_report = (time.monotonic(), 0)
        self._states: dict[int, UserState] = {}  # the state cache, least recently used first
        self.consumer: Any = None

    # ---- life cycle -------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Finish the current batch, flush, commit and return from ``run`` (safe in a signal handler)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _open(self) -> None:
        from kafka import KafkaConsumer

        from pipelines.feature_store import check_online_store, get_store
        from pipelines.stack import ensure_topics

        s = self.settings
        self._states.clear()
        check_online_store(s)
        ensure_topics(s)
        self.catalogue = ItemCatalogue(s.dataset_path)
        self.redis = redis.Redis.from_url(s.effective_redis_url)
        self.state = StateStore(self.redis, s.feast_project, self.topic, _topic_id(s, self.topic))
        self.online = OnlineRowWriter(get_store(s, skip_dedup=True))
        self.dlq = _DeadLetters(s.effective_kafka_bootstrap, s.dlq_topic)
        self._server = self.metrics.serve(self.options.metrics_port) if self.options.metrics_port is not None else None
        o = self.options
        self.consumer = KafkaConsumer(
            bootstrap_servers=s.effective_kafka_bootstrap,
            group_id=o.group_id,
            client_id=f"{o.group_id}-consumer",
            enable_auto_commit=False,  # offsets are committed only after the offline append
            auto_offset_reset="earliest",
            max_poll_records=o.batch_events,
            fetch_max_wait_ms=o.batch_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # the broker checked the CRC on produce and TCP checks the transfer; checking again in
            # pure Python costs more than half of the consumer's CPU
            check_crcs=False,
            session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=o.heartbeat_interval_ms,
        )
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        log.info("stream consuming topic=%s group=%s redis=%s", self.topic, o.group_id, s.effective_redis_url)

    def run(self) -> StreamStats:
        """Consume until stopped; always flushes and commits what was processed before returning."""
        started = time.monotonic()
        self._open()
        try:
            while not self._stop.is_set():
                batch = self.consumer.poll(timeout_ms=self.options.batch_ms, max_records=self.options.batch_events)
                if batch:
                    self._process(batch)
                elif self.options.stop_when_caught_up and self._caught_up():
                    log.info("stream caught up with every assigned partition: stopping")
                    break
                self._housekeeping()
        finally:
            self._close()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _close(self) -> None:
        try:
            self._finish_flush()
            if self.consumer.assignment():
                self._commit(self._flush_offline(self._partitions()))
            if self._trending_dirty and self._watermark_us is not None:
                trending.publish(self.redis, self._watermark_us, self.options.trending)
        finally:
            self.consumer.close(autocommit=False)  # may still revoke partitions, which flushes them
            if self._flusher is not None:
                self._flusher.shutdown(wait=True)
                self._flusher = None  # a later run() starts a new flush process
            self.dlq.close()
            if self._server is not None:
                self._server.shutdown()
            log.info("stream stopped events=%d applied=%d duplicates=%d late=%d dead_letters=%d commits=%d",
                     self.stats.events, self.stats.applied, self.stats.duplicates, self.stats.late,
                     self.stats.dead_letters, self.stats.commits)

    def _partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())

    def _caught_up(self) -> bool:
        assigned = list(self.consumer.assignment())
        if not assigned:
            return False
        ends = self.consumer.end_offsets(assigned)
        return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)

    # ---- one micro-batch ------------------------------------------------------------------

    def _process(self, batch: dict[Any, list[ConsumerRecord]]) -> None:
        batch = self._skip_applied(batch)
        if not batch:
            return
        records = [r for recs in batch.values() for r in recs]
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.monotonic()
        now = time.time()
        max_ts = pd.Timestamp(now + self.options.max_future_s, unit="s", tz="UTC")
        self.catalogue.maybe_reload()
        decoded = decode_batch([r.value for r in records], self.catalogue.known_items, max_ts)
        dead: list[tuple[ConsumerRecord, str]] = [(records[i], reason) for i, reason in decoded.rejected]

        users = decoded.user_id.tolist()
        index = decoded.index.tolist()
        groups: dict[int, list[int]] = {}
        for j, (user, i) in enumerate(zip(users, index)):
            key = records[i].key
            if key is not None and key != str(user).encode():
                dead.append((records[i], f"message key {key!r} is not the event's user_id {user}: "
                                         "producers must key by user_id"))
                continue
            groups.setdefault(user, []).append(j)

        uids = list(groups)
        states = self._load_states(uids)
        changed, counts, late = self._fold(decoded, groups, states)
        dead.extend((records[index[j]], LATE_REASON) for j in late)

        created_us = int(now * 1_000_000)
        partition_of = {u: records[index[groups[u][0]]].partition for u in changed}
        rows_by_partition: dict[int, list[Row]] = {tp.partition: [] for tp in batch}
        for user, state in changed.items():
            rows_by_partition[partition_of[user]].append(state_row(user, state, created_us))
        rows = [row for part in rows_by_partition.values() for row in part]

        for record, reason in dead:
            self.dlq.send(record, reason)
            self.metrics.dead_letters.labels(reason_label(reason)).inc()
        online = self.online.mappings(rows) if rows and self.online.in_transaction else None
        if rows and online is None:
            self._timed("online", lambda: self._push_online(rows))

        def commit() -> None:
            self._retry("state transaction",
                        lambda: self._commit_state(batch, changed, rows_by_partition, uids, counts, online))

        if online:
            self._timed("online", commit)  # the online write is part of the transaction
        else:
            commit()
        self._remember(states)
        self._account(records, len(dead), len(rows), time.time())
        self.stats.last_batch_at = time.monotonic()

    def _load_states(self, users: list[int]) -> dict[int, UserState]:
        """The users' fold states: from the cache, else from Redis (one MGET). Cached states leave
        the cache here and come back in :meth:`_remember` once their transaction is done, so a
        failed batch never leaves a state in memory that Redis does not hold."""
        cache = self._states
        states: dict[int, UserState] = {}
        missing: list[int] = []
        for user in users:
            state = cache.pop(user, None)
            if state is None:
                missing.append(user)
            else:
                states[user] = state
        if missing:
            states.update(zip(missing, self.state.load(missing)))
        return states

    def _remember(self, states: dict[int, UserState]) -> None:
        """Keep the states of a committed batch in the cache (as the most recently used)."""
        limit = self.options.state_cache_users
        if limit <= 0:
            return
        cache = self._states
        cache.update(states)
        excess = len(cache) - limit
        if excess > 0:
            for user in list(itertools.islice(cache, excess)):
                del cache[user]

    def _skip_applied(self, batch: dict[Any, list[ConsumerRecord]]) -> dict[Any, list[ConsumerRecord]]:
        """Drop redelivered messages whose offsets the states already hold.

        After a crash the consumer resumes from the last *committed* offset, which trails the
        applied one by up to an offline-flush interval: far more events per user than the event-id
        window remembers. The per-partition watermark, written in the same transaction as the
        states, recognises all of them, however many.
        """
        applied = self.state.applied_offsets()
        kept: dict[Any, list[ConsumerRecord]] = {}
        skipped = 0
        for tp, recs in batch.items():
            mark = applied.get(tp.partition, -1)
            fresh = [r for r in recs if r.offset > mark]
            skipped += len(recs) - len(fresh)
            if fresh:
                kept[tp] = fresh
        if skipped:
            self.stats.duplicates += skipped
            self.metrics.events.labels("duplicate").inc(skipped)
        return kept

    def _fold(self, decoded: Any, groups: dict[int, list[int]], states: dict[int, UserState]
              ) -> tuple[dict[int, UserState], dict[tuple[int, int | None], Counter[int]], list[int]]:
        """Apply the rules to each user's events; returns changed states, trending counts, late events."""
        window = self.options.window
        cats = self.catalogue.categories(decoded.item_id).tolist()
        items, ts, values = decoded.item_id.tolist(), decoded.ts_us.tolist(), decoded.value.tolist()
        ids, types = decoded.event_id, decoded.event_type
        changed: dict[int, UserState] = {}
        counts: dict[tuple[int, int | None], Counter[int]] = {}
        late: list[int] = []
        duplicates = applied = 0
        watermark = self._watermark_us
        for user, js in groups.items():
            state = states[user]
            before = state.count
            for j in js:
                value = values[j]
                cat = cats[j]
                event = Event(ids[j], user, items[j], types[j], None if value != value else value, ts[j],
                              cat if cat >= 0 else None)
                outcome = state.apply(event, window)
                if outcome is Outcome.APPLIED:
                    applied += 1
                    if watermark is None or event.ts_us > watermark:
                        watermark = event.ts_us
                    if event.event_type in _TRENDING:
                        minute = trending.minute_of(event.ts_us)
                        bucket = counts.get((minute, None))
                        if bucket is None:
                            bucket = counts[(minute, None)] = Counter()
                        bucket[event.item_id] += 1
                        if event.category is not None:
                            bucket = counts.get((minute, event.category))
                            if bucket is None:
                                bucket = counts[(minute, event.category)] = Counter()
                            bucket[event.item_id] += 1
                elif outcome is Outcome.LATE:
                    late.append(j)
                else:
                    duplicates += 1
            if state.count != before:
                state.trim(window)
                changed[user] = state
        self._watermark_us = watermark
        if watermark is not None and counts:  # a replay of history: minutes already out of the window
            first = self.options.trending.minutes(watermark).start
            counts = {k: v for k, v in counts.items() if k[0] >= first}
        self.stats.applied += applied
        self.stats.duplicates += duplicates
        self.stats.late += len(late)
        self.metrics.events.labels("applied").inc(applied)
        self.metrics.events.labels("duplicate").inc(duplicates)
        self.metrics.events.labels("late").inc(len(late))
        return changed, counts, late

    def _push_online(self, rows: list[Row]) -> None:
        self._retry("online push", lambda: self.online.write(rows))

    def _commit_state(self, batch: dict[Any, list[ConsumerRecord]], changed: dict[int, UserState],
                      rows_by_partition: dict[int, list[Row]], users: list[int],
                      counts: dict[tuple[int, int | None], Counter[int]],
                      online: list[tuple[bytes, list[bytes]]] | None = None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        if online:
            self.online.queue(pipe, online)
        # plain commands: redis-py's SET/HSET wrappers check their arguments on every call
        queue = pipe.execute_command
        state_key = self.state.state_key
        for user, state in changed.items():
            queue("SET", state_key(user), state.dumps())
        for tp, recs in batch.items():
            self.state.queue_outbox(pipe, tp.partition, recs[-1].offset, rows_by_partition[tp.partition])
        pipe.hset(self.state.applied_key(), mapping={tp.partition: recs[-1].offset for tp, recs in batch.items()})
        if users:
            pipe.delete(*[recs_cache_key(u) for u in users])
        trending.queue_increments(pipe, counts, self.options.trending)
        pipe.execute()
        if counts:
            self._trending_dirty = True

    def _account(self, records: list[ConsumerRecord], n_dead: int, n_rows: int, visible_at: float) -> None:
        st = self.stats
        st.batches += 1
        st.events += len(records)
        st.dead_letters += n_dead
        st.rows_online += n_rows
        self._pending_rows += n_rows
        self._flush_due = True
        created = np.fromiter((r.timestamp for r in records), dtype=np.float64, count=len(records))
        fresh_ms = visible_at * 1000.0 - created
        if self.options.record_freshness:
            st.freshness_ms.append(fresh_ms)
        observe_many(self.metrics.freshness, fresh_ms / 1000.0)
        self.metrics.events.labels("dead_letter").inc(n_dead)

    # ---- housekeeping: offline flush, commit, trending, lag -----------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._flush is not None and self._flush.done():
            self._finish_flush()
        if self._flush is None and self._flush_due and (
            self._pending_rows >= self.options.offline_batch_rows or now - self._last_flush >= self.options.offline_flush_s
        ):
            self._start_flush()
        if self._trending_dirty and now - self._last_publish >= self.options.trending_publish_s:
            trending.publish(self.redis, self._watermark_us or 0, self.options.trending)
            self._trending_dirty = False
            self._last_publish = now
        if now - self._last_lag >= 2.0:
            self._update_lag()
            self._last_lag = now

    def _submit_flush(self, partitions: list[int]) -> Future[OfflineFlush]:
        if self._flusher is None:
            self._flusher = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._flusher.submit(flush_outboxes, self.settings, self.topic, self.state.topic_id, partitions)

    def _start_flush(self) -> None:
        self._flush = self._submit_flush(self._partitions())
        self._pending_rows = 0
        self._flush_due = False
        self._last_flush = time.monotonic()

    def _finish_flush(self) -> None:
        if self._flush is not None:
            future, self._flush = self._flush, None
            self._commit(self._account_flush(future.result()))

    def _flush_offline(self, partitions: list[int]) -> dict[int, int]:
        """Append the outboxes of ``partitions`` offline now; returns the offsets safe to commit."""
        return self._account_flush(self._submit_flush(partitions).result())

    def _account_flush(self, done: OfflineFlush) -> dict[int, int]:
        if done.rows:
            self.metrics.push_seconds.labels("offline").observe(done.seconds)
            self.stats.rows_offline += done.rows
            log.info("offline append rows=%d partitions=%s", done.rows, done.partitions)
        return done.offsets

    def _commit(self, offsets: dict[int, int]) -> None:
        """Commit after the dead letters of those offsets are safely in their topic."""
        if not offsets:
            return
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        self.dlq.flush()
        self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
        self.stats.commits += 1
        for p, o in offsets.items():
            self.metrics.committed.labels(str(p)).set(o)

    def _update_lag(self) -> None:
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

    # ---- rebalancing ---------------------------------------------------------------------------

    def on_revoked(self, partitions: Iterable[Any]) -> None:
        """Before giving partitions away: append their outboxes and commit, so the next owner starts
        exactly where this one stopped."""
        self._finish_flush()
        self._states.clear()
        revoked = sorted(tp.partition for tp in partitions)
        if revoked:
            self._commit(self._flush_offline(revoked))

    def on_assigned(self, partitions: Iterable[Any]) -> None:
        """A previous owner may have left outbox entries (it crashed): append them soon. Another
        consumer may have written states of these partitions meanwhile: forget the cached ones."""
        self._states.clear()
        if self.state.outbox_size(tp.partition for tp in partitions):
            self._flush_due = True
            self._pending_rows = self.options.offline_batch_rows
        self.assigned.set()

    # ---- helpers --------------------------------------------------------------------------------

    def _timed(self, store: str, action: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        result = action()
        self.metrics.push_seconds.labels(store).observe(time.perf_counter() - started)
        return result

    def _retry(self, what: str, action: Callable[[], _T]) -> _T:
        return retry_io(what, action, self._stop.is_set)


def retry_io(what: str, action: Callable[[], _T], give_up: Callable[[], bool] = lambda: False) -> _T:
    """Retry a write on infrastructure errors with backoff, until it succeeds or ``give_up()``."""
    delay = 0.2
    while True:
        try:
            return action()
        except (redis.RedisError, OSError, ConnectionError) as exc:
            if give_up():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


# ---- the offline append, in its own process ------------------------------------------------------


@dataclass(frozen=True)
class OfflineFlush:
    partitions: list[int]
    offsets: dict[int, int]  # per partition, the offset now safe to commit
    rows: int
    seconds: float


#: the flush process's feature store, made on its first flush (Spark starts once per process)
_FLUSH_STORES: dict[str, FeatureStore] = {}
#: a flush retries a down Redis or Spark this long, then fails (the consumer then stops uncommitted)
FLUSH_RETRY_S = 300.0


def flush_outboxes(settings: Settings, topic: str, topic_id: str, partitions: list[int]) -> OfflineFlush:
    """Append the outboxes of ``partitions`` to the offline store through the push source, then
    trim them; runs in the consumer's flush process. Returns the offsets safe to commit."""
    from pipelines.feature_store import get_store, push_user_realtime

    started = time.perf_counter()
    state = StateStore(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project, topic, topic_id)
    entries = {p: state.read_outbox(p) for p in partitions}
    rows = [row for _, _, part in entries.values() for row in part]
    if rows:
        store = _FLUSH_STORES.get(settings.feast_project)
        if store is None:
            store = _FLUSH_STORES[settings.feast_project] = get_store(settings)
        deadline = time.monotonic() + FLUSH_RETRY_S
        retry_io("offline append", lambda: push_user_realtime(store, rows_frame(rows), online=False, offline=True),
                 lambda: time.monotonic() > deadline)
    state.trim_outbox({p: n for p, (n, _, _) in entries.items() if n})
    return OfflineFlush(partitions, {p: last + 1 for p, (n, last, _) in entries.items() if n and last is not None},
                        len(rows), time.perf_counter() - started)


def _exit_with_parent(parent_pid: int) -> None:
    """Flush-process initializer: exit when the consumer is gone (a SIGKILL leaves no orphan)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _rebalance_listener() -> type:
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def __init__(self, processor: StreamProcessor) -> None:
            self.processor = processor

        def on_partitions_revoked(self, revoked: Any) -> None:
            self.processor.on_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            self.processor.on_assigned(assigned)

    return Listener


def _Rebalance(processor: StreamProcessor) -> Any:  # noqa: N802 - reads like the class it builds
    return _rebalance_listener()(processor)
