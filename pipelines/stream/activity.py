"""Who was active lately, as the stream saw it: the *activity set*, per event-time hour a Redis
sorted set ``rt:{project}:active:{hour}`` (member = user id, score = the user's events applied in
that hour), counted in the micro-batch's transaction and read by the precompute job
(:func:`live_activity`).

Why hours of sorted sets: precompute needs the users of a window (24 h by default) and how active
each was, without a SCAN over every user's state (50M keys). A window's users are the union of
about 25 small sets, each read in ranked chunks (``ZRANGE``, never one huge reply), and a batch
adds one ``ZINCRBY`` per user and hour it touched, in the transaction that already writes the
user's state, so the counts are exactly once in effect like the states (a redelivered event is a
duplicate and counts nothing). The window is rounded out to whole hours: its first hour is counted
whole. Each set expires ``retention_s`` plus an hour after its last write (wall clock, as the
trending buckets do), and a batch only counts events within ``retention_s`` of the newest event
it has applied, so replaying old history never refills hours long past.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import redis

from pipelines.realtime_rules import to_us

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger(__name__)

HOUR_S = 3_600
_US_PER_HOUR = HOUR_S * 1_000_000
#: How long the stream keeps live activity by default: the longest precompute window it can serve.
ACTIVITY_RETENTION_S = 48 * HOUR_S
#: Members read per ZRANGE call: bounds one reply whatever a set's size.
READ_CHUNK = 50_000

#: activity increments of a batch: event-time hour -> user -> events applied
ActivityCounts = dict[int, Counter[int]]


def activity_key(project: str, hour: int) -> str:
    """The sorted set of one event-time hour (hours since the epoch, UTC)."""
    return f"rt:{project}:active:{int(hour)}"


def hour_of(ts_us: int) -> int:
    """The event-time hour (since the epoch) of a timestamp in microseconds."""
    return ts_us // _US_PER_HOUR


def count_event(counts: ActivityCounts, user: int, ts_us: int) -> None:
    """Count one applied event of ``user`` in its hour."""
    hour = ts_us // _US_PER_HOUR
    bucket = counts.get(hour)
    if bucket is None:
        bucket = counts[hour] = Counter()
    bucket[user] += 1


def drop_expired(counts: ActivityCounts, watermark_us: int | None, retention_s: int) -> ActivityCounts:
    """The hours still within ``retention_s`` of the newest applied event (a replay of history
    would otherwise write hours that precompute never reads again)."""
    if watermark_us is None or not counts:
        return counts
    first = hour_of(watermark_us - retention_s * 1_000_000)
    return {h: users for h, users in counts.items() if h >= first}


def queue_activity(pipe: Pipeline, project: str, counts: ActivityCounts, retention_s: int) -> None:
    """Queue the batch's increments on ``pipe`` (the state transaction): one ZINCRBY per user and
    hour, one EXPIRE per hour."""
    queue = pipe.execute_command  # plain commands: redis-py's wrappers check arguments per call
    for hour, users in counts.items():
        key = activity_key(project, hour)
        for user, n in users.items():
            queue("ZINCRBY", key, n, user)
        queue("EXPIRE", key, retention_s + HOUR_S)


def window_hours(end: datetime, hours: int) -> range:
    """The event-time hours that the window (end - hours, end] touches, its first one whole."""
    end_us = to_us(end)
    return range(hour_of(end_us - hours * _US_PER_HOUR), hour_of(end_us) + 1)


def live_activity(client: redis.Redis, project: str, end: datetime, hours: int,
                  retention_s: int = ACTIVITY_RETENTION_S, chunk: int = READ_CHUNK) -> pd.Series:
    """Events per user that the stream applied in the window ending at ``end`` (rounded out to
    whole hours), as a Series user_id -> count (int64, unordered; empty when none). A window
    longer than ``retention_s`` is read whole but holds only what the stream still keeps (logged)."""
    if hours * HOUR_S > retention_s:
        log.warning("live activity is kept %d h: a %d h window counts only its last %d h from the stream",
                    retention_s // HOUR_S, hours, retention_s // HOUR_S)
    users: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for hour in window_hours(end, hours):
        key = activity_key(project, hour)
        start = 0
        while True:
            page: list[tuple[bytes, float]] = client.zrange(key, start, start + chunk - 1,  # type: ignore[assignment]
                                                             withscores=True)
            if page:
                users.append(np.fromiter((int(m) for m, _ in page), dtype=np.int64, count=len(page)))
                counts.append(np.fromiter((s for _, s in page), dtype=np.float64, count=len(page)))
            if len(page) < chunk:
                break
            start += chunk
    if not users:
        return pd.Series([], dtype=np.int64, index=pd.Index([], dtype=np.int64, name="user_id"))
    frame = pd.Series(np.concatenate(counts), index=pd.Index(np.concatenate(users), name="user_id"))
    return frame.groupby(level=0).sum().round().astype(np.int64)

