"""The served row of `recsys evaluate` (bentos.evaluation): engine answers -> ranked catalogue
columns (by hand), the borrowed Redis database on a real server, and the clear error without
Redis. The row itself on ML-100K is asserted in tests/models/test_ranker.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from bentos.evaluation import CLAIM_KEY, answers_to_columns, borrowed_database, check_redis
from pipelines.feature_store import FeatureStoreError
from pipelines.stack import free_port
from recsys.config import Settings
from tests.support.settings import isolated_settings

CATALOGUE = np.array([10, 20, 30, 40, 50, 60], dtype=np.int64)  # column j holds CATALOGUE[j]


def test_answers_become_columns_with_padding_fallback_and_dedupe() -> None:
    answers = [
        [30, 99, 30, 10, 20],  # 99 is not in the catalogue; 30 twice; 10 is a training item
        [],  # an empty answer: the fallback alone
        [60, 50, 40, 30, 20, 10],  # longer than depth: cut
    ]
    fallback = np.array([[2, 5, 4, -1], [3, 0, -1, -1], [0, 1, 2, 3]], dtype=np.int64)
    seen = (np.array([0]), np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    ranked, counts = answers_to_columns(answers, CATALOGUE, fallback, depth=4, seen=seen)
    # user 0: 30 -> col 2, 99 dropped, the second 30 dropped, 10 (col 0) is a training item, 20 -> col 1;
    # then the fallback: col 2 taken, col 5 added -> [2, 1, 5, 4]
    # user 1: the fallback [3, 0], then -1 padding
    # user 2: the first four answers, 60 50 40 30 -> [5, 4, 3, 2]
    np.testing.assert_array_equal(ranked, [[2, 1, 5, 4], [3, 0, -1, -1], [5, 4, 3, 2]])
    # training items among the first 10 answered: user 0's 10 only; filled: user 0 two slots
    # (5 and 4), user 1 two (3 and 0)
    assert counts == {"training_items_dropped@10": 1, "users_filled": 2, "slots_filled": 4}
    kept, kept_counts = answers_to_columns(answers, CATALOGUE, fallback, depth=4)
    np.testing.assert_array_equal(kept[0], [2, 0, 1, 5])  # without `seen`, 10 keeps its place
    assert kept_counts["training_items_dropped@10"] == 0 and kept_counts["slots_filled"] == 3


def test_without_redis_the_error_names_the_fix(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, redis_port=free_port())  # nothing listens there
    with pytest.raises(FeatureStoreError, match=r"not reachable: start it with `recsys stack up`.*--no-served"):
        check_redis(settings, timeout_s=0.5)
    with pytest.raises(FeatureStoreError, match="--no-served"):
        with borrowed_database(settings):
            pass


def test_a_borrowed_database_is_empty_claimed_and_emptied_after(stack_settings: Settings) -> None:
    demo = redis.Redis.from_url(stack_settings.effective_redis_url)
    demo.set("trending:global:sentinel", "demo")  # a key of the configured database (db 0)
    try:
        with borrowed_database(stack_settings) as first:
            client = redis.Redis.from_url(first.effective_redis_url)
            assert first.effective_redis_url.endswith("/15") and client.get(CLAIM_KEY) is not None
            client.zadd("trending:global", {"7": 3.0})
            with borrowed_database(stack_settings) as second:  # a concurrent evaluation: another one
                assert second.effective_redis_url.endswith("/14")
            assert client.zscore("trending:global", "7") == 3.0
        assert client.dbsize() == 0  # emptied, the claim too
        assert demo.get("trending:global:sentinel") == b"demo"  # the demo's database untouched
    finally:
        demo.delete("trending:global:sentinel")
