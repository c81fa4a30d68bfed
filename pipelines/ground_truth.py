"""The synthetic generator's ground truth: the preferences each user's events were drawn from, and
the click and purchase probabilities they imply for a user shown an item (what the user simulator
plays users by).

The generator draws a view of user ``u`` in category ``c`` with probability
``a_u(c) = personalization * m_u(c) / 2 + (1 - personalization) * share(c)``, where ``m_u(c)`` is
how many of the user's two preferred categories are ``c`` and ``share(c)`` is ``c``'s share of the
catalogue's popularity mass. Shown an item of category ``c``, the user looks at it with probability
``a_u(c) / max_c' a_u(c')`` (1 in the user's favourite category) and from there follows the
generator's funnel: a click with ``p_click``, then a cart with ``p_add_to_cart`` and a purchase
with ``p_purchase``. An item the generator does not know (an id outside ``1..n_items``, such as
one added through ``/items``) is never clicked.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.canonical import read_manifest
from pipelines.generator import GeneratorConfig, build_catalogue, preferred_categories


@dataclass(frozen=True)
class GroundTruth:
    """The preferences of every user of one generator config, and the probabilities they imply."""

    cfg: GeneratorConfig
    item_category: np.ndarray  # int64, the category of item id i at index i - 1
    category_share: np.ndarray  # float64 per category: its share of the popularity mass (sums to 1)
    preferences: np.ndarray  # int64 (n_users, 2): the preferred categories of user id u at row u - 1

    @property
    def user_ids(self) -> np.ndarray:
        return np.arange(1, self.cfg.n_users + 1, dtype=np.int64)

    def with_preferences(self, prefs: dict[int, tuple[int, int]]) -> GroundTruth:
        """A copy where the given users prefer the given categories; ``{user: (c, c)}`` builds a
        user who loves one category."""
        table = self.preferences.copy()
        for user, pair in prefs.items():
            self._check_user(user)
            if len(pair) != 2 or not all(0 <= c < self.cfg.n_categories for c in pair):
                raise ValueError(f"preferences of user {user} must be two category ids in "
                                 f"[0, {self.cfg.n_categories}), got {pair}")
            table[user - 1] = pair
        return GroundTruth(self.cfg, self.item_category, self.category_share, table)

    def _check_user(self, user: int) -> None:
        if not 1 <= user <= self.cfg.n_users:
            raise ValueError(f"user {user} is not a user of this dataset: the generator's users are "
                             f"1..{self.cfg.n_users}")

    def category_affinity(self, user: int) -> np.ndarray:
        """``a_u(c)`` for every category: where the user's views land (sums to 1)."""
        self._check_user(user)
        pers = self.cfg.personalization
        counts = np.bincount(self.preferences[user - 1], minlength=self.cfg.n_categories)
        return pers * counts / 2.0 + (1.0 - pers) * self.category_share

    def categories(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The category of each item; -1 for an item the generator does not know."""
        ids = np.asarray(item_ids, dtype=np.int64)
        known = (ids >= 1) & (ids <= self.cfg.n_items)
        out = np.full(len(ids), -1, dtype=np.int64)
        out[known] = self.item_category[ids[known] - 1]
        return out

    def interest(self, user: int, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The probability that the user looks at each shown item: ``a_u(c) / max a_u``."""
        affinity = self.category_affinity(user)
        cats = self.categories(item_ids)
        return np.where(cats >= 0, affinity[np.maximum(cats, 0)] / affinity.max(), 0.0)

    def click_probability(self, user: int, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The probability that the user clicks each shown item."""
        return self.interest(user, item_ids) * self.cfg.p_click

    def purchase_probability(self, user: int, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The probability that the user buys each shown item (a click, a cart, then a purchase)."""
        return self.click_probability(user, item_ids) * self.cfg.p_add_to_cart * self.cfg.p_purchase


def ground_truth(cfg: GeneratorConfig) -> GroundTruth:
    """The ground truth of the dataset :func:`pipelines.generator.generate` writes for ``cfg``."""
    _, cat = build_catalogue(cfg)
    share = np.diff(cat.cat_mass_cdf, prepend=0.0) / cat.cat_mass_cdf[-1]
    return GroundTruth(cfg, cat.category, share, preferred_categories(cfg).astype(np.int64))


def config_from_params(params: dict[str, Any]) -> GeneratorConfig:
    """The config a synthetic dataset was generated with, from its manifest's ``params``."""
    names = {f.name for f in fields(GeneratorConfig)}
    values = {k: v for k, v in params.items() if k in names}
    if "end" in values:
        values["end"] = datetime.fromisoformat(str(values["end"]))
    return GeneratorConfig(**values)


def dataset_ground_truth(dataset_path: Path) -> GroundTruth:
    """The ground truth of a synthetic dataset on disk (its manifest says how it was generated)."""
    manifest = read_manifest(dataset_path)
    if manifest.source != "synthetic":
        raise ValueError(f"{dataset_path} holds a '{manifest.source}' dataset: only a synthetic one (recsys data "
                         "generate) has ground-truth preferences to simulate users with")
    return ground_truth(config_from_params(manifest.params))
