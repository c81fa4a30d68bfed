"""Training examples for the ranker: label users and their rows (positives, hard and random
negatives: :func:`sample_examples`), and the rows' point-in-time features (:func:`feature_frame`).

Examples, per label user: positives = the label window's positives (rating >= 4, CLICK or
stronger) not seen in the fit part that retrieval finds (``missed_positives`` keeps the others
too); hard negatives = up to ``n_hard`` retrieval candidates
(:func:`models.retrieval.generate_candidates_batch`) that are not positives; random negatives =
``n_random`` catalogue items the user never touched.

Features. Every example row is stamped ``t0_u - 1 microsecond`` (just before the user's first
label event) and joined with Feast's ``get_historical_features``
(:func:`pipelines.feature_store.get_training_frame`): only feature values stamped at or before that
time are used. The ALS vectors are not taken from Feast: the embedding views hold the production
factors (fitted on all data, stamped at the cutoff), which the point-in-time join rightly refuses
for earlier labels; the rows get the vectors of the fit-part ALS instead. The same goes for what is
derived from that ALS or its events: the candidate's cosine with the user's ``last_5_items``
(Feast, point-in-time) uses the row's ALS vectors, and the item statistics (:func:`item_stats`)
count the ALS's own events (fit part for labels, all of train at test time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd

from models.als import Factors
from models.ranker.features import (
    COL_RETRIEVED,
    ITEM_EMBEDDING,
    RECENT,
    USER_EMBEDDING,
    recent_matrix,
    recent_similarity,
)
from models.retrieval import CandidateConfig, Candidates
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

COL_LABEL = "label"
ONE_US = timedelta(microseconds=1)
MAX_WINDOWS = 10  # list ids are user_id * MAX_WINDOWS + window


@dataclass(frozen=True)
class ExampleConfig:
    """How labels become examples. ``feature_service``: the Feast service the frame is pulled
    with: ``ranker_v1``, the ranker's service in ``feature_repo/recsys_repo.py``."""

    candidates: CandidateConfig = field(default_factory=lambda: CandidateConfig(n_als=100, n_similar=10))
    n_hard: int = 150  # every candidate of the default CandidateConfig (100 ALS + 5 x 10 similar)
    n_random: int = 10
    #: Keep label positives that retrieval missed. Off: the ranker only ever re-ranks retrieved
    #: candidates, and on ML-100K the missed ones taught it to prefer what ALS ranks low (the
    #: two-stage ndcg@10 on the same split fell with them).
    missed_positives: bool = False
    feature_service: str = "ranker_v1"
    #: Label windows: 1 = the last 20% of each user's training events; each further window is
    #: the last 20% of what precedes the previous one (its own earlier ALS), for more lists.
    windows: int = 1
    #: Label users per window, drawn at random (seeded) when more have a positive; None = all.
    #: The fixed costs (the label ALS, the Feast join, the cross-validated fit) grow with the
    #: rows, ``n_hard + n_random`` and the positives per user: the cap bounds a large
    #: catalogue's training time, and ML-100K's label users are all kept.
    max_users: int | None = 2_000
    seed: int = 42

    def __post_init__(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users={self.max_users} must be >= 1 (or None for every label user)")
        if self.n_hard < 0 or self.n_random < 0:
            raise ValueError(f"n_hard={self.n_hard} and n_random={self.n_random} must be >= 0")
        if not 1 <= self.windows <= MAX_WINDOWS:
            raise ValueError(f"windows={self.windows} must be within 1..{MAX_WINDOWS}")
        if self.n_hard == 0 and self.n_random == 0:
            raise ValueError("n_hard=0 and n_random=0 leave no negatives: set one above 0")


def first_times(events: DataFrame) -> pd.Series:
    """Per user, the time of their first event in ``events`` (a label or test window)."""
    from pyspark.sql import functions as F

    rows = events.groupBy(S.COL_USER).agg(F.min(S.COL_TS).alias(S.COL_TS)).toPandas()
    return pd.Series(pd.to_datetime(rows[S.COL_TS], utc=True).to_numpy(), index=rows[S.COL_USER].astype(np.int64))


def sample_label_users(positives: pd.DataFrame, max_users: int | None,
                       seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The label users (those with a positive), sorted, and their positives: all of them, or
    ``max_users`` drawn without replacement (seeded) when there are more."""
    users = np.unique(positives[S.COL_USER].to_numpy()).astype(np.int64)
    if max_users is None or len(users) <= max_users:
        return users, positives
    log.info("%d of %d label users sampled (ExampleConfig.max_users)", max_users, len(users))
    users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, positives[positives[S.COL_USER].isin(users)]


def sample_examples(candidates: dict[int, Candidates], positives: pd.DataFrame, seen: dict[int, set[int]],
                    label_time: pd.Series, catalogue: np.ndarray, cfg: ExampleConfig) -> pd.DataFrame:
    """(user_id, item_id, event_timestamp, label, retrieved) rows; ``event_timestamp`` = the
    user's label time minus one microsecond, so no feature stamped at a label event can join.

    Per label user (ascending ids), among users with a positive: the positives (ascending; only
    the retrieved ones unless ``cfg.missed_positives``; a user left with none is skipped), then
    the hard negatives in candidate order (``cfg.n_hard`` of them drawn when there are more), then
    ``cfg.n_random`` catalogue items (fewer when fewer are left) drawn from the catalogue, in its
    order, without the user's positives, hard negatives and ``seen`` items. The draws come from
    one seeded generator, user by user (hard, then random), so the same inputs give the same rows.

    Everything but the draws is computed for all users at once on (user, item) keys; a random
    item is drawn as a position among the catalogue positions the user has not taken
    (:func:`_nth_not_excluded`), never by scanning the catalogue per user."""
    rng = np.random.default_rng(cfg.seed)
    pos = _distinct_pairs(positives)
    users = np.unique(pos[:, 0])
    lists = [np.asarray(candidates[int(u)].item_ids, np.int64) if int(u) in candidates else _EMPTY for u in users]
    cand_user = np.repeat(np.arange(len(users)), [len(c) for c in lists])
    cand_item = np.concatenate(lists or [_EMPTY])
    pos_user = np.searchsorted(users, pos[:, 0])
    catalogue = np.asarray(catalogue, np.int64)
    codes = _sorted_distinct(np.concatenate([cand_item, pos[:, 1], catalogue]))  # (user, item) key: user * M + code
    cand_key = cand_user * len(codes) + np.searchsorted(codes, cand_item)
    pos_key = pos_user * len(codes) + np.searchsorted(codes, pos[:, 1])
    cand_keys = _sorted_distinct(cand_key)
    kept = np.ones(len(pos), bool) if cfg.missed_positives else _member(pos_key, cand_keys)
    has_pos = np.zeros(len(users), bool)
    has_pos[pos_user[kept]] = True
    is_hard = has_pos[cand_user] & ~_member(cand_key, pos_key[kept])  # sorted and distinct, as pos is
    hard_user, hard_item = cand_user[is_hard], cand_item[is_hard]
    hard_at = np.searchsorted(hard_user, np.arange(len(users) + 1))
    kept_at = np.searchsorted(pos_user[kept], np.arange(len(users) + 1))
    drawn = np.diff(hard_at) > cfg.n_hard  # these users' hard negatives are drawn in the loop
    order = np.argsort(catalogue, kind="stable")
    by_value = catalogue[order]
    seen_user, seen_item = _seen_pairs(seen, users, has_pos)
    taken_user = np.concatenate([pos_user[kept], seen_user, hard_user[~drawn[hard_user]]])
    row, position = _catalogue_positions(by_value, order, np.concatenate([pos[kept, 1], seen_item,
                                                                            hard_item[~drawn[hard_user]]]))
    taken = _sorted_distinct(taken_user[row] * len(catalogue) + position)  # ascending: user, then position
    taken_at = np.searchsorted(taken // max(len(catalogue), 1), np.arange(len(users) + 1))
    kept_item = pos[kept, 1]
    parts: list[np.ndarray] = []
    counts: list[int] = []
    for u in np.flatnonzero(has_pos):
        excluded = taken[taken_at[u]:taken_at[u + 1]] - u * len(catalogue)
        hard = hard_item[hard_at[u]:hard_at[u + 1]]
        if drawn[u]:
            hard = rng.choice(hard, cfg.n_hard, replace=False)
            excluded = np.union1d(excluded, _catalogue_positions(by_value, order, hard)[1])
        left = len(catalogue) - len(excluded)
        # n of ``left`` positions: the same draw as n items of the pool array itself
        rand = catalogue[_nth_not_excluded(excluded, rng.choice(left, min(cfg.n_random, left), replace=False))] \
            if left else _EMPTY
        mine = kept_item[kept_at[u]:kept_at[u + 1]]
        parts += [mine, hard, rand]
        counts.append(len(mine) + len(hard) + len(rand))
    row_user = np.repeat(np.flatnonzero(has_pos), counts)
    items = np.concatenate(parts or [_EMPTY]).astype(np.int64)
    first = np.repeat(np.cumsum(counts) - np.asarray(counts, np.int64), counts)
    frame = pd.DataFrame({
        S.COL_USER: users[row_user].astype(np.int64), S.COL_ITEM: items,
        COL_LABEL: ((np.arange(len(items)) - first) < np.diff(kept_at)[row_user]).astype(np.float32),
        COL_RETRIEVED: _member(row_user * len(codes) + np.searchsorted(codes, items), cand_keys)})
    frame[S.COL_TS] = frame[S.COL_USER].map(label_time) - ONE_US
    return frame


_EMPTY = np.empty(0, np.int64)


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort (numpy's hash-based unique is slower on these int64 keys)."""
    out = np.sort(values)
    return out[np.r_[True, out[1:] != out[:-1]]] if len(out) else out


def _member(values: np.ndarray, sorted_distinct: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_distinct)`` for a sorted, distinct reference (one binary search)."""
    at = np.minimum(np.searchsorted(sorted_distinct, values), max(len(sorted_distinct) - 1, 0))
    return sorted_distinct[at] == values if len(sorted_distinct) else np.zeros(len(values), bool)


def _distinct_pairs(positives: pd.DataFrame) -> np.ndarray:
    """(n, 2) int64 distinct (user_id, item_id) of ``positives``, sorted by user then item."""
    pairs = np.stack([positives[S.COL_USER].to_numpy(np.int64), positives[S.COL_ITEM].to_numpy(np.int64)], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _seen_pairs(seen: dict[int, set[int]], users: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item) of the ``seen`` items of ``users[wanted]``."""
    index = np.flatnonzero(wanted)
    items = [np.fromiter(seen.get(int(users[u]), ()), np.int64) for u in index]
    return np.repeat(index, [len(i) for i in items]), np.concatenate(items or [_EMPTY])


def _catalogue_positions(by_value: np.ndarray, order: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of ``items``, catalogue position) for every catalogue position holding one of ``items``
    (every position of a repeated id; an id not in the catalogue has none), in ``items`` order.
    ``by_value`` = the catalogue sorted, ``order`` = the stable argsort that sorts it."""
    lo, hi = np.searchsorted(by_value, items, "left"), np.searchsorted(by_value, items, "right")
    counts = hi - lo
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(np.arange(len(items)), counts), order[np.repeat(lo, counts) + offsets]


def _nth_not_excluded(excluded: np.ndarray, nth: np.ndarray) -> np.ndarray:
    """Positions of the ``nth`` (0-based) positions that are not in ``excluded`` (sorted,
    distinct): position p is the n-th kept one where n = p - (excluded positions below p), and
    ``excluded[j] - j`` counts the kept positions below ``excluded[j]``. Example: excluded
    [1, 2, 5] of 7 keeps [0, 3, 4, 6], so nth [3, 0] -> [6, 0]."""
    return nth + np.searchsorted(excluded - np.arange(len(excluded)), nth, side="right")


def candidate_rows(candidates: dict[int, Candidates], when: pd.Series) -> pd.DataFrame:
    """(user_id, item_id, event_timestamp) for every candidate; time = ``when[user] - 1 us``."""
    users = np.concatenate([np.full(len(c), u, np.int64) for u, c in candidates.items()] or [np.empty(0, np.int64)])
    items = np.concatenate([c.item_ids for c in candidates.values()] or [np.empty(0, np.int64)])
    frame = pd.DataFrame({S.COL_USER: users, S.COL_ITEM: items.astype(np.int64)})
    frame[S.COL_TS] = frame[S.COL_USER].map(when) - ONE_US
    return frame


def attach_embeddings(frame: pd.DataFrame, factors: Factors) -> pd.DataFrame:
    """Set ``user_embedding``/``item_embedding`` from ``factors`` (None where a vector is missing)."""
    out = frame.copy()
    for column, ids, lookup in ((USER_EMBEDDING, out[S.COL_USER], factors.user_vectors),
                                (ITEM_EMBEDDING, out[S.COL_ITEM], factors.item_vectors)):
        vectors, known = lookup(ids.to_numpy(dtype=np.int64))
        out[column] = [v if k else None for v, k in zip(list(vectors), known)]
    return out


#: Pseudo-events pulling a rarely seen item's mean rating / positive share toward the overall one.
STATS_PRIOR = 20.0


def item_stats(events: DataFrame) -> pd.DataFrame:
    """Per item of ``events``: ``item_events`` (count), ``item_mean_rating`` (RATING events only;
    NaN without any) and ``item_positive_rate`` (share of positives by the protocol's rule), the
    last two smoothed with :data:`STATS_PRIOR` pseudo-events at the overall value. Computed from
    exactly the events the matching ALS is fitted on: the fit part for label rows, all of train
    for test rows, so the statistics are as of the same split point as the ALS score."""
    from pyspark.sql import functions as F

    from models.protocol import positive_condition

    is_rating = F.col(S.COL_EVENT_TYPE) == S.EventType.RATING.value
    rows = events.groupBy(S.COL_ITEM).agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.when(is_rating, 1).otherwise(0)).alias("n_ratings"),
        F.sum(F.when(is_rating, F.col(S.COL_VALUE))).alias("rating_sum"),
        F.sum(positive_condition().cast("double")).alias("positives"))
    rows = cast(pd.DataFrame, rows.toPandas()).set_index(S.COL_ITEM)
    mean_rating = rows["rating_sum"].sum() / max(rows["n_ratings"].sum(), 1)
    positive_rate = rows["positives"].sum() / max(rows["n"].sum(), 1)
    out = pd.DataFrame(index=rows.index.astype(np.int64))
    out["item_events"] = rows["n"].to_numpy(np.float64)
    out["item_mean_rating"] = np.where(rows["n_ratings"] > 0, (rows["rating_sum"].fillna(0) + STATS_PRIOR * mean_rating)
                                       / (rows["n_ratings"] + STATS_PRIOR), np.nan)
    out["item_positive_rate"] = ((rows["positives"] + STATS_PRIOR * positive_rate) / (rows["n"] + STATS_PRIOR)).to_numpy()
    return out


RECENT_ITEMS = "last_5_items"  # Feast's user_realtime view: the user's recent items, latest first


def attach_recent_similarity(frame: pd.DataFrame, factors: Factors) -> pd.DataFrame:
    """``frame`` with :data:`models.ranker.features.RECENT` from its (point-in-time) ``last_5_items`` and
    ``factors``: the same vectors as the row's ALS score."""
    recent_ids = recent_matrix(frame[RECENT_ITEMS].tolist() if RECENT_ITEMS in frame else [None] * len(frame))
    item_vectors, known = factors.item_vectors(frame[S.COL_ITEM].to_numpy(np.int64))
    values = recent_similarity(np.where(known[:, None], item_vectors, 0.0), recent_ids, factors.item_vectors)
    out = frame.copy()
    for column, (name, _) in enumerate(RECENT):
        out[name] = values[:, column]
    return out


def attach_item_stats(frame: pd.DataFrame, stats: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` with :func:`item_stats` columns (NaN for an item without events)."""
    if stats is None:
        return frame
    return frame.drop(columns=[c for c in stats.columns if c in frame.columns]).join(stats, on=S.COL_ITEM)


def feature_frame(entity_df: pd.DataFrame, settings: Settings, factors: Factors,
                  feature_service: str = "ranker_v1", stats: pd.DataFrame | None = None) -> pd.DataFrame:
    """Point-in-time features for entity rows (Feast), in the rows' own order, with the vectors
    of ``factors`` and the item statistics ``stats`` of the same events (module docstring)."""
    from pipelines.feature_store import training_frame_in_order

    started = time.perf_counter()
    frame = training_frame_in_order(entity_df, feature_service, settings)
    log.info("feature frame: %d rows x %d columns from %r in %.1fs", len(frame), frame.shape[1], feature_service,
             time.perf_counter() - started)
    return attach_recent_similarity(attach_item_stats(attach_embeddings(frame, factors), stats), factors)
