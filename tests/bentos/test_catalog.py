"""The in-memory catalogue's orders (pure logic on a hand-made item_profile frame)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from bentos.catalog import ItemCatalog
from recsys import schema as S

NOW = datetime(2026, 1, 10, tzinfo=timezone.utc)


def _catalog() -> ItemCatalog:
    days_ago = {1: 30, 2: 1, 3: 2, 4: 1, 5: 6.5, 6: 0.5}  # item -> age in days
    frame = pd.DataFrame({
        S.COL_ITEM: list(days_ago),
        S.COL_CATEGORY: [1, 1, 2, 2, 1, 2],
        "tags": [["a"], ["a", "b"], ["b"], [], ["c"], None],
        "inventory": [5, 5, 5, 5, 5, 0],  # item 6 is out of stock
        "popularity_7d": [9, 1, 3, 3, 2, 8],
        "popularity_1d": [1, 1, 2, 1, 0, 0],
        S.COL_CREATED_AT: [NOW - timedelta(days=d) for d in days_ago.values()],
        "title": [f"Item {i}" for i in days_ago], "price": 1.0, "image_url": None,
    }).set_index(S.COL_ITEM)
    return ItemCatalog(frame=frame, snapshot_time=NOW)


def test_new_items_newest_first_in_stock_within_the_window() -> None:
    catalog = _catalog()
    # within 7 days and in stock: 2 (1d), 4 (1d), 3 (2d), 5 (6.5d); 2 before 4 on the tie (by id)
    assert catalog.new_items(NOW, days=7).tolist() == [2, 4, 3, 5]
    assert catalog.new_items(NOW, days=2).tolist() == [2, 4]  # 3 is exactly 2 days old: not after the cutoff
    assert catalog.new_items(NOW, days=7, categories=[2]).tolist() == [4, 3]
    assert catalog.new_items(NOW, days=7, categories=[]).tolist() == []
    assert catalog.new_items(NOW - timedelta(days=60), days=7).tolist() == [2, 4, 3, 5, 1]  # all "future" items


def test_new_items_after_adding_one_live() -> None:
    catalog = _catalog()
    catalog.add({S.COL_ITEM: 7, S.COL_CATEGORY: 2, "tags": ["z"], "inventory": 1, "popularity_7d": 0,
                 "popularity_1d": 0, S.COL_CREATED_AT: NOW, "title": "New", "price": 2.0, "image_url": None})
    assert catalog.new_items(NOW + timedelta(seconds=1), days=7).tolist() == [7, 2, 4, 3, 5]
    assert catalog.by_tag["z"].tolist() == [7]


def test_popular_orders_skip_out_of_stock() -> None:
    catalog = _catalog()
    # popularity_7d desc, then 1d desc, then id: 1 (9), 3 (3, 1d 2), 4 (3, 1d 1), 5 (2), 2 (1); 6 is out of stock
    assert catalog.popular.tolist() == [1, 3, 4, 5, 2]
    assert catalog.by_category[1].tolist() == [1, 5, 2] and catalog.by_category[2].tolist() == [3, 4]
    assert np.array_equal(catalog.category_of([3, 99]), [2, -1])


def test_empty_catalogue_has_no_new_items() -> None:
    empty = ItemCatalog(frame=_catalog().frame.iloc[0:0])
    assert empty.new_items(NOW).tolist() == []


def test_categories_are_ordered_by_their_most_popular_item() -> None:
    # category 1's best is item 1 (9), category 2's best is item 3 (3): cold start takes turns 1, 2
    assert list(_catalog().by_category) == [1, 2]


def test_lookups_by_id_with_unknown_ids_and_missing_values() -> None:
    catalog = _catalog()
    values = catalog.rule_values([3, 99, 1, 0])  # 99 and 0 are unknown (0 sorts before every id)
    assert np.array_equal(values[S.COL_CATEGORY], [2, np.nan, 1, np.nan], equal_nan=True)
    assert np.array_equal(values["inventory"], [5, np.nan, 5, np.nan], equal_nan=True)
    assert np.isnan(values["margin"]).all()  # the fixture has no margin column: unknown, not an error
    meta = catalog.metadata([6, 99, 2])
    assert meta == {"title": ["Item 6", None, "Item 2"], "price": [1.0, None, 1.0], "image_url": [None, None, None]}
    assert catalog.category_of([]).tolist() == [] and catalog.metadata([]) == {"title": [], "price": [], "image_url": []}
