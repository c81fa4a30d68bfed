"""FAISS item indexes: exact results, ids and padding, new items, save/load, and HNSW recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.index import IndexConfig, ItemIndex, exact_search, recall_against

IDS = np.array([10, 20, 30, 40])
VECTORS = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]], dtype=np.float32)


def test_inner_product_scores_and_item_ids() -> None:
    index = ItemIndex.build(IDS, VECTORS, "ip")
    scores, ids = index.search(np.array([1.0, 1.0]), 3)
    # u . v: 10 -> 1, 20 -> 2, 30 -> 6, 40 -> -1
    assert ids.tolist() == [[30, 20, 10]]
    assert scores.tolist() == [[6.0, 2.0, 1.0]]
    assert index.kind == "flat" and index.report["recall_at_k"] == 1.0


def test_cosine_ignores_length() -> None:
    index = ItemIndex.build(IDS, VECTORS, "cosine")
    scores, ids = index.search(np.array([1.0, 1.0]), 2)
    # cos: 30 -> 1.0, then 10 and 20 tie at 0.707107: the lower item id first
    assert ids.tolist() == [[30, 10]]
    assert scores[0] == pytest.approx([1.0, 0.707107], abs=1e-6)


def test_k_larger_than_index_is_trimmed_without_padding_ids() -> None:
    index = ItemIndex.build(IDS, VECTORS, "ip")
    scores, ids = index.search(np.array([[1.0, 1.0], [0.0, 1.0]]), 50)
    assert ids.shape == (2, 4) and (ids >= 0).all()
    assert np.isfinite(scores).all()


def test_new_item_gets_its_category_mean() -> None:
    index = ItemIndex.build(IDS, VECTORS, "ip", categories=np.array([1, 1, 2, 2]))
    used = index.add_items(np.array([50, 60]), None, np.array([1, 7]))
    # category 1 = mean of items 10 and 20 = (0.5, 1.0); category 7 is new: the mean of all 4 items
    assert used[0].tolist() == [0.5, 1.0]
    assert used[1] == pytest.approx([0.75, 1.25])
    assert len(index) == 6 and index.contains(np.array([50, 60, 70])).tolist() == [True, True, False]
    _, ids = index.search(np.array([0.0, 1.0]), 6)
    assert 50 in ids[0]
    with pytest.raises(ValueError, match=r"items \[50\] are already in the index"):
        index.add_items(np.array([50]), np.array([[1.0, 1.0]]))


def test_new_item_with_its_own_vector() -> None:
    index = ItemIndex.build(IDS, VECTORS, "cosine")
    index.add_items(np.array([99]), np.array([[0.0, -5.0]]))
    _, ids = index.search(np.array([0.0, -1.0]), 1)
    assert ids.tolist() == [[99]]
    assert index.vectors(np.array([99])).tolist() == [[0.0, -1.0]]  # stored normalized for cosine


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="metric='l2'"):
        ItemIndex.build(IDS, VECTORS, "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicates"):
        ItemIndex.build(np.array([1, 1]), VECTORS[:2], "ip")
    index = ItemIndex.build(IDS, VECTORS, "ip")
    with pytest.raises(ValueError, match="3 dimensions, the index has 2"):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(KeyError, match="item 77"):
        index.vectors(np.array([77]))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_and_load_give_identical_scores(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    ids = np.arange(1000, 1500)
    index = ItemIndex.build(ids, vectors, "ip", IndexConfig(kind=kind), categories=ids % 5)  # type: ignore[arg-type]
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    before = index.search(queries, 10)
    loaded = ItemIndex.load(index.save(tmp_path / "ix"))
    after = loaded.search(queries, 10)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
    assert loaded.report == index.report and loaded.kind == kind
    # the category means survive the round trip
    assert np.allclose(loaded.add_items(np.array([5]), None, np.array([2])), vectors[ids % 5 == 2].mean(axis=0))


def test_auto_kind_follows_the_size_threshold() -> None:
    vectors = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    assert ItemIndex.build(np.arange(30), vectors, "ip", IndexConfig(exact_max_items=30)).kind == "flat"
    assert ItemIndex.build(np.arange(30), vectors, "ip", IndexConfig(exact_max_items=29)).kind == "hnsw"


@pytest.mark.slow
def test_hnsw_recall_on_100k_random_vectors() -> None:
    """Random Gaussian vectors are HNSW's worst case; still >= 0.95 recall@10 against exact search,
    measured on queries that the build's own calibration never saw."""
    rng = np.random.default_rng(42)
    n, dim = 100_000, 64
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) + 1
    # M=16 builds 4x faster than 32 on two cores; the calibration raises efSearch to the target
    cfg = IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=100, target_recall=0.97, recall_queries=300)
    index = ItemIndex.build(ids, vectors, "cosine", cfg)
    assert index.kind == "hnsw" and index.report["recall_at_k"] >= 0.97
    queries = rng.standard_normal((500, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    normalized = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = exact_search(normalized, ids, queries, 10)
    _, found = index.search(queries, 10)
    assert recall_against(found, exact) >= 0.95
