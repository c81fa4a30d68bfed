"""The one evaluation protocol. Every quality number in the project is computed by this module.

1. **Split** (:func:`temporal_split`, Spark): each user's interactions sorted by time, ties broken
   by item id (then event id); the last ``max(1, floor(0.2 * n))`` are test, the rest train. The
   validation split used for tuning is the same function applied to train, so test is never seen
   while tuning.
2. **Positives** (:func:`positives_of`): test ratings >= 4 and clickstream CLICK or stronger,
   one per (user, item), minus items the user already has in train (those are excluded from the
   ranking, so they could never be hit). Users with at least one positive are scored.
3. **Ranking** (:func:`top_k`): a full ranking over the whole catalogue except the user's training
   items; score ties broken by item id ascending.
4. **Metrics** (NumPy: :func:`evaluate_top_k`; Spark: :func:`ranking_metrics_spark`):
   ``recall@k = hits / min(k, positives)``, ``ndcg@k`` with binary gains and the ideal DCG over
   ``min(k, positives)``, both averaged over scored users, for k = 10 and 20; slices: users with
   fewer than 20 training interactions, and long-tail items (outside the top 20% of the catalogue
   by training popularity = distinct training users), where only long-tail positives count.
5. **Beyond accuracy** (:mod:`models.beyond_accuracy`, on the same top-10 lists): catalogue
   coverage, novelty, intra-list diversity (cosine of the item vectors the caller passes) and
   average recommended popularity, a training interaction being a distinct (user, item) pair.

Everything a scorer may use (popularity included) comes from the train side of the split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.beyond_accuracy import beyond_accuracy
from recsys import schema as S

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

TEST_FRACTION = 0.2
KS: tuple[int, ...] = (10, 20)
MIN_POSITIVE_RATING = 4.0
#: Clickstream events that count as a positive (CLICK or stronger).
POSITIVE_CLICKSTREAM: tuple[str, ...] = (
    S.EventType.CLICK.value, S.EventType.ADD_TO_CART.value, S.EventType.PURCHASE.value,
)
SMALL_USER_MAX_TRAIN = 20  # slice: users with fewer training interactions than this
HEAD_SHARE = 0.2  # slice: items outside the top 20% by training popularity are the long tail
COVERAGE_K = 10  # the depth of the beyond-accuracy measures (coverage@10, novelty@10, ...)
#: Score given to items a scorer knows nothing about (no ALS vector): ranked last, still ranked.
UNKNOWN_SCORE = -1e30

ScoreFn = Callable[[np.ndarray], np.ndarray]
"""Scores users (an array of user ids) against the catalogue: shape (len(users), catalogue size)."""


# ---- split and positives (Spark) --------------------------------------------------------------


def n_test_of(n: int, test_fraction: float = TEST_FRACTION) -> int:
    """How many of a user's ``n`` interactions are test: ``max(1, floor(test_fraction * n))``."""
    return max(1, math.floor(test_fraction * n))


def temporal_split(events: DataFrame, test_fraction: float = TEST_FRACTION) -> tuple[DataFrame, DataFrame]:
    """(train, test): per user, the last ``max(1, floor(test_fraction * n))`` interactions are test.

    Order is (event_timestamp, item_id, event_id when present), so ties in time go by item id and
    the split is deterministic. Apply it to train again to carve the validation split.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be within (0, 1), e.g. 0.2")
    missing = {S.COL_USER, S.COL_ITEM, S.COL_TS} - set(events.columns)
    if missing:
        raise ValueError(f"events lack columns {sorted(missing)}: pass canonical events or interactions")
    order = [S.COL_TS, S.COL_ITEM] + ([S.COL_EVENT_ID] if S.COL_EVENT_ID in events.columns else [])
    by_user = Window.partitionBy(S.COL_USER)
    ranked = (
        events.withColumn("_pos", F.row_number().over(by_user.orderBy(*order)))
        .withColumn("_n", F.count(F.lit(1)).over(by_user))
        .withColumn("_n_test", F.greatest(F.lit(1), F.floor(F.col("_n") * F.lit(test_fraction))))
    )
    is_test = F.col("_pos") > F.col("_n") - F.col("_n_test")
    helpers = ("_pos", "_n", "_n_test")
    return ranked.filter(~is_test).drop(*helpers), ranked.filter(is_test).drop(*helpers)


def positive_condition(min_rating: float = MIN_POSITIVE_RATING) -> Any:
    """The Spark condition that makes an event a positive: a rating >= 4, or CLICK or stronger."""
    from pyspark.sql import functions as F

    is_rating = F.col(S.COL_EVENT_TYPE) == S.EventType.RATING.value
    return (is_rating & (F.col(S.COL_VALUE) >= min_rating)) | F.col(S.COL_EVENT_TYPE).isin(*POSITIVE_CLICKSTREAM)


def positives_of(train: DataFrame, test: DataFrame, min_rating: float = MIN_POSITIVE_RATING) -> DataFrame:
    """Distinct (user_id, item_id) positives of ``test`` that are not among the user's train items."""
    positives = test.filter(positive_condition(min_rating)).select(S.COL_USER, S.COL_ITEM).distinct()
    seen = train.select(S.COL_USER, S.COL_ITEM).distinct()
    return positives.join(seen, [S.COL_USER, S.COL_ITEM], "left_anti")


