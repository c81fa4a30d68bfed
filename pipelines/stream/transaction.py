"""The state transaction of one micro-batch: everything the batch changes in Redis, in one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from pipelines import trending
from pipelines.realtime_rules import UserState
from pipelines.stream.fold import TrendingCounts
from pipelines.stream.online_writer import OnlineRowWriter, Row
from pipelines.stream.state import StateStore
from recsys.schema import recs_cache_key

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord


@dataclass
class BatchWrite:
    """What one batch writes: the messages it covers (per partition), the users' new states and rows,
    the users whose cached recommendations are now stale, the trending increments, and the online
    rows to write in the transaction (``None`` when Feast writes them itself)."""

    batch: dict[Any, list[ConsumerRecord]]
    changed: dict[int, UserState]
    rows_by_partition: dict[int, list[Row]]
    users: list[int]
    counts: TrendingCounts
    online: list[tuple[bytes, list[bytes]]] | None = None


def commit_batch(client: redis.Redis, state: StateStore, online: OnlineRowWriter, write: BatchWrite,
                 trending_config: trending.TrendingConfig) -> None:
    """In one Redis transaction: the online rows, the new states, each partition's outbox entry and
    applied offset, ``recs:{user_id}`` deleted for every user with an event, and the trending counts.
    So the online store, the states and the outbox never disagree, whatever crashes when."""
    pipe = client.pipeline(transaction=True)
    if write.online:
        online.queue(pipe, write.online)
    # plain commands: redis-py's SET/HSET wrappers check their arguments on every call
    queue = pipe.execute_command
    state_key = state.state_key
    for user, user_state in write.changed.items():
        queue("SET", state_key(user), user_state.dumps())
    for tp, recs in write.batch.items():
        state.queue_outbox(pipe, tp.partition, recs[-1].offset, write.rows_by_partition[tp.partition])
    pipe.hset(state.applied_key(), mapping={tp.partition: recs[-1].offset for tp, recs in write.batch.items()})
    if write.users:
        pipe.delete(*[recs_cache_key(u) for u in write.users])
    trending.queue_increments(pipe, write.counts, trending_config)
    pipe.execute()
