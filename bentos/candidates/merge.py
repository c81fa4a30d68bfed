"""How candidates from several sources merge: :class:`CandidateSet` (first source wins, seen
items and padding skipped) and :func:`take_turns` (ranked lists interleaved one item at a time)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class CandidateSet:
    """Candidates in strategy order, aligned: id, the strategy that found it, its score there."""

    item_ids: list[int] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    trending: set[int] = field(default_factory=set)  # every trending item fetched (a rule input), kept or not

    def add(self, item_ids: Sequence[int], scores: Sequence[float], strategy: str, seen: set[int], limit: int) -> None:
        """Append up to ``limit`` items of one strategy, skipping padding (-1), seen and present."""
        present = set(self.item_ids)
        added = 0
        for item, score in zip(item_ids, scores):
            if added >= limit:
                break
            item = int(item)
            if item < 0 or item in seen or item in present:
                continue
            self.item_ids.append(item)
            self.strategies.append(strategy)
            self.scores.append(float(score))
            present.add(item)
            added += 1

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` candidates (strategy order)."""
        del self.item_ids[n:], self.strategies[n:], self.scores[n:]


def take_turns(lists: Sequence[Iterable[int]], n: int, seen: set[int]) -> list[int]:
    """Merge ranked lists by taking one item from each in turn, skipping seen and repeats."""
    out: list[int] = []
    taken: set[int] = set()
    iters = [iter(lst) for lst in lists]
    while iters and len(out) < n:
        alive = []
        for it in iters:
            for item in it:
                item = int(item)
                if item not in seen and item not in taken:
                    out.append(item)
                    taken.add(item)
                    alive.append(it)
                    break
            if len(out) >= n:
                break
        iters = alive
    return out


def rank_scores(n: int) -> list[float]:
    """Scores for a ranked list of ``n`` items that carries no scores of its own: 1, then down by 1/n."""
    return [1.0 - r / max(n, 1) for r in range(n)]
