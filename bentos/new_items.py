"""Items added while serving, and the lock that keeps a model swap from losing one.

A hot reload (:mod:`bentos.reload`) builds new engines off the request path: their catalogue and
indexes are read, and the items added while serving replayed from the log, at the start of a
build that may take seconds. An item that ``POST /items`` (or another worker's broadcast) adds
after that point reaches only the engines being replaced. :class:`ItemJournal` closes the gap: it
remembers when each item was added, and :meth:`ItemJournal.swap` adds every item added since the
build began to the new engines and swaps them in under the same lock as :meth:`ItemJournal.add`,
so an item is added either before the swap (and then replayed into the new engines) or after it
(and then added to them directly). Adding an item twice is harmless: the catalogue replaces the
row, and an index that holds the item keeps its vector.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

#: how many recent additions are remembered; a build replays the log too, so only the items added
#: during one build must fit
JOURNAL_SIZE = 100_000


class AddsItems(Protocol):
    def add_item(self, item: Mapping[str, Any]) -> str: ...


class ItemJournal:
    """Adds items to the current engines and replays the recent ones into engines being swapped in."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, size: int = JOURNAL_SIZE) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._added: deque[tuple[float, Mapping[str, Any]]] = deque(maxlen=size)

    def now(self) -> float:
        """The journal's clock: what a build reads before it starts, to pass to :meth:`swap`."""
        return self._clock()

    def add(self, current: Callable[[], AddsItems], item: Mapping[str, Any]) -> str:
        """Add ``item`` to the engines serving now; returns where its vector came from."""
        with self._lock:
            source = current().add_item(item)
            self._added.append((self._clock(), item))
            return source

    def swap(self, engines: AddsItems, since: float, assign: Callable[[Any], None]) -> int:
        """Add the items added at or after ``since`` to ``engines``, then ``assign`` them, with no
        addition in between. Returns how many items were replayed."""
        with self._lock:
            late = [item for at, item in self._added if at >= since]
            for item in late:
                engines.add_item(item)
            assign(engines)
            return len(late)
