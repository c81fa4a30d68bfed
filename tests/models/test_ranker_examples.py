"""The ranker's example sampling (:func:`models.ranker.examples.sample_examples`): hand-computed
rows, its two position helpers, and the very same rows as the per-user loop it replaced
(:mod:`tests.support.ranker_examples_before`) on seeded random fixtures that reach every branch
(drawn hard negatives, missed positives, exhausted pools, repeated and unsorted catalogues, both
of numpy's sampling methods)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.ranker.examples import (
    COL_LABEL,
    ONE_US,
    ExampleConfig,
    _catalogue_positions,
    _nth_not_excluded,
    sample_examples,
)
from models.ranker.features import COL_RETRIEVED
from models.retrieval import Candidates
from recsys import schema as S
from tests.support.ranker_examples_before import sample_examples_before

T0 = pd.Timestamp("2026-01-10 12:00", tz="UTC")


def candidates_of(item_ids: list[int]) -> Candidates:
    n = len(item_ids)
    return Candidates(np.asarray(item_ids, np.int64), np.zeros(n, np.float32), ("als",) * n, np.zeros(n, np.float32))


def test_nth_not_excluded_counts_only_kept_positions() -> None:
    # 7 positions, 1, 2 and 5 excluded: the kept ones are [0, 3, 4, 6]
    excluded = np.array([1, 2, 5])
    np.testing.assert_array_equal(_nth_not_excluded(excluded, np.array([0, 1, 2, 3])), [0, 3, 4, 6])
    np.testing.assert_array_equal(_nth_not_excluded(excluded, np.array([3, 0])), [6, 0])
    # nothing excluded: the n-th kept position is n
    np.testing.assert_array_equal(_nth_not_excluded(np.empty(0, np.int64), np.array([2, 0])), [2, 0])


def test_catalogue_positions_cover_repeats_and_skip_unknown_ids() -> None:
    catalogue = np.array([30, 10, 20, 10])
    order = np.argsort(catalogue, kind="stable")  # [1, 3, 2, 0]
    # asked for [10, 99, 30, 10]: row 0 (10) at positions 1 and 3, row 1 (99) nowhere, row 2 (30)
    # at 0, row 3 (10) at 1 and 3 again
    rows, positions = _catalogue_positions(catalogue[order], order, np.array([10, 99, 30, 10]))
    np.testing.assert_array_equal(rows, [0, 0, 2, 3, 3])
    np.testing.assert_array_equal(positions, [1, 3, 0, 1, 3])
    assert len(_catalogue_positions(catalogue[order], order, np.array([99]))[1]) == 0


def test_rows_by_hand() -> None:
    # user 1: positives 11, 13, 15; retrieval found 15, 12, 11, 14, 16; seen 17.
    #   kept positives (retrieved only): 11, 15 (ascending) -> label 1, retrieved
    #   hard: 12, 14, 16 in candidate order (n_hard=5 keeps all) -> label 0, retrieved
    #   random: the catalogue 10..19 without 11, 15, 12, 14, 16, 17 = {10, 13, 18, 19}, all 4 of
    #   them (n_random=4), in a drawn order -> label 0, not retrieved
    # user 2: its only positive (18) was not retrieved -> no rows
    positives = pd.DataFrame({S.COL_USER: [1, 1, 1, 2], S.COL_ITEM: [15, 13, 11, 18]})
    candidates = {1: candidates_of([15, 12, 11, 14, 16]), 2: candidates_of([10])}
    label_time = pd.Series({1: T0, 2: T0 + pd.Timedelta(days=1)})
    cfg = ExampleConfig(n_hard=5, n_random=4)
    out = sample_examples(candidates, positives, {1: {17}}, label_time, np.arange(10, 20), cfg)
    assert out[S.COL_USER].tolist() == [1] * 9
    assert out[S.COL_ITEM].tolist()[:5] == [11, 15, 12, 14, 16]
    assert sorted(out[S.COL_ITEM].tolist()[5:]) == [10, 13, 18, 19]
    assert out[COL_LABEL].tolist() == [1.0, 1.0] + [0.0] * 7
    assert out[COL_RETRIEVED].tolist() == [True] * 5 + [False] * 4
    assert (out[S.COL_TS] == T0 - ONE_US).all()
    assert out.dtypes[S.COL_USER] == np.int64 and out.dtypes[COL_LABEL] == np.float32


def test_missed_positives_keep_users_retrieval_missed() -> None:
    # missed_positives: user 2's positive 18 stays (not retrieved); its candidate 10 is a hard
    # negative; the pool 10..19 without 18 and 10 has 8 items, n_random=1 draws one of them
    positives = pd.DataFrame({S.COL_USER: [2], S.COL_ITEM: [18]})
    cfg = ExampleConfig(n_hard=5, n_random=1, missed_positives=True)
    out = sample_examples({2: candidates_of([10])}, positives, {}, pd.Series({2: T0}), np.arange(10, 20), cfg)
    assert out[S.COL_ITEM].tolist()[:2] == [18, 10] and len(out) == 3
    assert out[S.COL_ITEM].iloc[2] not in (18, 10)
    assert out[COL_RETRIEVED].tolist() == [False, True, False]


def test_no_positive_retrieved_gives_an_empty_typed_frame() -> None:
    positives = pd.DataFrame({S.COL_USER: [1], S.COL_ITEM: [5]})
    out = sample_examples({1: candidates_of([6])}, positives, {}, pd.Series({1: T0}), np.arange(10), ExampleConfig())
    assert len(out) == 0
    assert list(out.columns) == [S.COL_USER, S.COL_ITEM, COL_LABEL, COL_RETRIEVED, S.COL_TS]


def random_fixture(seed: int) -> tuple[dict[int, Candidates], pd.DataFrame, dict[int, set[int]], pd.Series, np.ndarray]:
    """Users with positives (some retrieved, some not, some repeated), candidate lists, seen sets
    (some with ids outside the catalogue), label times, and a shuffled catalogue (seed 3: with a
    repeated id)."""
    rng = np.random.default_rng(1000 + seed)
    n_items = int(rng.choice([30, 200, 12_000]))
    catalogue = rng.permutation(np.arange(100, 100 + n_items))
    if seed % 4 == 3:
        catalogue = np.concatenate([catalogue, catalogue[:3]])
    users = rng.choice(np.arange(1, 400), size=int(rng.integers(1, 40)), replace=False)
    positives, candidates, seen, times = [], {}, {}, {}
    for user in users.tolist():
        if rng.random() < 0.9:
            candidates[user] = candidates_of(rng.choice(catalogue, min(int(rng.integers(0, 60)), n_items),
                                                        replace=False).tolist())
        pool = np.concatenate([candidates[user].item_ids if user in candidates else [], rng.choice(catalogue, 5)])
        positives += [(user, int(i)) for i in rng.choice(pool, int(rng.integers(1, 8)))]  # repeats on purpose
        if rng.random() < 0.8:
            seen[user] = {int(i) for i in rng.choice(catalogue, min(int(rng.integers(0, 20)), n_items))} | {7}
        times[user] = T0 + pd.Timedelta(minutes=int(rng.integers(0, 10_000)))
    frame = pd.DataFrame(positives, columns=[S.COL_USER, S.COL_ITEM])
    return candidates, frame.sample(frac=1.0, random_state=seed), seen, pd.Series(times), catalogue


@pytest.mark.parametrize("seed", range(24))
def test_the_same_rows_as_the_per_user_loop(seed: int) -> None:
    candidates, positives, seen, times, catalogue = random_fixture(seed)
    # small n_hard draws hard negatives; n_random 300 of 12,000 takes numpy's tail-shuffle path,
    # 10 its Floyd path; a 30-item catalogue runs out of random items
    for cfg in (ExampleConfig(), ExampleConfig(n_hard=5, n_random=3, seed=seed),
                ExampleConfig(n_hard=0, n_random=300, missed_positives=True),
                ExampleConfig(n_hard=20, n_random=0, missed_positives=bool(seed % 2))):
        expected = sample_examples_before(candidates, positives, seen, times, catalogue, cfg)
        got = sample_examples(candidates, positives, seen, times, catalogue, cfg)
        pd.testing.assert_frame_equal(got, expected)


def test_no_positives_at_all_gives_an_empty_typed_frame() -> None:
    positives = pd.DataFrame({S.COL_USER: np.empty(0, np.int64), S.COL_ITEM: np.empty(0, np.int64)})
    out = sample_examples({}, positives, {}, pd.Series(dtype="datetime64[ns, UTC]"), np.arange(10), ExampleConfig())
    expected = sample_examples_before({}, positives, {}, pd.Series(dtype="datetime64[ns, UTC]"), np.arange(10),
                                      ExampleConfig())
    pd.testing.assert_frame_equal(out, expected)
    assert len(out) == 0
