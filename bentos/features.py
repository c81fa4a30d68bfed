"""The features stage of /recommend: the online features a request reads (the user's row, the
items bought, the candidates' rows), each read through the Redis breaker, and the user as the
later stages see it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from bentos.breaker import RedisBreaker
from bentos.item_cache import ItemFeatureCache
from recsys.schema import purchased_key  # one definition: the stream writes the set

__all__ = ["ITEM_FEATURES", "USER_FEATURES", "OnlineFeatures", "UserFeatures", "purchased_key"]

USER_FEATURES = (
    "user_profile:n_events",
    "user_profile:n_events_7d",
    "user_profile:mean_rating",
    "user_profile:days_since_first_seen",
    "user_profile:top_categories",
    "user_realtime:last_5_items",
    "user_realtime:interaction_count",
    "user_realtime:total_purchases",
    "user_realtime:preferred_categories",
    "user_embedding:user_embedding",
)
ITEM_FEATURES = (
    "item_profile:category_id",
    "item_profile:inventory",
    "item_profile:margin",
    "item_profile:quality_score",
    "item_profile:popularity_1d",
    "item_profile:popularity_7d",
    "item_profile:title",
    "item_profile:price",
    "item_profile:image_url",
    "item_embedding:item_embedding",
)


@dataclass(frozen=True)
class UserFeatures:
    """One user's online row (``values``, what the ranker reads) and what the stages derive from it."""

    values: Mapping[str, Any]
    interactions: int  # history and stream together: the cold-start test
    recent: list[int]  # the last items, most recent first
    vector: np.ndarray | None  # the user embedding, None when absent
    preferred_categories: list[int]  # from the stream (cold start, the new-item slot)
    categories: list[int]  # preferred, else the profile's top categories (trending)

    @classmethod
    def from_row(cls, values: Mapping[str, Any]) -> UserFeatures:
        vector = values.get("user_embedding")
        return cls(
            values=values,
            interactions=max(int(values.get("n_events") or 0), int(values.get("interaction_count") or 0)),
            recent=[int(i) for i in (values.get("last_5_items") or [])][::-1],
            vector=np.asarray(vector, dtype=np.float32) if vector else None,
            preferred_categories=[int(c) for c in (values.get("preferred_categories") or [])],
            categories=[int(c) for c in (values.get("preferred_categories") or values.get("top_categories") or [])],
        )


class OnlineFeatures:
    """The request's reads of the online store (Redis): None or empty when Redis is unavailable,
    with the reason appended (the answer is then flagged degraded)."""

    def __init__(self, read_features: Callable[[int | None, Sequence[int]], Any], client: redis.Redis,
                 breaker: RedisBreaker, item_cache: ItemFeatureCache | None = None) -> None:
        self.read_features = read_features
        self.client = client
        self.breaker = breaker
        self.item_cache = item_cache if item_cache is not None else ItemFeatureCache(0.0, 1)  # default: none

    def user(self, user_id: int, reasons: list[str]) -> UserFeatures | None:
        """The user's row in one pipelined read; an unknown user has an empty row (cold start)."""
        ok, row = self.breaker.call(lambda: self.read_features(user_id, []), reasons, "features")
        return UserFeatures.from_row(row.user) if ok else None

    def purchased(self, user_id: int, reasons: list[str]) -> set[int]:
        ok, members = self.breaker.call(lambda: self.client.smembers(purchased_key(user_id)), reasons, "purchases")
        return {int(m) for m in members} if ok and members else set()

    def items(self, item_ids: Sequence[int], reasons: list[str]) -> dict[str, list[Any]] | None:
        """The candidates' rows, one list per feature aligned with ``item_ids``: from the near
        cache where fresh, the rest in one read (bentos.item_cache)."""
        def fetch(ids: list[int]) -> dict[str, list[Any]] | None:
            ok, row = self.breaker.call(lambda: self.read_features(None, ids), reasons, "item features")
            return row.items if ok else None

        return self.item_cache.read(item_ids, fetch)