# ---- what one evaluation needs, in NumPy ------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """The split, collected for NumPy scoring. Column ``j`` of any score matrix is ``catalogue[j]``.

    ``positives[u]`` and ``seen[u]`` hold catalogue column indices for ``users[u]`` (sorted);
    ``train_counts[u]`` is the user's number of training interactions (events).
    ``popularity[j]`` is the number of distinct training users of ``catalogue[j]``.
    """

    catalogue: np.ndarray
    users: np.ndarray
    positives: tuple[np.ndarray, ...]
    seen: tuple[np.ndarray, ...]
    train_counts: np.ndarray
    popularity: np.ndarray

    @property
    def long_tail(self) -> np.ndarray:
        """Boolean mask over the catalogue: outside the top ``HEAD_SHARE`` by training popularity
        (popularity descending, item id ascending; the head has ``ceil(0.2 * catalogue)`` items)."""
        n_head = math.ceil(HEAD_SHARE * len(self.catalogue))
        order = np.lexsort((self.catalogue, -self.popularity))
        tail = np.ones(len(self.catalogue), dtype=bool)
        tail[order[:n_head]] = False
        return tail


def _group_columns(users: np.ndarray, row_users: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each of ``users`` (sorted), the sorted unique ``columns`` of the rows that are its own."""
    pairs = np.unique(np.stack([np.asarray(row_users, np.int64), np.asarray(columns, np.int64)], axis=1), axis=0)
    starts = np.searchsorted(pairs[:, 0], users, side="left")
    ends = np.searchsorted(pairs[:, 0], users, side="right")
    return tuple(pairs[a:b, 1] for a, b in zip(starts, ends))


def build_eval_set(train: pd.DataFrame, positives: pd.DataFrame, catalogue: np.ndarray) -> EvalSet:
    """An :class:`EvalSet` from train interactions (user_id, item_id; one row per event) and
    positives (user_id, item_id), over ``catalogue`` (every item id that can be recommended)."""
    catalogue = np.unique(np.asarray(catalogue, dtype=np.int64))
    for name, frame in (("train", train), ("positives", positives)):
        unknown = ~np.isin(frame[S.COL_ITEM].to_numpy(), catalogue)
        if unknown.any():
            raise ValueError(
                f"{name} has {int(unknown.sum())} rows whose item_id is not in the catalogue "
                f"(e.g. {int(frame[S.COL_ITEM].to_numpy()[unknown][0])}): pass the full items table"
            )
    users = np.unique(positives[S.COL_USER].to_numpy()).astype(np.int64)
    train_cols = np.searchsorted(catalogue, train[S.COL_ITEM].to_numpy())
    pos_cols = np.searchsorted(catalogue, positives[S.COL_ITEM].to_numpy())
    counts = train.groupby(S.COL_USER).size()
    popularity = np.zeros(len(catalogue), dtype=np.int64)
    pairs = pd.DataFrame({"u": train[S.COL_USER].to_numpy(), "c": train_cols}).drop_duplicates()
    np.add.at(popularity, pairs["c"].to_numpy(), 1)
    return EvalSet(
        catalogue=catalogue,
        users=users,
        positives=_group_columns(users, positives[S.COL_USER].to_numpy(), pos_cols),
        seen=_group_columns(users, train[S.COL_USER].to_numpy(), train_cols),
        train_counts=counts.reindex(users, fill_value=0).to_numpy().astype(np.int64),
        popularity=popularity,
    )


# ---- ranking and metrics (NumPy) --------------------------------------------------------------


