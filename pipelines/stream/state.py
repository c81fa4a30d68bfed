"""The stream's keys in Redis: each user's fold state, each partition's outbox of offline rows and
events and applied-offset watermark (:class:`StateStore`), and the consumer's in-memory cache of states."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from pipelines.realtime_rules import UserState
from pipelines.stream.online_writer import Row

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord


@dataclass
class Outbox:
    """What a partition's outbox holds: its entries, the first and last offsets they cover, their
    user_realtime rows and the canonical events they applied (wire JSON, in order)."""

    entries: int
    last: int | None = None
    first: int | None = None
    rows: list[Row] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


class StateStore:
    """Redis keys of the stream: per-user fold state and per-partition outbox of offline rows."""

    def __init__(self, client: redis.Redis, project: str, topic: str, topic_id: str = "") -> None:
        self.client = client
        self.project = project
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

    def queue_outbox(self, pipe: redis.client.Pipeline, partition: int, last_offset: int, rows: list[Row],
                     first_offset: int | None = None, events: list[str] | None = None) -> None:
        """One batch's outbox entry: the offsets it covers, its user_realtime rows and the canonical
        events it applied (their wire JSON), for the offline log."""
        first = last_offset if first_offset is None else first_offset
        pipe.rpush(self.outbox_key(partition), orjson.dumps([last_offset, rows, first, events or []]))

    def read_outbox(self, partition: int) -> Outbox:
        """The partition's outbox entries, in order (an entry of an older consumer, without events,
        reads as having none)."""
        entries = self.client.lrange(self.outbox_key(partition), 0, -1)
        out = Outbox(len(entries))
        for raw in entries:
            offset, batch_rows, *more = orjson.loads(raw)
            out.last = offset if out.last is None else max(out.last, offset)
            out.rows.extend(tuple(r) for r in batch_rows)  # type: ignore[misc]
            if more:
                first, events = more
                out.first = first if out.first is None else min(out.first, first)
                out.events.extend(events)
        return out

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

    def skip_applied(self, batch: dict[Any, list[ConsumerRecord]]) -> tuple[dict[Any, list[ConsumerRecord]], int]:
        """Drop redelivered messages whose offsets the states already hold; returns the rest and how
        many were dropped.

        After a crash the consumer resumes from the last *committed* offset, which trails the
        applied one by up to an offline-flush interval: far more events per user than the event-id
        window remembers. The per-partition watermark, written in the same transaction as the
        states, recognises all of them, however many.
        """
        applied = self.applied_offsets()
        kept: dict[Any, list[ConsumerRecord]] = {}
        skipped = 0
        for tp, recs in batch.items():
            mark = applied.get(tp.partition, -1)
            fresh = [r for r in recs if r.offset > mark]
            skipped += len(recs) - len(fresh)
            if fresh:
                kept[tp] = fresh
        return kept, skipped


class StateCache:
    """Fold states kept in memory between micro-batches, least recently used first.

    The consumer is the only writer of its partitions' states, so a cached state is what Redis
    holds. A state leaves the cache in :meth:`take` and comes back in :meth:`remember` once its
    transaction is done, so a failed batch never leaves a state in memory that Redis does not hold.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._states: dict[int, UserState] = {}

    def clear(self) -> None:
        self._states.clear()

    def take(self, users: list[int], store: StateStore) -> dict[int, UserState]:
        """The users' fold states: from the cache, else from Redis (one MGET)."""
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
            states.update(zip(missing, store.load(missing)))
        return states

    def remember(self, states: dict[int, UserState]) -> None:
        """Keep the states of a committed batch in the cache (as the most recently used)."""
        limit = self.limit
        if limit <= 0:
            return
        cache = self._states
        cache.update(states)
        excess = len(cache) - limit
        if excess > 0:
            for user in list(itertools.islice(cache, excess)):
                del cache[user]
