"""The state transaction of one micro-batch: everything the batch changes in Redis, in one round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from pipelines import trending
from pipelines.realtime_rules import UserState
from pipelines.stream.activity import ACTIVITY_RETENTION_S, ActivityCounts, queue_activity
from pipelines.stream.fold import TrendingCounts
from pipelines.stream.online_writer import OnlineRowWriter, Row
from pipelines.stream.state import StateStore
from recsys.schema import purchased_key, recs_cache_key

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord


@dataclass
class BatchWrite:
    """What one batch writes: the messages it covers (per partition), the users' new states and rows,
    the users whose cached recommendations are now stale, the trending increments, and the online
    rows to write in the transaction (``None`` when Feast writes them itself), the purchased
    items of the users who bought something (each list replaces the user's set), the applied
    events per hour and user (added to the activity set), and the applied events themselves
    (into the outbox, for the offline event log)."""

    batch: dict[Any, list[ConsumerRecord]]
    changed: dict[int, UserState]
    rows_by_partition: dict[int, list[Row]]
    users: list[int]
    counts: TrendingCounts
    online: list[tuple[bytes, list[bytes]]] | None = None
    purchased: dict[int, list[int]] = field(default_factory=dict)
    activity: ActivityCounts = field(default_factory=dict)
    #: per partition, the wire JSON of the applied events the offline event log gets
    events_by_partition: dict[int, list[str]] = field(default_factory=dict)


def commit_batch(client: redis.Redis, state: StateStore, online: OnlineRowWriter, write: BatchWrite,
                 trending_config: trending.TrendingConfig, activity_retention_s: int = ACTIVITY_RETENTION_S) -> None:
    """In one Redis transaction: the online rows, the new states, each partition's outbox entry (its
    rows and applied events) and applied offset, the purchased-item sets of the users who bought
    something, ``recs:{user_id}`` deleted for every user with an event, the trending counts and the
    activity counts. So the online store, the states, the purchased sets, the activity set and the
    outbox never disagree, whatever crashes when."""
    pipe = client.pipeline(transaction=True)
    if write.online:
        online.queue(pipe, write.online)
    # plain commands: redis-py's SET/HSET wrappers check their arguments on every call
    queue = pipe.execute_command
    state_key = state.state_key
    for user, user_state in write.changed.items():
        queue("SET", state_key(user), user_state.dumps())
    for tp, recs in write.batch.items():
        state.queue_outbox(pipe, tp.partition, recs[-1].offset, write.rows_by_partition[tp.partition],
                           recs[0].offset, write.events_by_partition.get(tp.partition))
    for user, items in write.purchased.items():
        # the set is a copy of the state's bounded list: replaced whole, so a purchase that fell
        # out of the bound leaves it too, and writing the same state again changes nothing
        key = purchased_key(user)
        queue("DEL", key)
        if items:
            queue("SADD", key, *items)
    pipe.hset(state.applied_key(), mapping={tp.partition: recs[-1].offset for tp, recs in write.batch.items()})
    if write.users:
        pipe.delete(*[recs_cache_key(u) for u in write.users])
    trending.queue_increments(pipe, write.counts, trending_config)
    queue_activity(pipe, state.project, write.activity, activity_retention_s)
    pipe.execute()