def top_k(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Column indices of each row's ``k`` best scores, best first; ties by column ascending
    (= item id ascending when columns follow the sorted catalogue). Excluded columns and rows
    with fewer than ``k`` rankable columns are padded with -1."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (users x items), got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    scores = np.array(scores, dtype=np.float64)  # a copy: exclusions are written into it
    if exclude is not None:
        for row, cols in enumerate(exclude):
            scores[row, cols] = -np.inf
    n_rows, n_cols = scores.shape
    out = np.full((n_rows, k), -1, dtype=np.int64)
    k_eff = min(k, n_cols)
    if k_eff == 0:
        return out
    kth = -np.partition(-scores, k_eff - 1, axis=1)[:, k_eff - 1]
    for row in range(n_rows):
        # every column tied with the k-th score is a candidate, so ties resolve by column index
        cols = np.flatnonzero((scores[row] >= kth[row]) & np.isfinite(scores[row]))
        ranked = cols[np.lexsort((cols, -scores[row, cols]))][:k_eff]
        out[row, : len(ranked)] = ranked
    return out


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def hit_matrix(ranked: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean (users x k): whether the item at each rank is one of the user's positives."""
    hits = np.zeros(ranked.shape, dtype=bool)
    for row, pos in enumerate(positives):
        hits[row] = np.isin(ranked[row], pos) & (ranked[row] >= 0)
    return hits


def recall_ndcg(hits: np.ndarray, n_positives: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user recall@k and ndcg@k from a hit matrix (binary gains, ideal DCG over min(k, P))."""
    if hits.shape[1] < k:
        raise ValueError(f"the ranking has {hits.shape[1]} columns, fewer than k={k}: rank at least k items")
    n_positives = np.asarray(n_positives)
    if (n_positives < 1).any():
        raise ValueError("every scored user needs at least one positive (the protocol skips the others)")
    ideal_n = np.minimum(k, n_positives)
    disc = _discounts(k)
    recall = hits[:, :k].sum(axis=1) / ideal_n
    ndcg = (hits[:, :k] * disc).sum(axis=1) / np.cumsum(disc)[ideal_n - 1]
    return recall, ndcg


def _one_list(ranked: Sequence[int], positives: Collection[int], k: int) -> tuple[float, float]:
    row = np.full((1, k), -1, dtype=np.int64)
    head = np.asarray(list(ranked)[:k], dtype=np.int64)
    row[0, : len(head)] = head
    hits = hit_matrix(row, [np.array(sorted(set(positives)), dtype=np.int64)])
    recall, ndcg = recall_ndcg(hits, np.array([len(set(positives))]), k)
    return float(recall[0]), float(ndcg[0])


def recall_at_k(ranked: Sequence[int], positives: Collection[int], k: int) -> float:
    """recall@k of one ranked list: hits in the first k / min(k, number of positives)."""
    return _one_list(ranked, positives, k)[0]


def ndcg_at_k(ranked: Sequence[int], positives: Collection[int], k: int) -> float:
    """ndcg@k of one ranked list, binary gains, ideal DCG over min(k, number of positives)."""
    return _one_list(ranked, positives, k)[1]


def _summary(hits: np.ndarray, n_pos: np.ndarray, ks: Sequence[int], rows: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {"users": int(rows.sum())}
    for k in ks:
        if rows.any():
            recall, ndcg = recall_ndcg(hits[rows], n_pos[rows], k)
            out[f"recall@{k}"], out[f"ndcg@{k}"] = float(recall.mean()), float(ndcg.mean())
        else:
            out[f"recall@{k}"] = out[f"ndcg@{k}"] = float("nan")
    return out


def evaluate_top_k(eval_set: EvalSet, ranked: np.ndarray, ks: Sequence[int] = KS,
                   curve_to: int = 0, item_vectors: np.ndarray | None = None) -> dict[str, Any]:
    """The protocol's metrics for ranked catalogue columns (users x K, -1 padded, K >= max(ks)).

    Returns ``users``, ``recall@k`` and ``ndcg@k`` for each k, the beyond-accuracy measures of
    the top 10 (``coverage@10``, ``novelty@10``, ``ild@10``, ``arp@10``: see
    :mod:`models.beyond_accuracy`; training popularity is ``eval_set.popularity``), the two
    slices, and ``ndcg_curve`` (ndcg@1..curve_to) when ``curve_to`` > 0. ``item_vectors`` (one
    row per catalogue column, zeros where an item has none) are what ``ild@10`` compares; without
    them it is NaN.
    """
    if ranked.shape[0] != len(eval_set.users):
        raise ValueError(f"ranked has {ranked.shape[0]} rows for {len(eval_set.users)} users")
    hits = hit_matrix(ranked, eval_set.positives)
    n_pos = np.array([len(p) for p in eval_set.positives], dtype=np.int64)
    everyone = np.ones(len(eval_set.users), dtype=bool)
    report: dict[str, Any] = _summary(hits, n_pos, ks, everyone)
    report.update(beyond_accuracy(ranked, eval_set.popularity, item_vectors, COVERAGE_K))
    top = ranked[:, :COVERAGE_K]

    small = eval_set.train_counts < SMALL_USER_MAX_TRAIN
    tail = eval_set.long_tail
    tail_pos = tuple(p[tail[p]] for p in eval_set.positives)
    tail_n = np.array([len(p) for p in tail_pos], dtype=np.int64)
    tail_hits = hit_matrix(ranked, tail_pos)
    tail_report = _summary(tail_hits, np.maximum(tail_n, 1), ks, tail_n > 0)
    recommended = top[top >= 0]
    tail_report[f"share_of_top{COVERAGE_K}"] = float(tail[recommended].mean()) if recommended.size else 0.0
    report["slices"] = {
        f"users_lt{SMALL_USER_MAX_TRAIN}_train": _summary(hits, n_pos, ks, small),
        "long_tail_items": tail_report,
    }
    if curve_to > 0:
        report["ndcg_curve"] = [float(recall_ndcg(hits, n_pos, k)[1].mean()) for k in range(1, curve_to + 1)]
    return report


def rank_with(eval_set: EvalSet, score_fn: ScoreFn, k: int, batch_size: int = 1024) -> np.ndarray:
    """Full ranking of every scored user by ``score_fn``, training items excluded (users x k)."""
    parts = []
    for start in range(0, len(eval_set.users), batch_size):
        users = eval_set.users[start : start + batch_size]
        scores = score_fn(users)
        if scores.shape != (len(users), len(eval_set.catalogue)):
            raise ValueError(
                f"score_fn returned shape {scores.shape}, expected {(len(users), len(eval_set.catalogue))}"
            )
        parts.append(top_k(scores, k, eval_set.seen[start : start + batch_size]))
    return np.concatenate(parts) if parts else np.empty((0, k), dtype=np.int64)


def evaluate_scorer(eval_set: EvalSet, score_fn: ScoreFn, ks: Sequence[int] = KS,
                    curve_to: int = 0, item_vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Rank with ``score_fn`` under the protocol and compute its metrics (see :func:`evaluate_top_k`)."""
    depth = max(max(ks), COVERAGE_K, curve_to)
    return evaluate_top_k(eval_set, rank_with(eval_set, score_fn, depth), ks, curve_to, item_vectors)


# ---- Spark version of the metrics -------------------------------------------------------------


def ranking_metrics_spark(recommendations: DataFrame, positives: DataFrame, k: int) -> dict[str, float]:
    """recall@k and ndcg@k in Spark, the same definitions as the NumPy version.

    ``recommendations``: (user_id, item_id, rank) with rank 1 = best; ``positives``: (user_id,
    item_id). Averaged over users with at least one positive (a user without recommendations
    scores 0).
    """
    from pyspark.sql import functions as F

    n_pos = positives.groupBy(S.COL_USER).agg(F.count(F.lit(1)).alias("n_pos"))
    hits = (
        recommendations.filter(F.col("rank") <= k)
        .join(positives, [S.COL_USER, S.COL_ITEM])
        .groupBy(S.COL_USER)
        .agg(F.count(F.lit(1)).alias("hits"), F.sum(1.0 / F.log2(F.col("rank") + 1)).alias("dcg"))
    )
    ideal_n = F.least(F.lit(k), F.col("n_pos"))
    idcg = F.aggregate(F.sequence(F.lit(1), ideal_n), F.lit(0.0), lambda acc, i: acc + 1.0 / F.log2(i + 1))
    per_user = n_pos.join(hits, S.COL_USER, "left").fillna(0, subset=["hits", "dcg"])
    row = per_user.agg(
        F.avg(F.col("hits") / ideal_n).alias("recall"), F.avg(F.col("dcg") / idcg).alias("ndcg")
    ).first()
    return {f"recall@{k}": float(row["recall"]), f"ndcg@{k}": float(row["ndcg"])}


def top_k_frame(eval_set: EvalSet, ranked: np.ndarray) -> pd.DataFrame:
    """Ranked catalogue columns as (user_id, item_id, rank) rows, for the Spark metrics."""
    users = np.repeat(eval_set.users, ranked.shape[1])
    ranks = np.tile(np.arange(1, ranked.shape[1] + 1), ranked.shape[0])
    cols = ranked.ravel()
    keep = cols >= 0
    return pd.DataFrame({S.COL_USER: users[keep], S.COL_ITEM: eval_set.catalogue[cols[keep]], "rank": ranks[keep]})
