"""The clickstream consumer (``recsys stream run``): Kafka -> real-time user features and the offline
event log, exactly once in effect.

One micro-batch (up to ``batch_events`` events or ``batch_ms`` of waiting), in :mod:`.consumer`:

1. decode and validate every message (:func:`pipelines.events.decode_batch`); bad ones go to the
   dead-letter topic (:mod:`.dead_letters`) with the reason and the original bytes;
2. load the users' fold states from Redis (one MGET, :mod:`.state`) and fold the events with the one
   implementation of the rules (:mod:`pipelines.realtime_rules`, through :mod:`.fold`), skipping
   event ids already in the state's dedupe window; events older than the window go to the
   dead-letter topic as late;
3. in one Redis transaction (one round trip, :mod:`.transaction`): the users' new rows in the online
   store, written as Feast's Redis store writes them (:class:`OnlineRowWriter` says how, and why
   not ``FeatureStore.push``), the new states, the batch's rows and the canonical events it
   applied appended to the partition's *outbox*, the partition's applied-offset watermark, the purchased-item set of every user who
   bought something (``purchased:{user_id}``, a copy of the state's bounded list, which serving
   filters with), ``recs:{user_id}`` deleted for every user with an event, the trending counts,
   and the activity set (each user's applied events per event-time hour, :mod:`.activity`, from
   which the precompute job takes the users active lately).

In the background, every ``offline_flush_s`` or ``offline_batch_rows`` (rows and events), the
outboxes are appended offline by a separate flush process (so that it never holds the consumer's
GIL: :mod:`.flush`): the events to the dataset's canonical ``events`` table (validated again by the
canonical rules, one file per partition and date: :mod:`pipelines.live_log`), then the rows to the
offline store through the same push source (a Spark job, so in large batches); then the outboxes
are trimmed, and only then are the Kafka offsets that those entries cover committed (after the
dead letters are flushed, :mod:`.offsets`). So a committed offset always means: online written,
event logged, offline appended. A message with the ``recsys-replay`` header (a replay of events
the log already holds) is folded but not logged again.

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
and written again.) The offline feature append is at least once: a crash
between the append and the outbox trim appends identical rows (same event_timestamp and created)
a second time, which point-in-time joins read as one. The event log is exactly once in effect:
its files are named by the outbox entries they hold (the partition and first offset), so the
flush after such a crash rewrites the same files, whole (:func:`.flush.events_file_key`).

Partition ownership makes the consumer the single writer of its users' states (events are keyed by
user); a message whose key is not its user_id would break that, so it is dead-lettered.
"""

from pipelines.stream.activity import activity_key, live_activity
from pipelines.stream.catalogue import ItemCatalogue
from pipelines.stream.consumer import StreamProcessor
from pipelines.stream.flush import OfflineFlush, flush_outboxes
from pipelines.stream.metrics import StreamMetrics, StreamStats
from pipelines.stream.online_writer import OnlineRowWriter, Row, rows_frame, state_row
from pipelines.stream.options import StreamOptions
from pipelines.stream.retry import retry_io
from pipelines.stream.state import StateStore

__all__ = [
    "ItemCatalogue",
    "OfflineFlush",
    "OnlineRowWriter",
    "Row",
    "StateStore",
    "StreamMetrics",
    "StreamOptions",
    "StreamProcessor",
    "StreamStats",
    "activity_key",
    "flush_outboxes",
    "live_activity",
    "retry_io",
    "rows_frame",
    "state_row",
]
