"""Candidate generation: ALS top-N plus items similar to recent ones, deduplicated, seen removed,
deterministic, and the same after the indexes are saved and loaded."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.als import Factors
from models.retrieval import (
    SOURCE_ALS,
    SOURCE_SIMILAR,
    CandidateConfig,
    RetrievalIndex,
    generate_candidates,
    generate_candidates_batch,
    history,
)
from recsys import schema as S

CUTOFF = datetime(2026, 1, 1, tzinfo=timezone.utc)
# items 1..6 on a circle of 2-D directions, different lengths
ITEM_VECTORS = np.array([[1, 0], [2, 0.2], [0, 1], [0.1, 3], [-1, 0], [0, -1]], dtype=np.float32)


@pytest.fixture()
def factors() -> Factors:
    users = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)  # user 2 has a zero vector
    return Factors(np.array([1, 2]), users, np.arange(1, 7), ITEM_VECTORS, CUTOFF)


@pytest.fixture()
def index(factors: Factors) -> RetrievalIndex:
    return RetrievalIndex.build(factors, categories=np.array([0, 0, 1, 1, 2, 2]))


def test_als_then_similar_deduplicated_and_seen_removed(index: RetrievalIndex) -> None:
    cfg = CandidateConfig(n_als=2, n_similar=2, max_recent=1)
    got = generate_candidates(index, np.array([1.0, 0.0]), recent_items=[3], seen={2, 3}, config=cfg)
    # ALS (u . v): 2 -> 2.0 (seen), 1 -> 1.0, 4 -> 0.1, 3 -> 0 (seen), 6 -> 0, 5 -> -1: top 2 unseen = 1, 4
    # similar to item 3 (cosine): 3 -> 1 (seen), 4 -> 0.9994 (taken), 2 -> 0.0995 (seen),
    #   1 -> 0 (taken), 5 -> 0 (tie with 1, after it by id), 6 -> -1: the two new ones are 5 and 6
    assert got.item_ids.tolist() == [1, 4, 5, 6]
    assert got.sources == (SOURCE_ALS, SOURCE_ALS, SOURCE_SIMILAR, SOURCE_SIMILAR)
    assert got.als_scores == pytest.approx([1.0, 0.1, -1.0, 0.0])
    assert got.scores[:2] == pytest.approx([1.0, 0.1])


def test_user_without_vector_gets_similar_items_only(index: RetrievalIndex) -> None:
    got = generate_candidates(index, None, recent_items=[1], seen={1}, config=CandidateConfig(n_similar=1))
    assert got.item_ids.tolist() == [2]  # cosine(1, 2) = 0.995: the nearest other item
    assert got.sources == (SOURCE_SIMILAR,) and np.isnan(got.als_scores).all()


def test_unknown_recent_items_and_large_k(index: RetrievalIndex) -> None:
    got = generate_candidates(index, np.array([1.0, 0.0]), recent_items=[999], seen=set(),
                              config=CandidateConfig(n_als=100))
    assert sorted(got.item_ids.tolist()) == [1, 2, 3, 4, 5, 6]  # k over the index size: all, no -1
    assert got.sources == (SOURCE_ALS,) * 6


def test_deterministic_batch_and_reload(index: RetrievalIndex, factors: Factors, tmp_path: Path) -> None:
    train = pd.DataFrame({S.COL_USER: [1, 1, 2], S.COL_ITEM: [3, 5, 4],
                          S.COL_TS: pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-01"], utc=True)})
    recent, seen = history(train, max_recent=5)
    assert recent == {1: [5, 3], 2: [4]} and seen == {1: {3, 5}, 2: {4}}
    cfg = CandidateConfig(n_als=3, n_similar=2, max_recent=2)
    first = generate_candidates_batch(index, factors, [1, 2], recent, seen, cfg, progress=False)
    second = generate_candidates_batch(RetrievalIndex.load(index.save(tmp_path / "index")), factors, [1, 2],
                                       recent, seen, cfg, progress=False)
    for user in (1, 2):
        assert first[user].item_ids.tolist() == second[user].item_ids.tolist()
        assert np.array_equal(first[user].scores, second[user].scores)
        assert not set(first[user].item_ids.tolist()) & seen[user]
    assert first[2].sources == (SOURCE_SIMILAR,) * len(first[2])  # user 2's vector is zero


def test_add_items_reaches_both_indexes(index: RetrievalIndex) -> None:
    index.add_items(np.array([7]), None, np.array([1]))  # category 1 = items 3, 4: mean (0.05, 2.0)
    assert index.user_to_item.vectors(np.array([7]))[0] == pytest.approx([0.05, 2.0])
    got = generate_candidates(index, None, recent_items=[4], seen={4}, config=CandidateConfig(n_similar=1))
    assert got.item_ids.tolist() == [7]  # cosine(4, 7) = 0.99998 beats item 3


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="yields no candidates"):
        CandidateConfig(n_als=0, n_similar=0)
