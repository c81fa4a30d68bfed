"""Spark ALS on a tiny hand-made matrix, factors on disk, the popularity baseline, tuning."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.als import (
    ALSConfig,
    ALSGrid,
    Factors,
    Popularity,
    embedding_table_path,
    export_factors,
    fit_als,
    load_factors,
    tune_als,
)
from models.protocol import UNKNOWN_SCORE, build_eval_set
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

CUTOFF = datetime(2026, 1, 1, tzinfo=timezone.utc)


def two_blocks() -> pd.DataFrame:
    """Users 1-4 like items 10-13, users 5-8 like items 20-23 (each user misses one item)."""
    rows = []
    for users, items in (((1, 2, 3, 4), (10, 11, 12, 13)), ((5, 6, 7, 8), (20, 21, 22, 23))):
        for n, user in enumerate(users):
            rows += [(user, item, 3.0) for k, item in enumerate(items) if k != n]
    return pd.DataFrame(rows, columns=[S.COL_USER, S.COL_ITEM, "weight"])


@pytest.fixture(scope="module")
def factors(spark: object) -> Factors:
    frame = spark.createDataFrame(two_blocks())  # type: ignore[attr-defined]
    return fit_als(frame, ALSConfig(rank=4, max_iter=10, reg_param=0.01, num_blocks=1), CUTOFF)


def test_als_recommends_the_missing_item_of_the_users_block(factors: Factors) -> None:
    assert factors.user_ids.tolist() == list(range(1, 9)) and factors.items.shape == (8, 4)
    assert factors.items.dtype == np.float32
    catalogue = np.array([10, 11, 12, 13, 20, 21, 22, 23])
    scores = factors.score_fn(catalogue)(np.array([1, 5]))
    seen = {1: {11, 12, 13}, 5: {21, 22, 23}}
    for row, user in enumerate((1, 5)):
        unseen = [(s, i) for s, i in zip(scores[row], catalogue) if i not in seen[user]]
        assert max(unseen)[1] == (10 if user == 1 else 20)  # the block's item the user has not seen


def test_score_fn_unknown_items_rank_last_and_unknown_users_fall_back(factors: Factors) -> None:
    catalogue = np.array([10, 99])
    scores = factors.score_fn(catalogue, fallback=np.array([7.0, 8.0]))(np.array([1, 1234]))
    assert scores[0, 1] == UNKNOWN_SCORE
    assert scores[1].tolist() == [7.0, 8.0]


def test_export_and_load_round_trip(factors: Factors, tmp_path: Path) -> None:
    export_factors(factors, tmp_path / "user_embedding", tmp_path / "item_embedding", created=CUTOFF)
    table = pq.read_table(tmp_path / "item_embedding")
    assert table.schema.equals(T.table_schema(T.ITEM_EMBEDDING), check_metadata=False)
    assert table.column(S.COL_TS)[0].as_py() == CUTOFF
    loaded = load_factors(tmp_path / "user_embedding", tmp_path / "item_embedding")
    assert np.array_equal(loaded.users, factors.users) and np.array_equal(loaded.item_ids, factors.item_ids)
    assert loaded.cutoff == CUTOFF
    # a second export replaces the table (no stale part files)
    export_factors(factors, tmp_path / "user_embedding", tmp_path / "item_embedding")
    assert len(list((tmp_path / "item_embedding").glob("*.parquet"))) == 1


def test_embedding_table_path_is_the_feature_views_table(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", dataset="ml-100k")
    assert embedding_table_path(settings, "user") == tmp_path / "data" / "features" / "ml-100k" / "user_embedding"
    assert embedding_table_path(settings, "item") == T.table_path(settings, T.ITEM_EMBEDDING)
    with pytest.raises(ValueError, match="kind='users'"):
        embedding_table_path(settings, "users")  # type: ignore[arg-type]


def test_popularity_counts_distinct_users_and_ties_by_id() -> None:
    train = pd.DataFrame({S.COL_USER: [1, 1, 1, 2, 3], S.COL_ITEM: [5, 5, 6, 6, 7]})
    pop = Popularity.fit(train)
    # item 5: user 1 (twice) -> 1; item 6: users 1, 2 -> 2; item 7: user 3 -> 1; item 8 unseen -> 0
    assert pop.scores(np.array([5, 6, 7, 8])).tolist() == [1.0, 2.0, 1.0, 0.0]


def test_config_errors_name_the_value(spark: object) -> None:
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        ALSConfig(rank=0)
    big = spark.createDataFrame(pd.DataFrame({S.COL_USER: [1], S.COL_ITEM: [2**31], "weight": [1.0]}))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="item_id 2147483648 exceeds"):
        fit_als(big, ALSConfig(), CUTOFF)


def test_tuning_keeps_the_best_on_validation(spark: object) -> None:
    frame = spark.createDataFrame(two_blocks())  # type: ignore[attr-defined]
    train = two_blocks()[[S.COL_USER, S.COL_ITEM]]
    # each user's missing item of its own block is the validation positive
    validation = build_eval_set(train, pd.DataFrame({S.COL_USER: range(1, 9), S.COL_ITEM: [10, 11, 12, 13,
                                                                                            20, 21, 22, 23]}),
                                np.array([10, 11, 12, 13, 20, 21, 22, 23]))
    grid = ALSGrid(ranks=(1, 4), reg_params=(0.01,), alphas=(1.0,))
    result = tune_als(frame, validation, CUTOFF, grid, ALSConfig(max_iter=10, num_blocks=1), progress=False)
    assert len(result.trials) == 2
    best = max(result.trials, key=lambda t: t.metrics["ndcg@10"])
    assert result.best == best.config
    assert result.as_dict()["best"]["rank"] == best.config.rank
