"""The answer stage of /recommend: the :class:`Recommendation` type, and a ranked list turned into
the response's items (score, strategy, and metadata, fresher from the online store where present)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bentos.catalog import ItemCatalog
from bentos.experiments import Arm, ArmPolicy
from bentos.rules import Ruled

#: the item metadata an answer carries (the online store's values win over the catalogue's)
META_COLUMNS = ("title", "price", "image_url")


@dataclass
class Recommendation:
    user_id: int
    items: list[dict[str, Any]]
    cold_start: bool
    degraded: bool
    cached: bool
    model_versions: dict[str, str]
    degraded_reasons: list[str] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)  # the full top list (what the cache holds)
    arm: str | None = None  # the experiment's arm the user is in (bentos.experiments); None: no experiment

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "items": self.items, "cold_start": self.cold_start,
                "degraded": self.degraded, "cached": self.cached, "model_versions": self.model_versions,
                "degraded_reasons": self.degraded_reasons, "arm": self.arm}


@dataclass
class RankedList:
    """The final order, best first: ids, scores and strategies aligned, with the online store's
    metadata per item (None: the catalogue's only)."""

    item_ids: list[int]
    scores: np.ndarray
    strategies: list[str]
    metadata: dict[str, list[Any]] | None = None

    @classmethod
    def from_ruled(cls, ruled: Ruled, strategies: Sequence[str],
                   item_feats: Mapping[str, Sequence[Any]] | None = None) -> RankedList:
        """The survivors of the rules, with the strategy and online metadata of each, reordered."""
        order = ruled.positions.tolist()
        meta = {c: [item_feats[c][p] for p in order] for c in META_COLUMNS} if item_feats else None
        return cls(ruled.item_ids.tolist(), ruled.scores, [strategies[p] for p in order], meta)

    def __len__(self) -> int:
        return len(self.item_ids)

    def insert(self, slot: int, item_id: int, strategy: str) -> None:
        """Put one item at ``slot`` with the score already there (it takes the slot, not a rank)."""
        self.item_ids.insert(slot, item_id)
        self.scores = np.insert(self.scores, slot, self.scores[slot])
        self.strategies.insert(slot, strategy)
        if self.metadata is not None:
            for col in self.metadata:
                self.metadata[col].insert(slot, None)


class Answer:
    """Turns ranked lists into responses: the first ``cache_size`` items decorated, k shown."""

    def __init__(self, catalog: ItemCatalog, cache_size: int, model_versions: dict[str, str],
                 arms: ArmPolicy | None = None) -> None:
        self.catalog = catalog
        self.cache_size = cache_size
        self.model_versions = model_versions
        self.arms = arms or ArmPolicy(None, model_versions)

    def build(self, user_id: int, ranked: RankedList, k: int, cold_start: bool,
              reasons: list[str], arm: Arm | None = None) -> Recommendation:
        """A fresh answer: degraded when any stage gave a reason; ``top`` is what the cache holds;
        in an experiment it carries the arm and the arm's model versions."""
        items = self.items(ranked.item_ids, ranked.scores.tolist(), ranked.strategies,
                           ranked.metadata)[: self.cache_size]
        rec = Recommendation(user_id, items[:k], cold_start, bool(reasons), False, self.arms.versions(arm), reasons,
                             arm=arm.name if arm is not None else None)
        rec.top = items
        return rec

    def items(self, item_ids: Sequence[int], scores: Sequence[float], strategies: Sequence[str],
              item_feats: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """One response item per id, with the catalogue's metadata unless the online store has it."""
        meta = self.catalog.metadata(item_ids)
        if item_feats is not None:  # fresher values from the online store where present
            for col in META_COLUMNS:
                online = item_feats.get(col)
                if online is not None:
                    meta[col] = [o if o is not None else m for o, m in zip(online, meta[col])]
        return [{"item_id": int(i), "score": round(float(s), 6), "title": t, "price": p, "image_url": u,
                 "strategy": st}
                for i, s, st, t, p, u in zip(item_ids, scores, strategies, meta["title"], meta["price"],
                                             meta["image_url"])]
