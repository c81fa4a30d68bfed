"""The precompute job: active users of the last 24 h -> recommendations -> the Redis cache.

Users are ranked by their number of events in the window. The most active ``hot_share`` (10%)
are the *hot* tier: their answers are kept longer (``hot_ttl_s``) and a cheaper run with
``tier="hot"`` refreshes only them, so it can be scheduled more often (e.g. every 10 minutes,
beside an hourly full run). Every answer is computed exactly as ``/recommend`` computes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from tqdm.auto import tqdm

from bentos.cache import cache_key, cache_payload
from bentos.engine import RecommendationEngine
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeConfig:
    window_hours: int = 24
    hot_share: float = 0.10
    ttl_s: int = 1_800
    hot_ttl_s: int = 7_200
    batch: int = 200

    def __post_init__(self) -> None:
        if not 0.0 <= self.hot_share <= 1.0:
            raise ValueError(f"hot_share={self.hot_share} must be within [0, 1]")
        if self.window_hours < 1 or self.ttl_s < 1 or self.hot_ttl_s < 1 or self.batch < 1:
            raise ValueError(f"window_hours, ttl_s, hot_ttl_s and batch must be >= 1: {self}")


@dataclass(frozen=True)
class PrecomputeStats:
    active_users: int
    hot_users: int
    written: int
    degraded: int


def active_users(settings: Settings, now: datetime, hours: int) -> pd.Series:
    """Events per user in (now - hours, now], most active first (ties by user id)."""
    dataset = pads.dataset(settings.dataset_path / "events", format="parquet")
    start = pd.Timestamp(now) - timedelta(hours=hours)
    table = dataset.to_table(columns=[S.COL_USER],
                             filter=(pads.field(S.COL_TS) > start) & (pads.field(S.COL_TS) <= pd.Timestamp(now)))
    counts = table.column(S.COL_USER).to_pandas().value_counts()
    return counts.sort_index().sort_values(ascending=False, kind="stable")


def precompute(engine: RecommendationEngine, users: pd.Series, config: PrecomputeConfig | None = None,
               tier: Literal["all", "hot"] = "all", progress: bool = True) -> PrecomputeStats:
    """Compute and cache recommendations for ``users`` (a Series user_id -> activity, most active first)."""
    cfg = config or PrecomputeConfig()
    n_hot = int(np.ceil(len(users) * cfg.hot_share))
    ids = users.index.to_numpy(dtype=np.int64)
    chosen = ids[:n_hot] if tier == "hot" else ids
    written = degraded = 0
    for lo in tqdm(range(0, len(chosen), cfg.batch), desc=f"precompute ({tier})", unit="batch", disable=not progress):
        pipe = engine.client.pipeline(transaction=False)
        for pos, user in enumerate(chosen[lo:lo + cfg.batch].tolist(), start=lo):
            rec = engine.recommend(int(user), k=engine.config.cache_size, use_cache=False)
            if rec.degraded:  # never cache a degraded answer: the live path will retry
                degraded += 1
                continue
            ttl = cfg.hot_ttl_s if pos < n_hot else cfg.ttl_s
            pipe.set(cache_key(int(user)), cache_payload(rec), ex=ttl)
            written += 1
        pipe.execute()
    stats = PrecomputeStats(len(users), n_hot, written, degraded)
    log.info("precompute %s: %s", tier, stats)
    return stats
