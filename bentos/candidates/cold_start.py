"""Candidates that need no history: popular items taken in turns across categories (cold start,
and the answer from memory when Redis is down), interleaved with exploration items for a user
with onboarding or preferred categories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import numpy as np

from bentos.candidates.merge import CandidateSet, take_turns
from bentos.catalog import ItemCatalog
from bentos.features import UserFeatures


class ColdStart:
    """Popular items from the in-memory catalogue: no Redis needed."""

    def __init__(self, catalog: ItemCatalog, n: int, exploration_every: int, now: Callable[[], datetime]) -> None:
        self.catalog = catalog
        self.n = n  # how many candidates: the cached top list's size
        self.exploration_every = exploration_every
        self.now = now

    def candidates(self, user: UserFeatures, onboarding: list[int]) -> CandidateSet:
        """The onboarding categories (else the user's preferred ones): their popular items with an
        exploration item (new, else the long tail) in every ``exploration_every``-th slot; no
        categories: globally popular, round-robin across categories. Recent items are skipped."""
        categories = onboarding or user.preferred_categories
        seen = set(user.recent)
        if categories:
            popular = self.popular(seen, categories)
            explore = [int(i) for i in self.catalog.new_items(self.now(), categories=categories) if int(i) not in seen]
            if not explore:  # no new items there: the long tail of those categories
                none = np.empty(0, np.int64)
                explore = [i for c in categories for i in self.catalog.by_category.get(int(c), none)[::-1].tolist()]
            ids, strategies = interleave(popular, explore, self.exploration_every, self.n)
            if ids:
                return CandidateSet(ids, strategies, popular_scores(len(ids)))
            # categories the catalogue has no item of: answer as for a user who named none
        ids = self.popular(seen)
        return CandidateSet(ids, ["popular"] * len(ids), popular_scores(len(ids)))

    def popular_only(self) -> CandidateSet:
        """Globally popular items, round-robin across categories (the answer when Redis is down)."""
        ids = self.popular(set())
        return CandidateSet(ids, ["popular"] * len(ids), popular_scores(len(ids)))

    def popular(self, seen: set[int], categories: Sequence[int] | None = None) -> list[int]:
        """``n`` popular items taking turns across categories: the given ones in order, else every
        category, ordered by the overall rank of its most popular item."""
        if categories:
            cats = [int(c) for c in categories]
        else:  # by_category is built in that order (groups in order of first appearance)
            cats = list(self.catalog.by_category)
        return take_turns([self.catalog.by_category.get(c, np.empty(0, np.int64)) for c in cats], self.n, seen)


def popular_scores(n: int) -> list[float]:
    """Scores of a popularity order before the rules: evenly from 1.0 down to 0.5."""
    return np.linspace(1.0, 0.5, num=n).tolist() if n else []


def interleave(popular: list[int], explore: list[int], every: int, n: int) -> tuple[list[int], list[str]]:
    """Popular items with an exploration item in every ``every``-th slot."""
    ids: list[int] = []
    strategies: list[str] = []
    taken: set[int] = set()
    pop, exp = iter(popular), iter(explore)
    while len(ids) < n:
        source, label = (exp, "exploration") if every and (len(ids) + 1) % every == 0 else (pop, "popular")
        item = next((i for i in source if i not in taken), None)
        if item is None:
            other, other_label = (pop, "popular") if label == "exploration" else (exp, "exploration")
            item, label = next((i for i in other if i not in taken), None), other_label
            if item is None:
                break
        ids.append(item)
        strategies.append(label)
        taken.add(item)
    return ids, strategies
