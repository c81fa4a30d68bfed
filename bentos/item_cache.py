"""A near cache of candidates' online rows: :class:`ItemFeatureCache`.

Every cache miss of /recommend reads the rows of its ~150 candidates (one HMGET each) and decodes
them, the largest share of a miss's CPU. Item rows change when a materialization writes them (the
item views are batch views: profile and embedding), not per event, and a few popular items are
candidates of most users: keeping each decoded row for a few seconds removes most of those reads
and decodes. The price is staleness bounded by the TTL: a row rewritten in Redis is served as it
was for at most ``ttl_s`` more seconds (0 turns the cache off). Bounded in rows: past
``max_items`` the least recently stored rows go first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

Row = tuple[Any, ...]


class ItemFeatureCache:
    """Decoded item rows (one tuple per item, in the order of the column names the first stored
    batch had) for ``ttl_s`` seconds each; thread-safe. ``clock``: seconds (tests pass their own)."""

    def __init__(self, ttl_s: float, max_items: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0 or max_items < 1:
            raise ValueError(f"item feature cache needs ttl_s >= 0 and max_items >= 1, got {ttl_s} and {max_items}")
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._clock = clock
        self._rows: OrderedDict[int, tuple[float, Row]] = OrderedDict()
        self._names: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, item_ids: Sequence[int],
             fetch: Callable[[list[int]], dict[str, list[Any]] | None]) -> dict[str, list[Any]] | None:
        """The columns of ``item_ids`` (name -> values aligned with ``item_ids``): cached rows
        still fresh, the others by one ``fetch(missing ids)`` (its columns aligned with its ids),
        stored. None when ``fetch`` returns None (Redis is down) for rows that are not cached."""
        ids = [int(i) for i in item_ids]
        if not self.enabled:
            return fetch(ids)
        now = self._clock()
        with self._lock:
            cached = [self._fresh(i, now) for i in ids]
            names = self._names
        missing = list(dict.fromkeys(i for i, row in zip(ids, cached) if row is None))
        if missing:
            fetched = fetch(missing)
            if fetched is None:
                return None
            stored, rows = self._store(fetched, missing, now)
            if names is not None and stored != names and len(missing) < len(ids):
                return fetch(ids)  # the cached rows have another reader's columns (never in one engine)
            names = stored
            by_id = dict(zip(missing, rows))
            cached = [row if row is not None else by_id[i] for i, row in zip(ids, cached)]
        if not names:
            return {}
        columns = list(zip(*cached)) if cached else [() for _ in names]
        return {name: list(values) for name, values in zip(names, columns)}

    def _fresh(self, item_id: int, now: float) -> Row | None:
        entry = self._rows.get(item_id)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def _store(self, columns: dict[str, list[Any]], ids: list[int], now: float) -> tuple[tuple[str, ...], list[Row]]:
        """Store the rows of ``columns`` (aligned with ``ids``); returns the column order and the
        rows. A batch with other columns (another reader) resets the cache to its own."""
        names = tuple(columns)
        rows = list(zip(*(columns[n] for n in names))) if names else [() for _ in ids]
        expires = now + self.ttl_s
        with self._lock:
            if names != self._names:
                self._rows.clear()
                self._names = names
            for item_id, row in zip(ids, rows):
                self._rows[item_id] = (expires, row)
                self._rows.move_to_end(item_id)
            while len(self._rows) > self.max_items:
                self._rows.popitem(last=False)
        return names, rows
