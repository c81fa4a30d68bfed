"""The evaluation protocol: metrics at their limits with hand-computed values, ties, slices,
Spark/NumPy parity, and a split that leaks nothing."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.protocol import (
    build_eval_set,
    evaluate_top_k,
    n_test_of,
    ndcg_at_k,
    rank_with,
    ranking_metrics_spark,
    recall_at_k,
    recall_ndcg,
    temporal_split,
    positives_of,
    top_k,
    top_k_frame,
)
from recsys import schema as S

# ---- metrics at their limits ------------------------------------------------------------------


def test_perfect_ranking_scores_one() -> None:
    assert recall_at_k([1, 2, 3, 4, 5], {1, 2, 3}, 10) == 1.0
    assert ndcg_at_k([1, 2, 3, 4, 5], {1, 2, 3}, 10) == pytest.approx(1.0)


def test_no_hits_score_zero() -> None:
    assert recall_at_k([4, 5, 6], {1, 2}, 10) == 0.0
    assert ndcg_at_k([4, 5, 6], {1, 2}, 10) == 0.0
    assert ndcg_at_k([], {1}, 10) == 0.0  # an empty ranking hits nothing


def test_fewer_positives_than_k() -> None:
    ranked = list(range(1, 11))
    # positives 5 and 9 at ranks 5 and 9: recall = 2 / min(10, 2) = 1.0
    assert recall_at_k(ranked, {5, 9}, 10) == 1.0
    # DCG = 1/log2(6) + 1/log2(10) = 0.386853 + 0.301030 = 0.687883
    # IDCG over min(10, 2) = 2 ranks = 1 + 1/log2(3) = 1.630930  ->  ndcg = 0.421773
    assert ndcg_at_k(ranked, {5, 9}, 10) == pytest.approx(0.421773, abs=1e-6)


def test_more_positives_than_k() -> None:
    # k = 2, positives {1, 3, 5}, ranking 1, 2, 3: one hit in the first 2 -> recall 1 / min(2, 3)
    assert recall_at_k([1, 2, 3], {1, 3, 5}, 2) == 0.5
    # DCG = 1; IDCG over 2 ranks = 1 + 1/log2(3) = 1.630930 -> 0.613147
    assert ndcg_at_k([1, 2, 3], {1, 3, 5}, 2) == pytest.approx(0.613147, abs=1e-6)


def test_single_positive_position() -> None:
    assert ndcg_at_k([7, 1], {1}, 10) == pytest.approx(1 / math.log2(3))  # rank 2: 0.630930
    assert ndcg_at_k([7, 8, 1], {1}, 10) == pytest.approx(0.5)  # rank 3: 1/log2(4)
    assert recall_at_k([7, 8, 1], {1}, 2) == 0.0  # rank 3 is outside the top 2


def test_metrics_refuse_users_without_positives() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        recall_ndcg(np.zeros((1, 10), dtype=bool), np.array([0]), 10)


# ---- ranking ----------------------------------------------------------------------------------


def test_top_k_breaks_score_ties_by_item_id() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0]])
    assert top_k(scores, 3).tolist() == [[1, 2, 3]]
    assert top_k(scores, 3, exclude=[np.array([1])]).tolist() == [[2, 3, 0]]
    # five-way tie: the lowest columns win, in order
    assert top_k(np.zeros((1, 5)), 3).tolist() == [[0, 1, 2]]


def test_top_k_pads_when_too_few_items() -> None:
    assert top_k(np.array([[0.5, 0.1]]), 4).tolist() == [[0, 1, -1, -1]]
    assert top_k(np.array([[0.5, 0.1]]), 2, exclude=[np.array([0, 1])]).tolist() == [[-1, -1]]


# ---- a tiny EvalSet, every number by hand -----------------------------------------------------


@pytest.fixture()
def tiny() -> tuple[object, np.ndarray]:
    catalogue = np.arange(1, 11)
    train = pd.DataFrame({
        S.COL_USER: [1, 1, 2, 2] + [3] * 20,
        S.COL_ITEM: [1, 2, 1, 3] + [1, 2, 3, 4, 5] * 4,
    })
    positives = pd.DataFrame({S.COL_USER: [1, 1, 2, 3], S.COL_ITEM: [3, 4, 2, 6]})
    eval_set = build_eval_set(train, positives, catalogue)
    ranked_items = [[4, 3, 5, 6, 7, 8, 9, 10], [5, 2, 4, 6, 7, 8, 9, 10], [7, 8, 9, 10, 6]]
    ranked = np.full((3, 10), -1)
    for row, items in enumerate(ranked_items):
        ranked[row, : len(items)] = np.asarray(items) - 1  # catalogue column = item id - 1
    return eval_set, ranked


def test_eval_set_from_train(tiny: tuple[object, np.ndarray]) -> None:
    eval_set, _ = tiny
    assert eval_set.users.tolist() == [1, 2, 3]
    assert eval_set.train_counts.tolist() == [2, 2, 20]
    # distinct training users per item: 1 -> 3, 2 -> 2, 3 -> 2, 4 -> 1, 5 -> 1
    assert eval_set.popularity.tolist() == [3, 2, 2, 1, 1, 0, 0, 0, 0, 0]
    # head = ceil(0.2 * 10) = 2 items: 1 (3 users) and 2 (2 users; beats item 3 on id)
    assert np.flatnonzero(~eval_set.long_tail).tolist() == [0, 1]


def test_evaluate_top_k_by_hand(tiny: tuple[object, np.ndarray]) -> None:
    eval_set, ranked = tiny
    report = evaluate_top_k(eval_set, ranked, ks=(10,))
    # user 1: positives 3, 4 at ranks 2, 1 -> recall 1, ndcg 1
    # user 2: positive 2 at rank 2 -> recall 1, ndcg 1/log2(3) = 0.630930
    # user 3: positive 6 at rank 5 (ranked 7, 8, 9, 10, 6) -> recall 1, ndcg 1/log2(6) = 0.386853
    assert report["users"] == 3
    assert report["recall@10"] == pytest.approx(1.0)
    assert report["ndcg@10"] == pytest.approx((1 + 0.630930 + 0.386853) / 3, abs=1e-6)
    # top 10s hold items 2..10: 9 of 10
    assert report["coverage@10"] == pytest.approx(0.9)
    # beyond accuracy on the same lists, popularity = distinct training users (3, 2, 2, 1, 1, 0...),
    # N = 9 interactions. Of the 21 recommendations, items 3 (user 1) and 2 (user 2) have 2
    # (-log2(2/9) = 2.169925 bits); the other 19 have 1 or none, counted as 1 (log2 9 = 3.169925)
    # -> novelty = (19 * 3.169925 + 2 * 2.169925) / 21 = 3.169925 - 2/21 = 3.074687
    assert report["novelty@10"] == pytest.approx(math.log2(9) - 2 / 21, abs=1e-6)
    # ARP: user 1 (1 + 2 + 1 + 0 * 5) / 8 = 0.5, user 2 (1 + 2 + 1) / 8 = 0.5, user 3 0 -> 1/3
    assert report["arp@10"] == pytest.approx(1 / 3)
    assert math.isnan(report["ild@10"])  # no item vectors given: not measured
    small = report["slices"]["users_lt20_train"]
    assert small["users"] == 2 and small["ndcg@10"] == pytest.approx((1 + 0.630930) / 2, abs=1e-6)
    tail = report["slices"]["long_tail_items"]
    # user 2's only positive (item 2) is in the head: users 1 and 3 are scored on tail positives
    assert tail["users"] == 2 and tail["ndcg@10"] == pytest.approx((1 + 0.386853) / 2, abs=1e-6)
    # 21 recommendations, one of them (item 2 for user 2) in the head
    assert tail["share_of_top10"] == pytest.approx(20 / 21)


def test_evaluate_top_k_ild_uses_the_given_item_vectors(tiny: tuple[object, np.ndarray]) -> None:
    eval_set, ranked = tiny
    # one-hot vectors: every pair orthogonal -> 1; all equal -> 0
    assert evaluate_top_k(eval_set, ranked, ks=(10,), item_vectors=np.eye(10))["ild@10"] == pytest.approx(1.0)
    same = np.ones((10, 4))
    assert evaluate_top_k(eval_set, ranked, ks=(10,), item_vectors=same)["ild@10"] == pytest.approx(0.0, abs=1e-12)


def test_rank_with_excludes_training_items(tiny: tuple[object, np.ndarray]) -> None:
    eval_set, _ = tiny
    # scores = item id: the best items are the highest ids, training items never appear
    ranked = rank_with(eval_set, lambda users: np.tile(eval_set.catalogue.astype(float), (len(users), 1)), 10)
    items = np.where(ranked >= 0, eval_set.catalogue[np.maximum(ranked, 0)], -1)
    assert items[0].tolist() == [10, 9, 8, 7, 6, 5, 4, 3, -1, -1]  # user 1 trained on 1, 2
    assert items[2].tolist() == [10, 9, 8, 7, 6, -1, -1, -1, -1, -1]  # user 3 trained on 1..5


def test_build_eval_set_rejects_unknown_items() -> None:
    with pytest.raises(ValueError, match="not in the catalogue"):
        build_eval_set(pd.DataFrame({S.COL_USER: [1], S.COL_ITEM: [99]}),
                       pd.DataFrame({S.COL_USER: [1], S.COL_ITEM: [1]}), np.arange(1, 5))


# ---- Spark version ----------------------------------------------------------------------------


def test_spark_metrics_match_numpy(spark: object) -> None:
    rng = np.random.default_rng(7)
    catalogue = np.arange(100, 160)
    users = np.arange(1, 41)
    train = pd.DataFrame({S.COL_USER: np.repeat(users, 5), S.COL_ITEM: rng.choice(catalogue, 200)})
    pos_rows = [(u, i) for u in users for i in rng.choice(catalogue, rng.integers(1, 15), replace=False)]
    positives = pd.DataFrame(pos_rows, columns=[S.COL_USER, S.COL_ITEM])
    positives = positives.merge(train, how="left", indicator=True).query("_merge == 'left_only'")[
        [S.COL_USER, S.COL_ITEM]].drop_duplicates()
    eval_set = build_eval_set(train, positives, catalogue)
    ranked = rank_with(eval_set, lambda u: rng.random((len(u), len(catalogue))), 20)
    numpy_report = evaluate_top_k(eval_set, ranked)
    recs = spark.createDataFrame(top_k_frame(eval_set, ranked))  # type: ignore[attr-defined]
    pos = spark.createDataFrame(positives)  # type: ignore[attr-defined]
    for k in (10, 20):
        spark_report = ranking_metrics_spark(recs, pos, k)
        assert spark_report[f"recall@{k}"] == pytest.approx(numpy_report[f"recall@{k}"], abs=1e-12)
        assert spark_report[f"ndcg@{k}"] == pytest.approx(numpy_report[f"ndcg@{k}"], abs=1e-12)
    assert 0 < numpy_report["ndcg@10"] < 1  # a real mix of hits and misses


def test_spark_metrics_at_limits(spark: object) -> None:
    pos = spark.createDataFrame(pd.DataFrame({S.COL_USER: [1, 1, 2], S.COL_ITEM: [5, 9, 3]}))  # type: ignore[attr-defined]
    # user 1: items 5, 9 at ranks 5, 9 (0.421773, see above); user 2: no recommendations -> 0
    recs = spark.createDataFrame(pd.DataFrame(  # type: ignore[attr-defined]
        {S.COL_USER: [1] * 10, S.COL_ITEM: list(range(1, 11)), "rank": list(range(1, 11))}))
    report = ranking_metrics_spark(recs, pos, 10)
    assert report["recall@10"] == pytest.approx(0.5)
    assert report["ndcg@10"] == pytest.approx(0.421773 / 2, abs=1e-6)


# ---- the split --------------------------------------------------------------------------------


def test_n_test_of() -> None:
    assert [n_test_of(n) for n in (1, 4, 5, 9, 10, 14, 15, 100)] == [1, 1, 1, 1, 2, 2, 3, 20]


def _events(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return pd.DataFrame({
        S.COL_USER: [r[0] for r in rows], S.COL_ITEM: [r[1] for r in rows],
        S.COL_TS: pd.to_datetime([t0 + timedelta(hours=r[2]) for r in rows], utc=True),
        S.COL_EVENT_TYPE: "RATING", S.COL_VALUE: 4.0,
    })


def test_split_sizes_and_ties(spark: object) -> None:
    rows = [(1, 1, 0)]  # one interaction: it is the test, train is empty
    rows += [(2, item, h) for item, h in ((5, 0), (30, 1), (10, 1), (20, 1), (7, 2))]  # n=5: test = item 7
    # n=10: last 2 are test; the last three share a time, so item order decides: 3, 6 | 9 -> test {6, 9}
    rows += [(3, 100 + h, h) for h in range(7)] + [(3, item, 8) for item in (9, 3, 6)]
    train, test = temporal_split(spark.createDataFrame(_events(rows)))  # type: ignore[attr-defined]
    test_items = test.toPandas().groupby(S.COL_USER)[S.COL_ITEM].apply(set).to_dict()
    assert test_items == {1: {1}, 2: {7}, 3: {6, 9}}
    train_counts = train.toPandas().groupby(S.COL_USER).size().to_dict()
    assert train_counts == {2: 4, 3: 8}


def test_split_rejects_bad_fraction(spark: object) -> None:
    frame = spark.createDataFrame(_events([(1, 1, 0)]))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        temporal_split(frame, 1.5)


def _assert_no_leak(train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Every test row comes after every train row of the same user in (time, item id) order."""
    last_train = train.sort_values([S.COL_TS, S.COL_ITEM]).groupby(S.COL_USER).tail(1).set_index(S.COL_USER)
    first_test = test.sort_values([S.COL_TS, S.COL_ITEM]).groupby(S.COL_USER).head(1).set_index(S.COL_USER)
    both = first_test.join(last_train, lsuffix="_test", rsuffix="_train", how="inner")
    later = both[f"{S.COL_TS}_test"] > both[f"{S.COL_TS}_train"]
    tie_later = (both[f"{S.COL_TS}_test"] == both[f"{S.COL_TS}_train"]) & (
        both[f"{S.COL_ITEM}_test"] > both[f"{S.COL_ITEM}_train"])
    assert (later | tie_later).all(), both[~(later | tie_later)].head()


def test_ml100k_split_leaks_nothing(spark: object, ml100k_dataset: Path) -> None:
    events = spark.read.parquet(str(ml100k_dataset / "events"))  # type: ignore[attr-defined]
    train, test = temporal_split(events)
    fit, val = temporal_split(train)
    train_pd, test_pd = train.toPandas(), test.toPandas()
    assert len(train_pd) + len(test_pd) == 100_000
    sizes = pd.concat([train_pd, test_pd]).groupby(S.COL_USER).size()
    assert test_pd.groupby(S.COL_USER).size().equals(sizes.map(n_test_of).rename(None))
    _assert_no_leak(train_pd, test_pd)
    _assert_no_leak(fit.toPandas(), val.toPandas())  # validation is carved from train the same way
    assert val.join(test, [S.COL_USER, S.COL_ITEM]).count() == 0
    positives = positives_of(train, test).toPandas()
    assert (test_pd.merge(positives)[S.COL_VALUE] >= 4).all()
    assert len(positives.merge(train_pd[[S.COL_USER, S.COL_ITEM]])) == 0
