"""The catalogue held in the service's memory: metadata, popularity, and the category/tag index.

Built at start-up from the latest ``item_profile`` snapshot (the offline table behind the Feast
view), it serves three needs that must not depend on Redis being up:

- the content strategy (items by category and by tag, most popular first);
- cold start (popular items per category and overall, plus exploration items);
- the degraded path when Redis is down (popular items, with their metadata).

Per-request item features still come from the online store, which is fresher (stock).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from recsys.arrays import positions
from recsys import feature_tables as T
from recsys import schema as S

log = logging.getLogger(__name__)

_META = ("title", "price", "image_url")
#: the business rules' inputs, kept as float arrays (NaN when missing) for per-request gathers
RULE_COLUMNS = (S.COL_CATEGORY, "inventory", "margin", "quality_score")


@dataclass
class ItemCatalog:
    """Items as aligned arrays, sorted by id; ``pos`` maps an item id to its row."""

    frame: pd.DataFrame  # index = item_id; columns of item_profile
    snapshot_time: datetime | None = None
    by_category: dict[int, np.ndarray] = field(default_factory=dict)
    by_tag: dict[str, np.ndarray] = field(default_factory=dict)
    popular: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # in-stock items newest first, with minus their creation times (UTC ns, so ascending) and
    # their categories, aligned: new_items() is a binary search, not a pass over the catalogue
    newest: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    newest_minus_created: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    newest_category: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _ids: np.ndarray = field(init=False, repr=False)
    _rule_values: dict[str, np.ndarray] = field(init=False, repr=False)
    _meta: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reindex()

    @classmethod
    def from_item_profile(cls, table_path: Path) -> ItemCatalog:
        """The latest snapshot row of every item in the item_profile table."""
        dataset = pads.dataset(table_path, format="parquet", partitioning="hive")
        frame = dataset.to_table().to_pandas()
        if frame.empty:
            log.warning("item_profile at %s is empty: the catalogue starts empty", table_path)
            return cls(frame=_empty_frame())
        frame = frame.sort_values([S.COL_ITEM, S.COL_TS]).groupby(S.COL_ITEM).tail(1).set_index(S.COL_ITEM)
        return cls(frame=frame.drop(columns=[T.SNAPSHOT_DATE, T.CREATED], errors="ignore").sort_index(),
                   snapshot_time=pd.Timestamp(frame[S.COL_TS].max()).to_pydatetime())

    def reindex(self) -> None:
        """Rebuild the popularity orders and lookup arrays (after loading or adding items)."""
        if not self.frame.index.is_monotonic_increasing:
            self.frame = self.frame.sort_index()
        f = self.frame
        # Per-request lookups gather from these by position (a binary search over the sorted ids):
        # a pandas reindex per request cost more than the rules themselves.
        self._ids = f.index.to_numpy(dtype=np.int64)
        self._rule_values = {c: pd.to_numeric(f[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                             for c in RULE_COLUMNS if c in f}
        self._meta = {c: np.array([None if _missing(v) else v for v in f[c].tolist()], dtype=object)
                      for c in _META if c in f}
        if f.empty:
            return
        in_stock = ~(f["inventory"].fillna(1) <= 0)
        # most popular first: 7-day popularity, then 1-day, then id (deterministic)
        ordered = f[in_stock].sort_values(["popularity_7d", "popularity_1d"], ascending=False, kind="stable")
        self.popular = ordered.index.to_numpy(dtype=np.int64)
        # sort=False keeps groups in order of first appearance: categories ordered by their most
        # popular item, which cold start's round robin relies on
        self.by_category = {int(c): g.index.to_numpy(dtype=np.int64) for c, g in ordered.groupby(S.COL_CATEGORY, sort=False)}
        tags = ordered["tags"].explode().dropna()
        self.by_tag = {str(t): g.index.to_numpy(dtype=np.int64) for t, g in tags.groupby(tags, sort=False)}
        created = pd.to_datetime(f.loc[in_stock, S.COL_CREATED_AT], utc=True).dropna()
        created = created.sort_values(ascending=False, kind="stable")  # ties: by id, as the frame is
        self.newest = created.index.to_numpy(dtype=np.int64)
        self.newest_minus_created = -created.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
        self.newest_category = f[S.COL_CATEGORY].reindex(created.index).fillna(-1).to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frame)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.frame.index

    def _positions(self, item_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in the sorted id array, and whether the id is in the catalogue at all."""
        return positions(self._ids, np.asarray(item_ids, dtype=np.int64).reshape(-1))

    def rule_values(self, item_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """category_id, inventory, margin, quality_score per item as floats, NaN when unknown."""
        pos, found = self._positions(item_ids)
        return {c: np.where(found, self._rule_values[c][pos], np.nan) if c in self._rule_values
                else np.full(len(pos), np.nan) for c in RULE_COLUMNS}

    def category_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """Category per item, -1 when unknown."""
        cats = self.rule_values(item_ids)[S.COL_CATEGORY]
        return np.nan_to_num(cats, nan=-1).astype(np.int64)

    def tags_of(self, item_id: int) -> list[str]:
        if item_id not in self.frame.index:
            return []
        tags = self.frame.at[item_id, "tags"]
        return [] if tags is None else [str(t) for t in tags]

    def metadata(self, item_ids: Sequence[int]) -> dict[str, list[object]]:
        """title, price, image_url per item (None when unknown)."""
        pos, found = self._positions(item_ids)
        ok = found.tolist()
        return {c: [v if hit else None for v, hit in zip(self._meta[c][pos].tolist(), ok)] if c in self._meta
                else [None] * len(ok) for c in _META}

    def new_items(self, now: datetime, days: int = 7, categories: Iterable[int] | None = None) -> np.ndarray:
        """Items created in the last ``days`` (newest first), optionally within ``categories``."""
        cutoff = pd.Timestamp(now - timedelta(days=days)).value  # UTC ns (a naive time is read as UTC)
        # created > cutoff  <=>  -created < -cutoff: the leading run of the ascending key
        n = int(np.searchsorted(self.newest_minus_created, -cutoff, side="left"))
        ids = self.newest[:n]
        if categories is not None:
            ids = ids[np.isin(self.newest_category[:n], list(categories))]
        return ids

    def add(self, item: dict[str, object]) -> None:
        """Add or replace one item (POST /items) and refresh the orders."""
        row = pd.DataFrame([item]).set_index(S.COL_ITEM)
        self.frame = pd.concat([self.frame.drop(index=row.index, errors="ignore"), row]).sort_index()
        self.reindex()


def _empty_frame() -> pd.DataFrame:
    cols = [f.name for f in T.table_schema(T.ITEM_PROFILE) if f.name != S.COL_ITEM]
    return pd.DataFrame(columns=cols, index=pd.Index([], name=S.COL_ITEM, dtype=np.int64))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT
