"""The near cache of candidates' online rows (bentos.item_cache): pure logic, a fake reader
that counts what it is asked for and a hand-driven clock."""

from __future__ import annotations

from typing import Any

import pytest

from bentos.item_cache import ItemFeatureCache


class Reader:
    """Rows ``price = 10 * id``, ``title = "t<id>"``; records each call's ids; ``down`` -> None."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.down = False
        self.bump = 0  # added to prices: a rewrite of the rows in Redis

    def __call__(self, ids: list[int]) -> dict[str, list[Any]] | None:
        self.calls.append(list(ids))
        if self.down:
            return None
        return {"price": [10 * i + self.bump for i in ids], "title": [f"t{i}" for i in ids]}


def test_fresh_rows_come_from_the_cache_and_only_the_missing_ones_are_read() -> None:
    now = [0.0]
    cache, reader = ItemFeatureCache(ttl_s=5.0, max_items=100, clock=lambda: now[0]), Reader()
    assert cache.read([1, 2], reader) == {"price": [10, 20], "title": ["t1", "t2"]}
    # 2 is cached, 3 is not; the answer keeps the requested order and repeats
    assert cache.read([3, 2, 3], reader) == {"price": [30, 20, 30], "title": ["t3", "t2", "t3"]}
    assert reader.calls == [[1, 2], [3]]  # 3 read once although asked twice
    assert cache.read([2, 1, 3], reader)["price"] == [20, 10, 30]
    assert len(reader.calls) == 2  # all fresh: no read


def test_a_row_is_read_again_once_its_ttl_has_passed() -> None:
    now = [0.0]
    cache, reader = ItemFeatureCache(ttl_s=5.0, max_items=100, clock=lambda: now[0]), Reader()
    cache.read([1], reader)
    reader.bump = 1  # a materialization rewrote item 1
    now[0] = 4.9
    assert cache.read([1], reader)["price"] == [10]  # within the TTL: the stored row
    now[0] = 5.0
    assert cache.read([1], reader)["price"] == [11]  # expired at 0 + 5 s: read again
    assert reader.calls == [[1], [1]]


def test_ttl_zero_reads_every_time() -> None:
    cache, reader = ItemFeatureCache(ttl_s=0.0, max_items=1), Reader()
    cache.read([1, 2], reader)
    cache.read([1, 2], reader)
    assert reader.calls == [[1, 2], [1, 2]] and len(cache) == 0


def test_the_oldest_rows_are_dropped_past_max_items() -> None:
    cache, reader = ItemFeatureCache(ttl_s=60.0, max_items=2, clock=lambda: 0.0), Reader()
    cache.read([1, 2], reader)
    cache.read([3], reader)  # 3 rows for 2 slots: 1 (stored first) goes
    assert len(cache) == 2
    cache.read([1, 2, 3], reader)
    assert reader.calls[-1] == [1]


def test_a_failed_read_returns_none_and_stores_nothing() -> None:
    cache, reader = ItemFeatureCache(ttl_s=60.0, max_items=10, clock=lambda: 0.0), Reader()
    cache.read([1], reader)
    reader.down = True  # Redis is down
    assert cache.read([1, 2], reader) is None  # 2 is not cached: the read is degraded
    assert cache.read([1], reader) == {"price": [10], "title": ["t1"]}  # 1 still fresh
    assert len(cache) == 1


def test_invalid_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="ttl_s >= 0 and max_items >= 1, got -1"):
        ItemFeatureCache(ttl_s=-1, max_items=10)
