"""The real-time user feature rules: ONE pure fold, used by the stream consumer, the backfill and
the tests' reference. No I/O here.

The rules:

- VIEW, CLICK and RATING >= 4 put the item in ``last_5_items`` (the five most recent distinct
  items, newest last; a repeat moves the item to the end);
- PURCHASE and RATING >= 4 count for ``preferred_categories`` (at most five, by count, then by
  recency); PURCHASE also adds one to ``total_purchases``;
- every event adds one to ``interaction_count`` and moves ``last_action_ts`` forward;
- PURCHASE and RATING (any value: a rated film was watched) put the item in ``purchased_items``,
  the items the user already *has* (the ``purchased_max`` with the latest such events, oldest
  first; not a Feast feature: the stream writes it to the Redis set
  :func:`recsys.schema.purchased_key`, which serving reads to never recommend an item again).

Events are ordered by ``(event_timestamp, event_id)``, never by arrival. Every field is a function
of the *set* of applied events (counts are sums, recency is a maximum, ``last_5_items`` is "the five
items with the latest events"), so the result does not depend on arrival order or on batch
boundaries: the stream, which sees events as Kafka delivers them, and the backfill, which sorts
them, compute the same state.

Delivery rules, kept in the state so a restart sees them:

- **Idempotent by event_id.** The state remembers the ids of the events it applied within the
  dedupe window (``window_us`` before the user's ``last_action_ts``, at most ``max_ids`` ids); an id
  seen again is a DUPLICATE and changes nothing.
- **Late events.** An event older than ``last_action_ts`` but inside the window is applied where it
  belongs in event time (``last_action_ts`` does not move back). An event older than the window's
  floor cannot be told apart from a replayed duplicate whose id was forgotten, so it is LATE: not
  applied, sent to the dead-letter topic with that reason. (When more than ``max_ids`` events fall
  inside the window, the floor rises to the oldest id still remembered.)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

import orjson

from recsys import schema as S

LAST_ITEMS = 5
#: Purchased items kept per user by default (``stream_purchased_max``): the latest purchases.
PURCHASED_MAX = 100
TOP_CATEGORIES = 5
MIN_RATING = 4.0  # a rating at or above this is a positive signal, like a view or a purchase

_ITEM_TYPES = frozenset({S.EventType.VIEW.value, S.EventType.CLICK.value})
_PURCHASE = S.EventType.PURCHASE.value
_RATING = S.EventType.RATING.value
#: Events that mean the user has the item (bought it, or rated it: watched, read): never recommended again.
CONSUMED_TYPES = frozenset({_PURCHASE, _RATING})
_MIN_US = -(2**63)

#: Names of the feature columns, in the offline table's order.
FEATURES = ("last_5_items", "last_action_ts", "interaction_count", "total_purchases", "preferred_categories")


class Outcome(str, Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"


LATE_REASON = "late event: older than the user's dedupe window"


@dataclass(frozen=True)
class DedupeWindow:
    """How long (before the user's last action) and how many event ids the state remembers."""

    window_us: int = 24 * 3600 * 1_000_000
    max_ids: int = 1_000

    def __post_init__(self) -> None:
        if self.window_us <= 0 or self.max_ids <= 0:
            raise ValueError(
                f"dedupe window {self.window_us} us / {self.max_ids} ids must both be positive "
                "(set stream_dedupe_window_s and stream_dedupe_max_ids above 0)"
            )


@dataclass(slots=True)
class Event:
    """The fields of a canonical event that the rules read (timestamps in epoch microseconds)."""

    event_id: str
    user_id: int
    item_id: int
    event_type: str
    value: float | None
    ts_us: int
    category: int | None = None


@dataclass(slots=True)
class UserState:
    """Everything the fold needs to continue: features, their hidden inputs and the dedupe window."""

    count: int = 0
    purchases: int = 0
    last_us: int = _MIN_US
    floor_us: int = _MIN_US
    #: ``[item_id, ts_us, event_id]`` of the latest event per item, oldest first, at most five.
    items: list[list[Any]] = field(default_factory=list)
    #: ``category -> [count, ts_us, event_id]`` (the latest qualifying event in that category).
    cats: dict[int, list[Any]] = field(default_factory=dict)
    #: ``event_id -> ts_us`` of the applied events inside the dedupe window.
    seen: dict[str, int] = field(default_factory=dict)
    #: ``[item_id, ts_us]`` of the latest purchase per item, oldest first (by ts, then item), bounded.
    bought: list[list[int]] = field(default_factory=list)

    # ---- the rules ------------------------------------------------------------------------

    def apply(self, e: Event, window: DedupeWindow, purchased_max: int = PURCHASED_MAX) -> Outcome:
        """Fold one event into the state; DUPLICATE and LATE change nothing. ``purchased_max``
        bounds ``purchased_items`` (the oldest purchase falls out)."""
        if e.ts_us < max(self.floor_us, self.last_us - window.window_us):
            return Outcome.LATE
        if e.event_id in self.seen:
            return Outcome.DUPLICATE
        self.seen[e.event_id] = e.ts_us
        self.count += 1
        if e.ts_us > self.last_us:
            self.last_us = e.ts_us
        positive_rating = e.event_type == _RATING and e.value is not None and e.value >= MIN_RATING
        if e.event_type in _ITEM_TYPES or positive_rating:
            self._touch_item(e.item_id, e.ts_us, e.event_id)
        if e.event_type == _PURCHASE:
            self.purchases += 1
        if e.event_type in CONSUMED_TYPES:
            self._touch_bought(e.item_id, e.ts_us, purchased_max)
        if (e.event_type == _PURCHASE or positive_rating) and e.category is not None:
            self._touch_category(e.category, e.ts_us, e.event_id)
        return Outcome.APPLIED

    def _touch_item(self, item: int, ts: int, eid: str) -> None:
        # entries are compared by (ts, event_id), spelled out: this runs for most events
        items = self.items
        for i, entry in enumerate(items):
            if entry[0] == item:
                kts = entry[1]
                if kts > ts or (kts == ts and entry[2] >= eid):
                    return  # a later event already put this item where it belongs
                del items[i]
                break
        last = items[-1] if items else None
        if last is None or ts > last[1] or (ts == last[1] and eid > last[2]):
            items.append([item, ts, eid])  # the usual, in-order case
        else:
            key = (ts, eid)
            pos = len(items)
            while pos > 0 and (items[pos - 1][1], items[pos - 1][2]) > key:
                pos -= 1
            items.insert(pos, [item, ts, eid])
        if len(items) > LAST_ITEMS:
            del items[0]

    def _touch_bought(self, item: int, ts: int, limit: int) -> None:
        # ordered by (ts, item), so ties break the same way whatever the arrival order: the
        # bounded list is "the items with the latest purchases", a function of the set of events
        bought = self.bought
        for i, entry in enumerate(bought):
            if entry[0] == item:
                if entry[1] >= ts:
                    return  # a later purchase of this item already put it where it belongs
                del bought[i]
                break
        pos = len(bought)
        while pos > 0 and (bought[pos - 1][1], bought[pos - 1][0]) > (ts, item):
            pos -= 1
        bought.insert(pos, [item, ts])
        if len(bought) > limit:
            del bought[: len(bought) - limit]

    def _touch_category(self, category: int, ts: int, eid: str) -> None:
        entry = self.cats.get(category)
        if entry is None:
            self.cats[category] = [1, ts, eid]
            return
        entry[0] += 1
        if (ts, eid) > (entry[1], entry[2]):
            entry[1], entry[2] = ts, eid

    def trim(self, window: DedupeWindow) -> None:
        """Forget ids outside the dedupe window (called once per batch, not per event)."""
        floor = max(self.floor_us, self.last_us - window.window_us)
        seen = self.seen
        if seen and min(seen.values()) < floor:
            seen = self.seen = {eid: ts for eid, ts in seen.items() if ts >= floor}
        if len(seen) > window.max_ids:  # forget the oldest, by (ts, event_id)
            dropped = heapq.nsmallest(len(seen) - window.max_ids, ((ts, eid) for eid, ts in seen.items()))
            for _, eid in dropped:
                del seen[eid]
            floor = max(floor, dropped[-1][0])
        self.floor_us = floor

    # ---- features -------------------------------------------------------------------------

    @property
    def last_5_items(self) -> list[int]:
        return [item for item, _, _ in self.items]

    @property
    def purchased_items(self) -> list[int]:
        """The items with the latest purchases (at most ``purchased_max``), oldest first."""
        return [item for item, _ in self.bought]

    @property
    def preferred_categories(self) -> list[int]:
        ranked = sorted(self.cats.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[1][2]), reverse=True)
        return [cat for cat, _ in ranked[:TOP_CATEGORIES]]

    @property
    def last_action(self) -> datetime:
        return from_us(self.last_us)

    def features(self) -> dict[str, Any]:
        """The user_realtime feature values (``last_action_ts`` as a UTC datetime)."""
        return {
            "last_5_items": self.last_5_items,
            "last_action_ts": self.last_action,
            "interaction_count": self.count,
            "total_purchases": self.purchases,
            "preferred_categories": self.preferred_categories,
        }

    # ---- persistence (compact JSON; the stream keeps it in Redis) -------------------------

    def dumps(self) -> bytes:
        return orjson.dumps(
            {"n": self.count, "p": self.purchases, "t": self.last_us, "f": self.floor_us, "i": self.items,
             "c": self.cats, "s": self.seen, "b": self.bought},
            option=orjson.OPT_NON_STR_KEYS,  # category ids are JSON object keys, so strings on the wire
        )

    @classmethod
    def loads(cls, raw: bytes | str | None) -> UserState:
        if not raw:
            return cls()
        d = orjson.loads(raw)
        return cls(count=d["n"], purchases=d["p"], last_us=d["t"], floor_us=d["f"], items=d["i"],
                   cats={int(k): v for k, v in d["c"].items()}, seen=d["s"],
                   bought=d.get("b") or [])  # a state written before purchases were kept has none


# ---- folding many events -------------------------------------------------------------------------


def event_order(e: Event) -> tuple[int, str]:
    return (e.ts_us, e.event_id)


def fold_user(
    events: Iterable[Event], window: DedupeWindow, state: UserState | None = None,
    purchased_max: int = PURCHASED_MAX,
) -> Iterator[tuple[Event, Outcome, UserState]]:
    """Fold one user's events in event-time order, yielding (event, outcome, state after it).

    The backfill uses this to emit a row after every applied event; the yielded state is the
    same object each time (copy what you keep).
    """
    state = state or UserState()
    for e in sorted(events, key=event_order):
        yield e, state.apply(e, window, purchased_max), state
    state.trim(window)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def from_us(us: int) -> datetime:
    """Epoch microseconds as a UTC datetime, exactly."""
    return _EPOCH + timedelta(microseconds=us)


def to_us(ts: datetime) -> int:
    """A datetime as epoch microseconds (naive = UTC), exactly (no float rounding)."""
    ts = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
