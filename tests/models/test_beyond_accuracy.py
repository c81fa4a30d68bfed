"""The beyond-accuracy measures (models.beyond_accuracy): hand-computed values, their limits,
what is skipped or padded, and bad input that names the value to fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.beyond_accuracy import (
    average_popularity,
    beyond_accuracy,
    catalogue_coverage,
    intra_list_diversity,
    novelty,
)

# training interactions per catalogue column: N = 4 + 2 + 1 + 1 + 0 = 8, so
# p = 1/2, 1/4, 1/8, 1/8 and self-information -log2 p = 1, 2, 3, 3 bits; column 4 is unseen
COUNTS = np.array([4, 2, 1, 1, 0])


# ---- catalogue coverage -------------------------------------------------------------------------


def test_coverage_of_two_users_over_ten_items() -> None:
    ranked = np.array([[0, 1, 2, 3], [2, 3, 4, 5]])
    # {0, 1, 2, 3} | {2, 3, 4, 5} = 6 distinct items of 10
    assert catalogue_coverage(ranked, 10, k=4) == pytest.approx(0.6)
    # only the first k ranks count: {0, 1} | {2, 3} = 4 of 10
    assert catalogue_coverage(ranked, 10, k=2) == pytest.approx(0.4)


def test_coverage_ignores_padding() -> None:
    # -1 pads a short list: {0, 1} | {1} = 2 of 10
    assert catalogue_coverage(np.array([[0, 1, -1], [1, -1, -1]]), 10, k=3) == pytest.approx(0.2)


def test_coverage_limits() -> None:
    # one item recommended to everyone: 1 / N
    assert catalogue_coverage(np.full((5, 1), 7), 8, k=1) == pytest.approx(1 / 8)
    # every item recommended: 1
    assert catalogue_coverage(np.array([[0, 1], [2, 3]]), 4, k=2) == pytest.approx(1.0)
    # nothing recommended: 0
    assert catalogue_coverage(np.full((2, 3), -1), 4, k=3) == 0.0


# ---- novelty ------------------------------------------------------------------------------------


def test_novelty_with_known_probabilities() -> None:
    # user A: columns 0 and 1 (1 and 2 bits); user B: columns 2 and 3 (3 and 3 bits)
    # -> mean over the 4 recommendations = (1 + 2 + 3 + 3) / 4 = 2.25
    assert novelty(np.array([[0, 1], [2, 3]]), COUNTS, k=2) == pytest.approx(2.25)


def test_novelty_counts_an_unseen_item_as_seen_once() -> None:
    # column 4 has no training interaction: -log2(1 / 8) = 3 bits, like an item seen once
    # -> (1 + 3) / 2 = 2.0
    assert novelty(np.array([[0, 4]]), COUNTS, k=2) == pytest.approx(2.0)


def test_novelty_averages_over_recommended_slots_not_padding() -> None:
    # A recommends column 0 only (1 bit), B columns 1 and 2 (2 and 3 bits): (1 + 2 + 3) / 3 = 2.0
    assert novelty(np.array([[0, -1], [1, 2]]), COUNTS, k=2) == pytest.approx(2.0)
    assert math.isnan(novelty(np.full((2, 2), -1), COUNTS, k=2))  # nothing recommended


def test_novelty_of_the_most_popular_item_everywhere() -> None:
    # only column 0, p = 1/2, for everyone: 1 bit
    assert novelty(np.zeros((3, 1), dtype=np.int64), COUNTS, k=1) == pytest.approx(1.0)


# ---- intra-list diversity -----------------------------------------------------------------------


def test_ild_of_orthonormal_vectors_is_one() -> None:
    vectors = np.eye(4)
    # every pair has cosine 0: 1 - 0 = 1
    assert intra_list_diversity(np.array([[0, 1, 2], [1, 2, 3]]), vectors, k=3) == pytest.approx(1.0)


def test_ild_of_identical_vectors_is_zero() -> None:
    vectors = np.tile([0.5, -2.0, 1.0], (4, 1))
    # every pair has cosine 1: 1 - 1 = 0
    assert intra_list_diversity(np.array([[0, 1, 2, 3]]), vectors, k=4) == pytest.approx(0.0, abs=1e-12)


def test_ild_by_hand() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])  # the third at 45 degrees, norm not 1
    # pairs: cos(0, 1) = 0, cos(0, 2) = cos(1, 2) = 1/sqrt(2) = 0.707107
    # mean = 1.414214 / 3 = 0.471405 -> ILD = 0.528595
    assert intra_list_diversity(np.array([[0, 1, 2]]), vectors, k=3) == pytest.approx(0.528595, abs=1e-6)


def test_ild_skips_items_without_vectors_and_short_lists() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # column 3: no vector
    ranked = np.array([
        [0, 1],  # cosine 0 -> 1.0
        [0, 3],  # one item with a vector: skipped
        [0, 2],  # cosine 0.707107 -> 0.292893
        [2, -1],  # one item: skipped
    ])
    # mean over the two scored lists: (1.0 + 0.292893) / 2 = 0.646447
    assert intra_list_diversity(ranked, vectors, k=2) == pytest.approx(0.646447, abs=1e-6)
    # column 3 left out of the pairs: [0, 1, 3] scores as [0, 1] -> 1.0
    assert intra_list_diversity(np.array([[0, 3, 1]]), vectors, k=3) == pytest.approx(1.0)
    assert math.isnan(intra_list_diversity(np.array([[0, 3], [3, -1]]), vectors, k=2))  # no list scored


def test_ild_in_blocks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(30, 8))
    ranked = np.stack([rng.choice(30, 5, replace=False) for _ in range(9)])
    whole = intra_list_diversity(ranked, vectors, k=5)
    monkeypatch.setattr("models.beyond_accuracy.ILD_BLOCK", 2)  # 9 users in 5 blocks
    assert intra_list_diversity(ranked, vectors, k=5) == pytest.approx(whole, abs=1e-12)


# ---- average recommended popularity -------------------------------------------------------------


def test_arp_by_hand() -> None:
    # A: columns 0, 1 -> (4 + 2) / 2 = 3; B: columns 2, 4 -> (1 + 0) / 2 = 0.5; mean 1.75
    assert average_popularity(np.array([[0, 1], [2, 4]]), COUNTS, k=2) == pytest.approx(1.75)


def test_arp_averages_a_padded_list_over_its_items() -> None:
    # A: column 0 only -> 4; B: columns 3, 4 -> 0.5; C: empty, skipped; mean (4 + 0.5) / 2 = 2.25
    ranked = np.array([[0, -1], [3, 4], [-1, -1]])
    assert average_popularity(ranked, COUNTS, k=2) == pytest.approx(2.25)
    assert math.isnan(average_popularity(np.full((1, 2), -1), COUNTS, k=2))


# ---- all four, and bad input --------------------------------------------------------------------


def test_beyond_accuracy_keys() -> None:
    ranked = np.array([[0, 1], [2, 3]])
    report = beyond_accuracy(ranked, COUNTS, np.eye(5), k=2)
    assert set(report) == {"coverage@2", "novelty@2", "ild@2", "arp@2"}
    assert report["coverage@2"] == pytest.approx(4 / 5)  # columns 0..3 of 5
    assert report["novelty@2"] == pytest.approx(2.25)  # as in test_novelty_with_known_probabilities
    assert report["ild@2"] == pytest.approx(1.0)  # orthonormal
    assert report["arp@2"] == pytest.approx((3 + 1) / 2)  # A: (4 + 2) / 2, B: (1 + 1) / 2
    assert math.isnan(beyond_accuracy(ranked, COUNTS, None, k=2)["ild@2"])  # no vectors, not measured


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_refused(k: int) -> None:
    ranked = np.array([[0, 1]])
    for call in (lambda: catalogue_coverage(ranked, 5, k=k), lambda: novelty(ranked, COUNTS, k=k),
                 lambda: intra_list_diversity(ranked, np.eye(5), k=k), lambda: average_popularity(ranked, COUNTS, k=k)):
        with pytest.raises(ValueError, match=f"k={k} must be an integer >= 1"):
            call()


def test_empty_catalogue_is_refused() -> None:
    empty = np.empty((0, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"catalogue is empty \(size 0\)"):
        catalogue_coverage(empty, 0)
    with pytest.raises(ValueError, match=r"catalogue is empty \(size 0\)"):
        novelty(empty, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=r"catalogue is empty \(size 0\)"):
        beyond_accuracy(empty, np.array([], dtype=np.int64), None)


def test_columns_outside_the_catalogue_are_refused() -> None:
    with pytest.raises(ValueError, match="column 5, outside the catalogue of 5 items"):
        average_popularity(np.array([[0, 5]]), COUNTS, k=2)
    with pytest.raises(ValueError, match="column -2, outside the catalogue of 5 items"):
        catalogue_coverage(np.array([[-2, 0]]), 5, k=2)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"ranked must be 2-D \(users x ranks\), got shape \(3,\)"):
        catalogue_coverage(np.array([0, 1, 2]), 5)
    with pytest.raises(ValueError, match="item_vectors has 3 rows for a catalogue of 5"):
        beyond_accuracy(np.array([[0, 1]]), COUNTS, np.eye(3), k=2)
    with pytest.raises(ValueError, match="interactions must be finite counts >= 0"):
        novelty(np.array([[0]]), np.array([1, -1]), k=1)
