"""The stream's item catalogue: known item ids and their categories, reloaded when the items table changes."""

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
    changes (checked at most every ``refresh_s``), so new items are picked up without a restart."""

    def __init__(self, dataset_path: Path, refresh_s: float = 300.0) -> None:
        self.path = Path(dataset_path) / "items"
        self.refresh_s = refresh_s
        self._stamp: float | None = None
        self._checked = 0.0
        self.known_items = np.empty(0, dtype=np.int64)
        self._categories = np.empty(0, dtype=np.int64)
        self.maybe_reload(force=True)

    def _mtime(self) -> float:
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"no items table at {self.path}: run `recsys data generate` or `recsys data load PATH` first")
        return max((p.stat().st_mtime for p in self.path.glob("*.parquet")), default=0.0)

    def maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return
        self._checked = now
        stamp = self._mtime()
        if stamp == self._stamp:
            return
        table = pq.read_table(self.path, columns=[S.COL_ITEM, S.COL_CATEGORY]).to_pandas()
        table = table.sort_values(S.COL_ITEM)
        self.known_items = table[S.COL_ITEM].to_numpy(dtype=np.int64)
        self._categories = table[S.COL_CATEGORY].to_numpy(dtype=np.int64)
        self._stamp = stamp
        log.info("item catalogue loaded items=%d", len(self.known_items))

    def categories(self, item_ids: np.ndarray) -> np.ndarray:
        """The category of each item; -1 for an item outside the catalogue."""
        pos, known = positions(self.known_items, item_ids)
        return np.where(known, self._categories[pos], -1) if len(self.known_items) else np.full(len(pos), -1)
