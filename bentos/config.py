"""The serving configuration every stage of /recommend reads: candidate quotas, cold start,
exploration, cache size and TTL, the ranker's time budget, the Redis retry window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServingConfig:
    n_candidates: int = 150
    n_als: int = 50
    n_similar: int = 10
    n_content: int = 30
    n_trending: int = 20
    cold_start_threshold: int = 10
    exploration_every: int = 5  # cold start: every 5th slot is an exploration item
    new_item_share: float = 0.1  # share of personalised answers that show one new item (exploration)
    new_item_days: int = 7
    cache_size: int = 100
    cache_ttl_s: int = 600
    ranker_timeout_ms: float = 50.0
    redis_retry_s: float = 1.0
    blend_weights: Mapping[str, float] = field(
        default_factory=lambda: {"als": 1.0, "similar": 0.8, "content": 0.5, "trending": 0.6})
