"""One micro-batch through the rules: group the decoded events by user, fold them into the users'
states (:class:`BatchFolder`), and turn the changed states into user_realtime rows per partition,
purchased-item sets and the activity counts per user and hour; the applied events per partition
for the offline event log."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines import trending
from pipelines.live_log import REPLAY_HEADER
from pipelines.realtime_rules import CONSUMED_TYPES, PURCHASED_MAX, DedupeWindow, Event, Outcome, UserState
from pipelines.stream.activity import ACTIVITY_RETENTION_S, ActivityCounts, count_event, drop_expired
from pipelines.stream.catalogue import ItemCatalogue
from pipelines.stream.online_writer import Row, state_row

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord

_TRENDING = frozenset(trending.TRENDING_TYPES)

#: trending increments of a batch: (minute, category or None for all) -> item -> count
TrendingCounts = dict[tuple[int, int | None], Counter[int]]


@dataclass
class FoldedBatch:
    """What folding a batch changed: the users' new states, trending counts, the positions (in
    the decoded batch) of the events too late for the dedupe window, the purchased items of
    every user with an applied PURCHASE (the whole bounded list, which replaces the stored set),
    and the applied events per event-time hour and user (the activity set)."""

    changed: dict[int, UserState]
    counts: TrendingCounts
    late: list[int]
    applied: int
    duplicates: int
    purchased: dict[int, list[int]] = field(default_factory=dict)
    activity: ActivityCounts = field(default_factory=dict)
    #: positions (in the decoded batch) of the applied events, for the offline event log
    applied_at: list[int] = field(default_factory=list)


def group_by_user(records: list[ConsumerRecord], decoded: Any, index: list[int]
                  ) -> tuple[dict[int, list[int]], list[tuple[ConsumerRecord, str]]]:
    """Each user's decoded events (positions, in order), and the messages not keyed by their user;
    ``index`` is each decoded event's position in ``records``.

    Partition ownership makes the consumer the single writer of its users' states (events are
    keyed by user); a message whose key is not its user_id would break that, so it is dead-lettered.
    """
    users = decoded.user_id.tolist()
    groups: dict[int, list[int]] = {}
    dead: list[tuple[ConsumerRecord, str]] = []
    for j, (user, i) in enumerate(zip(users, index)):
        key = records[i].key
        if key is not None and key != str(user).encode():
            dead.append((records[i], f"message key {key!r} is not the event's user_id {user}: "
                                     "producers must key by user_id"))
            continue
        groups.setdefault(user, []).append(j)
    return groups, dead


class BatchFolder:
    """Applies the rules to each user's events of a batch, and keeps the stream's event-time
    watermark (the newest applied event), which bounds the trending minutes still counted."""

    def __init__(self, window: DedupeWindow, trending_config: trending.TrendingConfig,
                 purchased_max: int = PURCHASED_MAX, activity_retention_s: int = ACTIVITY_RETENTION_S) -> None:
        self.window = window
        self.trending = trending_config
        self.purchased_max = purchased_max
        self.activity_retention_s = activity_retention_s
        self.watermark_us: int | None = None

    def fold(self, decoded: Any, groups: dict[int, list[int]], states: dict[int, UserState],
             catalogue: ItemCatalogue) -> FoldedBatch:
        """Apply the rules to each user's events; returns changed states, trending counts, late events."""
        window, purchased_max = self.window, self.purchased_max
        cats = catalogue.categories(decoded.item_id).tolist()
        items, ts, values = decoded.item_id.tolist(), decoded.ts_us.tolist(), decoded.value.tolist()
        ids, types = decoded.event_id, decoded.event_type
        changed: dict[int, UserState] = {}
        counts: TrendingCounts = {}
        activity: ActivityCounts = {}
        late: list[int] = []
        applied_at: list[int] = []
        bought: list[int] = []
        duplicates = applied = 0
        watermark = self.watermark_us
        for user, js in groups.items():
            state = states[user]
            before, consumed = state.count, False
            for j in js:
                value = values[j]
                cat = cats[j]
                event = Event(ids[j], user, items[j], types[j], None if value != value else value, ts[j],
                              cat if cat >= 0 else None)
                outcome = state.apply(event, window, purchased_max)
                if outcome is Outcome.APPLIED:
                    applied += 1
                    applied_at.append(j)
                    count_event(activity, user, event.ts_us)
                    consumed = consumed or event.event_type in CONSUMED_TYPES
                    if watermark is None or event.ts_us > watermark:
                        watermark = event.ts_us
                    if event.event_type in _TRENDING:
                        _count_trending(counts, event)
                elif outcome is Outcome.LATE:
                    late.append(j)
                else:
                    duplicates += 1
            if state.count != before:
                state.trim(window)
                changed[user] = state
                if consumed:  # a PURCHASE or a RATING: the user's purchased-item set is rewritten
                    bought.append(user)
        self.watermark_us = watermark
        if watermark is not None and counts:  # a replay of history: minutes already out of the window
            first = self.trending.minutes(watermark).start
            counts = {k: v for k, v in counts.items() if k[0] >= first}
        purchased = {user: states[user].purchased_items for user in bought}
        activity = drop_expired(activity, watermark, self.activity_retention_s)
        return FoldedBatch(changed, counts, late, applied, duplicates, purchased, activity, applied_at)


def _count_trending(counts: TrendingCounts, event: Event) -> None:
    """Count the event for its minute, overall and in its category."""
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


def rows_by_partition(batch: dict[Any, list[ConsumerRecord]], records: list[ConsumerRecord], index: list[int],
                      groups: dict[int, list[int]], changed: dict[int, UserState], created_us: int
                      ) -> dict[int, list[Row]]:
    """The changed users' new rows, under the partition their events came from (every partition of
    the batch has an entry, empty or not: each gets an outbox entry for its offsets)."""
    partition_of = {u: records[index[groups[u][0]]].partition for u in changed}
    rows: dict[int, list[Row]] = {tp.partition: [] for tp in batch}
    for user, state in changed.items():
        rows[partition_of[user]].append(state_row(user, state, created_us))
    return rows


def events_by_partition(batch: dict[Any, list[ConsumerRecord]], records: list[ConsumerRecord], index: list[int],
                        applied_at: list[int]) -> dict[int, list[str]]:
    """The applied events' wire JSON under the partition they came from, in offset order, for the
    offline event log; a message with the :data:`REPLAY_HEADER` (a replay of events the log
    already holds) is folded but not logged again."""
    events: dict[int, list[str]] = {tp.partition: [] for tp in batch}
    for j in sorted(applied_at, key=lambda j: index[j]):
        record = records[index[j]]
        if record.headers and any(k == REPLAY_HEADER for k, _ in record.headers):
            continue
        events[record.partition].append(record.value.decode())
    return events
