"""Business rules applied to scored candidates, after ranking and before the response.

Scores enter in [0, 1] (see :func:`to_unit`): a multiplier must mean the same thing for every
scorer, and x0.8 on a negative logit would *raise* it. The rules, in order:

1. removed: out of stock (``inventory == 0``) and items the user already purchased;
2. margin (a fraction) over 0.3: x1.1;
3. quality score (0 to 5) under 3.0: x0.8;
4. trending: x1.05;
5. diversity: at most 3 items per category in the top 10 (greedy by score; an item over the cap
   moves down, after the top 10, keeping its order). When too few items of other categories
   remain to fill the top 10, over-cap items fill it, best first: a full list beats a short one.

A missing feature never triggers a rule: unknown stock is kept, unknown margin or quality is
neither boosted nor penalised. Ties in final score are broken by item id (ascending). The rules'
inputs (:func:`facts_for`) are the online features, else the in-memory catalogue's values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bentos.catalog import ItemCatalog
from recsys import schema as S

MARGIN_THRESHOLD = 0.3
MARGIN_BOOST = 1.1
QUALITY_THRESHOLD = 3.0
QUALITY_PENALTY = 0.8
TRENDING_BOOST = 1.05
MAX_PER_CATEGORY = 3
DIVERSITY_DEPTH = 10


def to_unit(scores: np.ndarray, kind: str) -> np.ndarray:
    """Map raw scores to [0, 1] monotonically: ``logit`` -> sigmoid, ``cosine`` -> (c + 1) / 2,
    ``unit`` -> clipped as is. Per item, so a score does not depend on the other candidates."""
    x = np.asarray(scores, dtype=np.float64)
    if kind == "logit":
        return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))
    if kind == "cosine":
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    if kind == "unit":
        return np.clip(x, 0.0, 1.0)
    raise ValueError(f"unknown score kind {kind!r}: choose logit, cosine or unit")


@dataclass(frozen=True)
class ItemFacts:
    """What the rules read about each candidate, aligned arrays (NaN / -1 = unknown)."""

    item_ids: np.ndarray  # int64
    category: np.ndarray  # int64, -1 unknown
    inventory: np.ndarray  # float64, NaN unknown
    margin: np.ndarray  # float64, NaN unknown
    quality: np.ndarray  # float64, NaN unknown
    trending: np.ndarray  # bool


def facts_for(catalog: ItemCatalog, item_ids: Sequence[int], trending: Collection[int] = frozenset(),
              online: Mapping[str, Sequence[Any]] | None = None) -> ItemFacts:
    """Rule inputs of ``item_ids``: the online features (``online``, aligned with the ids) where
    present, the catalogue's value for each missing one."""
    f = catalog.rule_values(item_ids)
    base = ItemFacts(
        item_ids=np.asarray(item_ids, dtype=np.int64),
        category=np.nan_to_num(f[S.COL_CATEGORY], nan=-1).astype(np.int64),
        inventory=f["inventory"], margin=f["margin"], quality=f["quality_score"],
        trending=np.array([i in trending for i in item_ids], dtype=bool),
    )
    if online is None:
        return base

    def merged(name: str, fallback: np.ndarray) -> np.ndarray:
        values = np.array([np.nan if v is None else float(v) for v in online[name]], dtype=np.float64)
        return np.where(np.isnan(values), fallback, values)

    category = merged(S.COL_CATEGORY, base.category.astype(np.float64))
    return ItemFacts(
        item_ids=base.item_ids, category=np.nan_to_num(category, nan=-1).astype(np.int64),
        inventory=merged("inventory", base.inventory), margin=merged("margin", base.margin),
        quality=merged("quality_score", base.quality), trending=base.trending)


@dataclass(frozen=True)
class Ruled:
    """The candidates that survive, best first, with their final scores."""

    item_ids: np.ndarray
    scores: np.ndarray
    positions: np.ndarray  # index of each survivor in the input arrays


def apply_rules(scores01: np.ndarray, facts: ItemFacts, purchased: Collection[int] = ()) -> Ruled:
    """Rules 1-5 of the module docstring. ``scores01`` must already be in [0, 1]."""
    scores = np.asarray(scores01, dtype=np.float64)
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError("apply_rules needs scores in [0, 1]: map them with to_unit() first")
    ids = np.asarray(facts.item_ids, dtype=np.int64)
    keep = ~(facts.inventory == 0)  # NaN (unknown) compares False: kept
    if purchased:
        keep &= ~np.isin(ids, np.fromiter((int(p) for p in purchased), dtype=np.int64))
    final = scores.copy()
    final[facts.margin > MARGIN_THRESHOLD] *= MARGIN_BOOST
    final[facts.quality < QUALITY_THRESHOLD] *= QUALITY_PENALTY
    final[np.asarray(facts.trending, dtype=bool)] *= TRENDING_BOOST
    positions = np.flatnonzero(keep)
    order = positions[np.lexsort((ids[positions], -final[positions]))]
    order = diversify(order, facts.category)
    return Ruled(ids[order], final[order], order)


def diversify(order: np.ndarray, category: np.ndarray, depth: int = DIVERSITY_DEPTH,
              cap: int = MAX_PER_CATEGORY) -> np.ndarray:
    """Reorder ``order`` (best first) so no category (>= 0) has more than ``cap`` of the first
    ``depth``; unknown categories (-1) are never capped."""
    top: list[int] = []
    deferred: list[int] = []
    counts: dict[int, int] = {}
    rest_start = len(order)
    for n, pos in enumerate(order.tolist()):
        if len(top) >= depth:
            rest_start = n
            break
        cat = int(category[pos])
        if cat >= 0 and counts.get(cat, 0) >= cap:
            deferred.append(pos)
            continue
        counts[cat] = counts.get(cat, 0) + 1
        top.append(pos)
    return np.array(top + deferred + order[rest_start:].tolist(), dtype=np.int64)
