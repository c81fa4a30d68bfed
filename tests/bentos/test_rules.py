"""Business rules on hand-made items (pure logic: no services needed)."""

from __future__ import annotations

import numpy as np
import pytest

from bentos import rules

NAN = np.nan


def facts(n: int, **cols: list) -> rules.ItemFacts:
    base = {"item_ids": list(range(1, n + 1)), "category": list(range(n)), "inventory": [10.0] * n,
            "margin": [0.1] * n, "quality": [4.0] * n, "trending": [False] * n}
    base.update(cols)
    return rules.ItemFacts(**{k: np.asarray(v) for k, v in base.items()})


def test_to_unit_maps_each_kind_into_0_1() -> None:
    assert rules.to_unit(np.array([0.0, 100.0, -100.0]), "logit").tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert rules.to_unit(np.array([-1.0, 0.0, 1.0]), "cosine").tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="unknown score kind 'raw'"):
        rules.to_unit(np.array([1.0]), "raw")


def test_rules_refuse_raw_logits() -> None:
    # x0.8 on a negative logit would raise it: the rules only take scores in [0, 1]
    with pytest.raises(ValueError, match=r"needs scores in \[0, 1\]: map them with to_unit\(\) first"):
        rules.apply_rules(np.array([-2.0, 0.5]), facts(2))


def test_out_of_stock_and_purchased_are_removed() -> None:
    out = rules.apply_rules(np.array([0.9, 0.8, 0.7, 0.6]), facts(4, inventory=[0.0, 5.0, NAN, 3.0]), purchased={2})
    # item 1 out of stock, item 2 bought; item 3's stock is unknown: kept
    assert out.item_ids.tolist() == [3, 4]


def test_margin_boost_quality_penalty_trending_boost() -> None:
    out = rules.apply_rules(
        np.array([0.50, 0.50, 0.50, 0.50, 0.50]),
        facts(5, margin=[0.31, 0.30, 0.1, NAN, 0.1], quality=[4.0, 4.0, 2.9, NAN, 4.0],
              trending=[False, False, False, False, True]))
    got = dict(zip(out.item_ids.tolist(), out.scores.tolist()))
    assert got[1] == pytest.approx(0.55)  # margin 0.31 > 0.3: x1.1
    assert got[2] == pytest.approx(0.50)  # exactly 0.3 is not "over"
    assert got[3] == pytest.approx(0.40)  # quality 2.9 < 3.0: x0.8
    assert got[4] == pytest.approx(0.50)  # unknown margin and quality: untouched
    assert got[5] == pytest.approx(0.525)  # trending: x1.05
    assert out.item_ids.tolist() == [1, 5, 2, 4, 3]  # by score, ties by item id


def test_rules_compose() -> None:
    out = rules.apply_rules(np.array([0.5]), facts(1, margin=[0.5], quality=[1.0], trending=[True]))
    assert out.scores.tolist() == pytest.approx([0.5 * 1.1 * 0.8 * 1.05])  # 0.462


def test_cap_yields_when_too_few_other_categories() -> None:
    # 12 items: 1-6 in category 0, 7-12 in categories 1..6. Only 9 fit under the cap, so the
    # best over-cap item (4) fills slot 10 rather than leaving the list short
    cats = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    out = rules.apply_rules(np.linspace(0.99, 0.88, 12), facts(12, category=cats))
    assert out.item_ids.tolist() == [1, 2, 3, 7, 8, 9, 10, 11, 12, 4, 5, 6]


def test_diversity_defers_over_cap_items_after_the_top_10() -> None:
    cats = [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    out = rules.apply_rules(np.linspace(0.99, 0.87, 13), facts(13, category=cats))
    assert out.item_ids.tolist() == [1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 4, 5, 13]


def test_unknown_category_is_not_capped() -> None:
    out = rules.apply_rules(np.linspace(0.9, 0.5, 5), facts(5, category=[-1] * 5))
    assert out.item_ids.tolist() == [1, 2, 3, 4, 5]


def test_empty_input() -> None:
    out = rules.apply_rules(np.array([]), facts(0))
    assert out.item_ids.tolist() == [] and out.scores.tolist() == []
