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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from recsys import feature_tables as T
from recsys import schema as S

log = logging.getLogger(__name__)

_META = ("title", "price", "image_url")


@dataclass
class ItemCatalog:
    """Items as aligned arrays, sorted by id; ``pos`` maps an item id to its row."""

    frame: pd.DataFrame  # index = item_id; columns of item_profile
    snapshot_time: datetime | None = None
    by_category: dict[int, np.ndarray] = field(default_factory=dict)
    by_tag: dict[str, np.ndarray] = field(default_factory=dict)
    popular: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

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
        """Rebuild the popularity orders (after loading or adding items)."""
        f = self.frame
        if f.empty:
            return
        in_stock = ~(f["inventory"].fillna(1) <= 0)
        # most popular first: 7-day popularity, then 1-day, then id (deterministic)
        ordered = f[in_stock].sort_values(["popularity_7d", "popularity_1d"], ascending=False, kind="stable")
        self.popular = ordered.index.to_numpy(dtype=np.int64)
        self.by_category = {int(c): g.index.to_numpy(dtype=np.int64) for c, g in ordered.groupby(S.COL_CATEGORY, sort=False)}
        tags = ordered["tags"].explode().dropna()
        self.by_tag = {str(t): g.index.to_numpy(dtype=np.int64) for t, g in tags.groupby(tags, sort=False)}

    def __len__(self) -> int:
        return len(self.frame)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.frame.index

    def category_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """Category per item, -1 when unknown."""
        cats = self.frame[S.COL_CATEGORY].reindex(list(item_ids))
        return cats.fillna(-1).to_numpy(dtype=np.int64)

    def tags_of(self, item_id: int) -> list[str]:
        if item_id not in self.frame.index:
            return []
        tags = self.frame.at[item_id, "tags"]
        return [] if tags is None else [str(t) for t in tags]

    def metadata(self, item_ids: Sequence[int]) -> dict[str, list[object]]:
        """title, price, image_url per item (None when unknown)."""
        rows = self.frame.reindex(list(item_ids))
        return {col: [None if pd.isna(v) else v for v in rows[col].tolist()] for col in _META}

    def facts(self, item_ids: Sequence[int]) -> pd.DataFrame:
        return self.frame.reindex(list(item_ids))

    def new_items(self, now: datetime, days: int = 7, categories: Iterable[int] | None = None) -> np.ndarray:
        """Items created in the last ``days`` (newest first), optionally within ``categories``."""
        f = self.frame
        if f.empty:
            return np.empty(0, dtype=np.int64)
        created = pd.to_datetime(f[S.COL_CREATED_AT], utc=True)
        mask = (created > pd.Timestamp(now) - timedelta(days=days)) & ~(f["inventory"].fillna(1) <= 0)
        if categories is not None:
            mask &= f[S.COL_CATEGORY].isin(list(categories))
        return created[mask].sort_values(ascending=False, kind="stable").index.to_numpy(dtype=np.int64)

    def add(self, item: dict[str, object]) -> None:
        """Add or replace one item (POST /items) and refresh the orders."""
        row = pd.DataFrame([item]).set_index(S.COL_ITEM)
        self.frame = pd.concat([self.frame.drop(index=row.index, errors="ignore"), row]).sort_index()
        self.reindex()


def _empty_frame() -> pd.DataFrame:
    cols = [f.name for f in T.table_schema(T.ITEM_PROFILE) if f.name != S.COL_ITEM]
    return pd.DataFrame(columns=cols, index=pd.Index([], name=S.COL_ITEM, dtype=np.int64))
