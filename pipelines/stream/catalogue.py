"""The stream's item catalogue: known item ids and their categories, reloaded when the items table
changes (new items are appended to it while serving: :func:`pipelines.live_log.append_live_item`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recsys import schema as S
from recsys.arrays import positions

log = logging.getLogger(__name__)


class ItemCatalogue:
    """Known item ids and their categories, from the canonical items table; reloaded when the table
    changes: checked every ``refresh_s``, and at most every ``min_reload_s`` when an event names an
    unknown item (:meth:`reload_now`), so new items are picked up without a restart."""

    def __init__(self, dataset_path: Path, refresh_s: float = 300.0, min_reload_s: float = 1.0) -> None:
        self.path = Path(dataset_path) / "items"
        self.refresh_s = refresh_s
        self.min_reload_s = min_reload_s
        self._stamp: tuple[int, float] | None = None
        self._checked = 0.0
        self.known_items = np.empty(0, dtype=np.int64)
        self._categories = np.empty(0, dtype=np.int64)
        self.maybe_reload(force=True)

    def _table_stamp(self) -> tuple[int, float]:
        """(files, latest modification): a file added or replaced changes it."""
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"no items table at {self.path}: run `recsys data generate` or `recsys data load PATH` first")
        mtimes = [p.stat().st_mtime for p in self.path.glob("*.parquet")]
        return len(mtimes), max(mtimes, default=0.0)

    def reload_now(self) -> bool:
        """Reload if the table changed and the last check is ``min_reload_s`` old; True if it did."""
        if time.monotonic() - self._checked < self.min_reload_s:
            return False
        return self.maybe_reload(force=True)

    def maybe_reload(self, force: bool = False) -> bool:
        """Reload if ``refresh_s`` passed (or ``force``) and the table changed; True if it did."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return False
        self._checked = now
        stamp = self._table_stamp()
        if stamp == self._stamp:
            return False
        table = pq.read_table(self.path, columns=[S.COL_ITEM, S.COL_CATEGORY]).to_pandas()
        table = table.sort_values(S.COL_ITEM)
        self.known_items = table[S.COL_ITEM].to_numpy(dtype=np.int64)
        self._categories = table[S.COL_CATEGORY].to_numpy(dtype=np.int64)
        self._stamp = stamp
        log.info("item catalogue loaded items=%d", len(self.known_items))
        return True

    def categories(self, item_ids: np.ndarray) -> np.ndarray:
        """The category of each item; -1 for an item outside the catalogue."""
        pos, known = positions(self.known_items, item_ids)
        return np.where(known, self._categories[pos], -1) if len(self.known_items) else np.full(len(pos), -1)
