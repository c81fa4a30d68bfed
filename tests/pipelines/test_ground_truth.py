"""The generator's ground truth: hand-checked probabilities on a tiny hand-made truth, and the real
one agreeing with the events the generator wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.canonical import read_manifest, read_table
from pipelines.generator import GeneratorConfig, generate
from pipelines.ground_truth import GroundTruth, config_from_params, dataset_ground_truth, ground_truth
from recsys import schema as S

# 3 categories holding items (1, 2), (3, 4), (5, 6); shares of the popularity mass 0.5, 0.3, 0.2
TINY = GroundTruth(GeneratorConfig(n_users=2, n_items=6, n_categories=3, personalization=0.7, p_click=0.3,
                                   p_add_to_cart=0.3, p_purchase=0.5),
                   item_category=np.array([0, 0, 1, 1, 2, 2]), category_share=np.array([0.5, 0.3, 0.2]),
                   preferences=np.array([[0, 0], [0, 1]]))


def test_category_affinity_by_hand() -> None:
    # user 1 prefers (0, 0): 0.7 * [2, 0, 0] / 2 + 0.3 * [0.5, 0.3, 0.2] = [0.85, 0.09, 0.06]
    np.testing.assert_allclose(TINY.category_affinity(1), [0.85, 0.09, 0.06])
    # user 2 prefers (0, 1): 0.7 * [1, 1, 0] / 2 + 0.3 * [0.5, 0.3, 0.2] = [0.5, 0.44, 0.06]
    np.testing.assert_allclose(TINY.category_affinity(2), [0.5, 0.44, 0.06])


def test_click_and_purchase_probabilities_by_hand() -> None:
    # user 1, items 1 (cat 0), 3 (cat 1), 5 (cat 2), 99 (unknown): 0.3 * [0.85, 0.09, 0.06, 0] / 0.85
    np.testing.assert_allclose(TINY.click_probability(1, [1, 3, 5, 99]), [0.3, 0.3 * 0.09 / 0.85, 0.3 * 0.06 / 0.85, 0])
    # user 2, item 4 (cat 1): 0.3 * 0.44 / 0.5 = 0.264; a purchase also needs the cart and the buy: * 0.3 * 0.5
    assert TINY.click_probability(2, [4])[0] == pytest.approx(0.264)
    assert TINY.purchase_probability(2, [4])[0] == pytest.approx(0.264 * 0.15)


def test_a_user_built_to_love_one_category() -> None:
    loving = TINY.with_preferences({2: (2, 2)})
    # 0.7 + 0.3 * 0.2 = 0.76 for category 2; 0.3 * 0.5 / 0.76 for category 0
    np.testing.assert_allclose(loving.click_probability(2, [5, 1]), [0.3, 0.3 * 0.15 / 0.76])
    assert TINY.preferences[1].tolist() == [0, 1]  # the original is unchanged


@pytest.mark.parametrize(("call", "message"), [
    (lambda: TINY.category_affinity(3), "user 3 is not a user of this dataset"),
    (lambda: TINY.with_preferences({1: (0, 3)}), r"two category ids in \[0, 3\), got \(0, 3\)"),
])
def test_bad_users_and_categories_are_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_the_real_truth_is_what_the_events_were_drawn_from(tmp_path: Path) -> None:
    cfg = GeneratorConfig(n_users=300, n_items=200, n_categories=8, days=5, chunk_users=120, bot_share=0.0,
                          power_user_share=0.0, malformed_share=0.0)
    generate(cfg, tmp_path / "d", progress=False)
    truth = dataset_ground_truth(tmp_path / "d")
    assert config_from_params(read_manifest(tmp_path / "d").params) == cfg
    assert truth.preferences.shape == (300, 2) and truth.category_share.sum() == pytest.approx(1.0)
    views = read_table(tmp_path / "d", "events").query(f"{S.COL_EVENT_TYPE} == 'VIEW'")
    users, cats = views[S.COL_USER].to_numpy(), truth.categories(views[S.COL_ITEM].to_numpy())
    prefs = truth.preferences[users - 1]
    in_prefs = ((cats == prefs[:, 0]) | (cats == prefs[:, 1])).mean()
    # a view lands in a preferred category with probability 0.7 (personalization) plus the global
    # draws that fall there by chance: above 0.7 for the true preferences (a few thousand views)...
    assert in_prefs > 0.68
    # ...and far below for someone else's preferences
    other = truth.preferences[np.roll(np.arange(300), 1)][users - 1]
    assert ((cats == other[:, 0]) | (cats == other[:, 1])).mean() < 0.5
    assert (ground_truth(cfg).preferences == truth.preferences).all()  # deterministic
