"""Retrieval: the two item indexes and candidate generation, shared by offline evaluation and the
online service so that both rank exactly the same candidates.

Candidates for a user, in this order, deduplicated (the first source wins) and without the items
the user has already seen:

1. ``als``: the ``n_als`` items with the highest inner product with the user's ALS vector
   (the ``user_to_item`` index), best first, ties by item id;
2. ``similar``: for each of the user's ``max_recent`` most recent items (most recent first), its
   ``n_similar`` nearest items by cosine (the ``item_to_item`` index), best first.

Every candidate carries its ALS score (user . item; NaN for a user without a vector), which the
ranker uses as a feature.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from recsys.arrays import replace_dir
from models.als import Factors
from models.index import IndexConfig, ItemIndex
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

SOURCE_ALS = "als"
SOURCE_SIMILAR = "similar"
_USER_TO_ITEM = "user_to_item"
_ITEM_TO_ITEM = "item_to_item"


def index_path(settings: Settings) -> Path:
    """``<data_path>/models/<dataset>/index/``: where ``recsys index build`` writes the indexes."""
    return settings.data_path / "models" / settings.dataset / "index"


@dataclass
class RetrievalIndex:
    """``user_to_item``: inner product over raw ALS item vectors (a user's score for an item);
    ``item_to_item``: cosine over the same vectors (similar items)."""

    user_to_item: ItemIndex
    item_to_item: ItemIndex

    @classmethod
    def build(cls, factors: Factors, categories: np.ndarray | None = None,
              config: IndexConfig | None = None) -> RetrievalIndex:
        """Both indexes over ``factors.items``; ``categories`` aligned with ``factors.item_ids``.
        The user -> item recall report searches with the users' own vectors."""
        queries = factors.users if len(factors.users) else None
        return cls(
            user_to_item=ItemIndex.build(factors.item_ids, factors.items, "ip", config, categories, queries),
            item_to_item=ItemIndex.build(factors.item_ids, factors.items, "cosine", config, categories),
        )

    @property
    def report(self) -> dict[str, Any]:
        return {_USER_TO_ITEM: self.user_to_item.report, _ITEM_TO_ITEM: self.item_to_item.report}

    def add_items(self, item_ids: np.ndarray, vectors: np.ndarray | None = None,
                  categories: np.ndarray | None = None) -> None:
        """New items in both indexes, no rebuild; no vector = the mean of its category's vectors."""
        raw = self.user_to_item.add_items(item_ids, vectors, categories)
        self.item_to_item.add_items(item_ids, raw, categories)

    def save(self, folder: Path) -> Path:
        def write(tmp: Path) -> None:
            self.user_to_item.save(tmp / _USER_TO_ITEM)
            self.item_to_item.save(tmp / _ITEM_TO_ITEM)
            (tmp / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")

        return replace_dir(folder, write)

    @classmethod
    def load(cls, folder: Path) -> RetrievalIndex:
        folder = Path(folder)
        return cls(ItemIndex.load(folder / _USER_TO_ITEM), ItemIndex.load(folder / _ITEM_TO_ITEM))


@dataclass(frozen=True)
class CandidateConfig:
    n_als: int = 100
    n_similar: int = 20
    max_recent: int = 5

    def __post_init__(self) -> None:
        if self.n_als < 0 or self.n_similar < 0 or self.max_recent < 0:
            raise ValueError(f"candidate counts must be >= 0, got {self}")
        if self.n_als == 0 and (self.n_similar == 0 or self.max_recent == 0):
            raise ValueError(f"{self} yields no candidates: set n_als, or n_similar and max_recent, above 0")


@dataclass(frozen=True)
class Candidates:
    """Row i: ``item_ids[i]`` found by ``sources[i]`` with ``scores[i]`` (its score there: inner
    product for ``als``, cosine for ``similar``) and ``als_scores[i]`` (user . item, or NaN)."""

    item_ids: np.ndarray
    scores: np.ndarray
    sources: tuple[str, ...]
    als_scores: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({S.COL_ITEM: self.item_ids, "score": self.scores, "source": list(self.sources),
                             "als_score": self.als_scores})


def _known(index: ItemIndex, item_ids: Sequence[int]) -> list[int]:
    ids = np.asarray(list(item_ids), dtype=np.int64)
    return ids[index.contains(ids)].tolist() if len(ids) else []


def generate_candidates(index: RetrievalIndex, user_vector: np.ndarray | None, recent_items: Sequence[int],
                        seen: Collection[int], config: CandidateConfig | None = None) -> Candidates:
    """Candidates for one user (module docstring). ``recent_items``: most recent first; ``seen``:
    every item the user has interacted with (removed). Deterministic for the same inputs."""
    cfg = config or CandidateConfig()
    seen_set = {int(i) for i in seen}
    taken: dict[int, tuple[float, str]] = {}
    has_vector = user_vector is not None and bool(np.any(user_vector))
    if has_vector and cfg.n_als:
        scores, ids = index.user_to_item.search(np.asarray(user_vector), cfg.n_als + len(seen_set))
        _take(taken, ids[0], scores[0], seen_set, cfg.n_als, SOURCE_ALS)
    recent = _known(index.item_to_item, list(recent_items)[: cfg.max_recent]) if cfg.n_similar else []
    if recent:
        scores, ids = index.item_to_item.search(index.item_to_item.vectors(np.array(recent)),
                                                cfg.n_similar + len(seen_set) + len(taken) + 1)
        for row in range(len(recent)):
            _take(taken, ids[row], scores[row], seen_set, cfg.n_similar, SOURCE_SIMILAR)
    item_ids = np.fromiter(taken, dtype=np.int64, count=len(taken))
    if has_vector and len(item_ids):
        als_scores = index.user_to_item.vectors(item_ids) @ np.asarray(user_vector, dtype=np.float32)
    else:
        als_scores = np.full(len(item_ids), np.nan, dtype=np.float32)
    return Candidates(item_ids, np.array([s for s, _ in taken.values()], dtype=np.float32),
                      tuple(src for _, src in taken.values()), als_scores.astype(np.float32))


def _take(taken: dict[int, tuple[float, str]], ids: np.ndarray, scores: np.ndarray, seen: set[int],
          limit: int, source: str) -> None:
    """Append up to ``limit`` new items of one ranked list (skipping padding, seen and taken)."""
    added = 0
    for item, score in zip(ids.tolist(), scores.tolist()):
        if added >= limit:
            break
        if item < 0 or item in seen or item in taken:
            continue
        taken[item] = (score, source)
        added += 1


def history(train: pd.DataFrame, max_recent: int) -> tuple[dict[int, list[int]], dict[int, set[int]]]:
    """(recent, seen) per user from interaction rows (user_id, item_id, event_timestamp): the
    ``max_recent`` most recent distinct items (latest first, ties by item id) and all items."""
    last = train.groupby([S.COL_USER, S.COL_ITEM], as_index=False)[S.COL_TS].max()
    last = last.sort_values([S.COL_USER, S.COL_TS, S.COL_ITEM], ascending=[True, False, True])
    recent = {int(u): g[S.COL_ITEM].head(max_recent).astype(int).tolist() for u, g in last.groupby(S.COL_USER)}
    seen = {int(u): set(g[S.COL_ITEM].astype(int).tolist()) for u, g in last.groupby(S.COL_USER)}
    return recent, seen


def generate_candidates_batch(index: RetrievalIndex, factors: Factors, users: Sequence[int],
                              recent: Mapping[int, Sequence[int]], seen: Mapping[int, Collection[int]],
                              config: CandidateConfig | None = None, progress: bool = True) -> dict[int, Candidates]:
    """:func:`generate_candidates` for many users (offline evaluation, precomputation)."""
    vectors, known = factors.user_vectors(np.asarray(users, dtype=np.int64))
    out: dict[int, Candidates] = {}
    for row, user in enumerate(tqdm(users, desc="candidates", unit="user", disable=not progress)):
        out[int(user)] = generate_candidates(index, vectors[row] if known[row] else None,
                                             recent.get(int(user), []), seen.get(int(user), ()), config)
    return out
