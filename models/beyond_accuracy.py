"""Beyond-accuracy measures of top-k lists: catalogue coverage, novelty, intra-list diversity and
average recommended popularity, each a small NumPy function over the protocol's ranked lists.

Every function takes ``ranked``, the protocol's format (:func:`models.protocol.top_k`): one row
per user of catalogue column indices, best first, ``-1`` padding where a user had fewer than k
rankable items; only the first ``k`` columns count. Per-item inputs (``interactions``,
``item_vectors``) are indexed by the same catalogue columns. Which library each definition
follows, and the formulas, are in ``docs/training.md`` ("Beyond accuracy"):

- :func:`catalogue_coverage` = |union of the users' top k| / catalogue size (RecBole's
  ``ItemCoverage``);
- :func:`novelty` = mean over every recommended (user, item) of ``-log2(n_i / N)``, ``n_i`` the
  item's training interactions and ``N`` their total (Microsoft Recommenders' ``novelty``); an
  item with no training interaction counts as seen once (``-log2(1 / N)``, the largest finite
  value) rather than being dropped;
- :func:`intra_list_diversity` = mean over users of ``1 -`` the mean pairwise cosine of the item
  vectors in their top k (Microsoft Recommenders' ``diversity`` with ``item_feature_vector``
  similarity); items without a vector are left out, lists with fewer than two items with a
  vector are skipped;
- :func:`average_popularity` = mean over users of the mean ``n_i`` of their top k (RecBole's
  ``AveragePopularity``); unseen items count 0.

A measure with nothing to average over (no recommended item, no list with two vectors) is NaN.
"""

from __future__ import annotations

import numpy as np

#: Users per block in :func:`intra_list_diversity`: bounds its (block x k x d) working array.
ILD_BLOCK = 2048


def _top(ranked: np.ndarray, k: int, n_catalogue: int) -> np.ndarray:
    """The first ``k`` columns of ``ranked`` as int64, after checking ``k``, the catalogue and
    that every index is -1 or a catalogue column."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1, e.g. 10")
    if n_catalogue < 1:
        raise ValueError(f"the catalogue is empty (size {n_catalogue}): pass every item that can be recommended")
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D (users x ranks), got shape {ranked.shape}: one row per user")
    if ranked.size and not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer catalogue columns, got dtype {ranked.dtype}")
    top = ranked[:, :k].astype(np.int64, copy=False)
    bad = (top < -1) | (top >= n_catalogue)
    if bad.any():
        raise ValueError(
            f"ranked holds column {int(top[bad][0])}, outside the catalogue of {n_catalogue} items: "
            "pass catalogue column indices (0..size-1), -1 for padding"
        )
    return top


def _counts(interactions: np.ndarray) -> np.ndarray:
    counts = np.asarray(interactions)
    if counts.ndim != 1:
        raise ValueError(f"interactions must be 1-D (one count per catalogue column), got shape {counts.shape}")
    if counts.size and (not np.all(np.isfinite(counts)) or counts.min() < 0):
        raise ValueError("interactions must be finite counts >= 0 (training interactions per catalogue column)")
    return counts.astype(np.float64)


def catalogue_coverage(ranked: np.ndarray, n_catalogue: int, k: int = 10) -> float:
    """Distinct items in all users' top ``k`` / ``n_catalogue`` (padding not counted)."""
    top = _top(ranked, k, n_catalogue)
    return float(len(np.unique(top[top >= 0])) / n_catalogue)


def novelty(ranked: np.ndarray, interactions: np.ndarray, k: int = 10) -> float:
    """Mean self-information ``-log2(n_i / N)`` over every recommended (user, item) in the top
    ``k``, ``N = sum(interactions)``; an unseen item (``n_i = 0``) counts as ``n_i = 1``."""
    counts = _counts(interactions)
    top = _top(ranked, k, len(counts))
    total = counts.sum()
    recommended = top[top >= 0]
    if recommended.size == 0:
        return float("nan")
    if total <= 0:
        raise ValueError("interactions sum to 0: novelty needs the training interactions of the catalogue")
    # unseen items: as if seen once (the most novel finite value), where Microsoft Recommenders'
    # inner join would score them 0, making a never-seen item look the least novel
    return float(np.mean(-np.log2(np.maximum(counts[recommended], 1.0) / total)))


def average_popularity(ranked: np.ndarray, interactions: np.ndarray, k: int = 10) -> float:
    """Mean over users of the mean training interactions of their top-``k`` items (users whose
    list is empty are skipped; a padded list averages over its items)."""
    counts = _counts(interactions)
    top = _top(ranked, k, len(counts))
    present = top >= 0
    length = present.sum(axis=1)
    sums = np.where(present, counts[np.where(present, top, 0)], 0.0).sum(axis=1)
    listed = length > 0
    return float(np.mean(sums[listed] / length[listed])) if listed.any() else float("nan")


def _unit_rows(item_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, has_vector): rows of zeros or with a non-finite value have no vector."""
    vectors = np.asarray(item_vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D (catalogue x dimensions), got shape {vectors.shape}")
    finite = np.all(np.isfinite(vectors), axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    has = finite & (norms > 0)
    unit = np.zeros_like(vectors)
    unit[has] = vectors[has] / norms[has, None]
    return unit, has


def intra_list_diversity(ranked: np.ndarray, item_vectors: np.ndarray, k: int = 10) -> float:
    """Mean over users of ``1 - mean cosine(v_i, v_j)`` over the pairs ``i < j`` of their top
    ``k`` (``item_vectors[c]`` is catalogue column ``c``'s vector; a zero row is no vector).

    Items without a vector are left out of the pairs; lists with fewer than two such items are
    skipped. Lists are assumed to hold distinct items, as :func:`models.protocol.top_k` makes them.
    """
    unit, has_vector = _unit_rows(item_vectors)
    top = _top(ranked, k, len(unit))
    diversities = []
    for start in range(0, len(top), ILD_BLOCK):
        block = top[start : start + ILD_BLOCK]
        cols = np.where(block >= 0, block, 0)
        usable = (block >= 0) & has_vector[cols]
        vectors = unit[cols] * usable[..., None]  # (users, k, d); unusable slots are zero
        gram = vectors @ vectors.transpose(0, 2, 1)  # (users, k, k) cosines, zero off usable slots
        n = usable.sum(axis=1)
        pair_sum = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / 2.0
        scored = n >= 2
        diversities.append(1.0 - pair_sum[scored] / (n[scored] * (n[scored] - 1) / 2.0))
    values = np.concatenate(diversities) if diversities else np.empty(0)
    return float(values.mean()) if values.size else float("nan")


def beyond_accuracy(ranked: np.ndarray, interactions: np.ndarray, item_vectors: np.ndarray | None,
                    k: int = 10) -> dict[str, float]:
    """The four measures as report keys ``coverage@k``, ``novelty@k``, ``ild@k`` and ``arp@k``;
    ``ild@k`` is NaN without ``item_vectors``. The catalogue size is ``len(interactions)``."""
    counts = _counts(interactions)
    if item_vectors is not None and len(item_vectors) != len(counts):
        raise ValueError(
            f"item_vectors has {len(item_vectors)} rows for a catalogue of {len(counts)}: "
            "pass one vector per catalogue column (zeros where an item has none)"
        )
    return {
        f"coverage@{k}": catalogue_coverage(ranked, len(counts), k),
        f"novelty@{k}": novelty(ranked, counts, k),
        f"ild@{k}": float("nan") if item_vectors is None else intra_list_diversity(ranked, item_vectors, k),
        f"arp@{k}": average_popularity(ranked, counts, k),
    }
