"""Features -> tensors, shared by training and serving so the two can never disagree: the
ranker's inputs (:data:`USER_INPUTS`, :data:`ITEM_INPUTS`), the :class:`FeatureEncoder` and the
per-list ALS features (:func:`list_features`, :func:`recent_similarity`).

Inputs are the online features the service reads (short Feast feature names, as
``get_training_frame`` and ``bentos.engine`` both name them):

- user: profile (``n_events``, ``n_events_7d``, ``mean_rating``, ``days_since_first_seen``),
  real-time (``interaction_count``, ``total_purchases``) and context (hour of day and day of week
  of the request, as sin/cos); every value has a missing-mask beside it (missing = imputed to the
  training mean, i.e. 0 after standardisation);
- item: profile (``price``, ``margin``, ``quality_score``, ``inventory``, ``popularity_1d``,
  ``popularity_7d``), whether its ``category_id`` is among the user's ``top_categories`` /
  ``preferred_categories`` (with masks), and the category itself (an embedding);
- ALS: the user and item vectors; the model computes ``user . item`` (the ALS score), both norms
  and the cosine itself (a missing vector is zeros plus a flag), and the score's place in the
  user's candidate list (:func:`list_features`). ``user * item`` per factor is optional and off:
  the ranker is trained on a label-time ALS and served with another fit, and factor axes do not
  carry over from one fit to the next;
- item statistics of the events the row's ALS is fitted on (:data:`ITEM_STATS`) and the
  candidate's cosine with the user's recent items (:data:`RECENT`), computed by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from models.columns import floats, is_list, transform
from recsys import schema as S

#: Item statistics of the events the row's ALS is fitted on
#: (:func:`models.ranker.examples.item_stats`): how many events, the mean rating, the share of
#: positive events (rating >= 4, CLICK or stronger), the last two smoothed toward the overall
#: value. ALS models *what* a user interacts with; the protocol's positives are the *liked* ones,
#: which these tell apart. Not in Feast (like the ALS vectors they are tied to the split, not to a
#: daily snapshot): missing = imputed.
ITEM_STATS: tuple[tuple[str, str], ...] = (
    ("item_events", "log1p"), ("item_mean_rating", "identity"), ("item_positive_rate", "identity"),
)
#: How close the candidate is to what the user did last: the cosine of its ALS vector with the
#: vectors of the user's ``last_5_items`` (Feast's real-time view), the best and the mean
#: (:func:`recent_similarity`). Users rate and click in sessions; ALS's user vector averages a
#: whole history and misses that (on ML-100K this is the ranker's largest gain over ALS). The
#: caller computes them with the vectors of the ALS that scores the row.
RECENT: tuple[tuple[str, str], ...] = (("recent_cosine_max", "identity"), ("recent_cosine_mean", "identity"))
#: (feature, transform) pairs; counts and prices are log1p'd before standardisation.
USER_NUMERIC: tuple[tuple[str, str], ...] = (
    ("n_events", "log1p"), ("n_events_7d", "log1p"), ("mean_rating", "identity"),
    ("days_since_first_seen", "log1p"), ("interaction_count", "log1p"), ("total_purchases", "log1p"),
)
ITEM_NUMERIC: tuple[tuple[str, str], ...] = (
    ("price", "log1p"), ("margin", "identity"), ("quality_score", "identity"), ("inventory", "log1p"),
    ("popularity_1d", "log1p"), ("popularity_7d", "log1p"),
) + ITEM_STATS + RECENT
USER_LISTS = ("top_categories", "preferred_categories")
USER_EMBEDDING, ITEM_EMBEDDING = "user_embedding", "item_embedding"
COL_RETRIEVED = "retrieved"  # training frames: whether retrieval found the row's item
#: training frames: which list (one user's candidates at one label time) a row belongs to;
#: without it a user's rows are one list
COL_LIST = "list_id"
N_CONTEXT = 4  # hour sin/cos, weekday sin/cos
#: Every online feature the ranker reads: the service must provide these (bentos.engine lists).
USER_INPUTS: tuple[str, ...] = tuple(n for n, _ in USER_NUMERIC) + USER_LISTS + (USER_EMBEDDING,)
ITEM_INPUTS: tuple[str, ...] = tuple(n for n, _ in ITEM_NUMERIC) + (S.COL_CATEGORY, ITEM_EMBEDDING)






def _id_set(value: Any, sets: dict[int, set[int]]) -> set[int]:
    """``value``'s ids as a set, built once per list object (keyed by ``id``: the caller keeps
    every list alive while ``sets`` lives)."""
    key = id(value)
    if key not in sets:
        sets[key] = {int(x) for x in value}
    return sets[key]




def _context(timestamps: Sequence[Any] | pd.Series) -> np.ndarray:
    """(n, 4): hour of day and day of week as sin/cos (in UTC; a naive time is read as UTC);
    missing times give zeros."""
    if not isinstance(timestamps, pd.Series) and all(isinstance(t, datetime) for t in timestamps):
        # the service's one request time: plain Python, pandas' parsing costs ~1 ms per call
        utc = [t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
               for t in timestamps]
        hour = np.array([t.hour + t.minute / 60.0 for t in utc], dtype=np.float64)
        day = np.array([t.weekday() for t in utc], dtype=np.float64)
    else:
        series = timestamps if isinstance(timestamps, pd.Series) else pd.Series(list(timestamps))
        ts = pd.to_datetime(series.reset_index(drop=True), utc=True, errors="coerce")
        hour = (ts.dt.hour + ts.dt.minute / 60.0).to_numpy(dtype=np.float64)
        day = ts.dt.dayofweek.to_numpy(dtype=np.float64)
    out = np.stack([np.sin(2 * math.pi * hour / 24), np.cos(2 * math.pi * hour / 24),
                    np.sin(2 * math.pi * day / 7), np.cos(2 * math.pi * day / 7)], axis=1)
    return np.nan_to_num(out)


def recent_similarity(item_vectors: np.ndarray, recent_ids: np.ndarray, lookup: Any,
                      chunk: int = 100_000) -> np.ndarray:
    """(n, 2) float64 :data:`RECENT` values: row i's best and mean cosine between
    ``item_vectors[i]`` (zeros = no vector) and the vectors of ``recent_ids[i]`` (its user's recent
    items, -1 = padding); NaN where either side has no vector. ``recent_ids`` of one row with
    n > 1 is one list for every row (the service: one user's candidates), looked up once.
    ``lookup(ids) -> (vectors, known)`` gives the recent items' vectors
    (``Factors.item_vectors``). Chunked: memory stays bounded."""
    recent_ids = np.asarray(recent_ids, dtype=np.int64)
    shared = len(recent_ids) == 1 and len(item_vectors) > 1
    out = np.full((len(item_vectors), 2), np.nan)
    for start in range(0, len(item_vectors), chunk):
        items = np.asarray(item_vectors[start:start + chunk], dtype=np.float32)
        ids = recent_ids if shared else recent_ids[start:start + chunk]
        vectors, known = lookup(ids.reshape(-1))
        vectors = np.where(known[:, None] & (ids.reshape(-1)[:, None] >= 0), vectors, 0.0).reshape(*ids.shape, -1)
        recent = vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-6)
        valid = np.linalg.norm(vectors, axis=-1) > 0
        if shared:  # the same arithmetic per row as below, on views of the one list
            recent = np.broadcast_to(recent, (len(items), *recent.shape[1:]))
            valid = np.broadcast_to(valid, (len(items), valid.shape[1]))
        item_norm = np.linalg.norm(items, axis=1)
        cosine = np.einsum("nmr,nr->nm", recent, items / (item_norm[:, None] + 1e-6))
        with np.errstate(invalid="ignore"):
            best = np.where(valid, cosine, -np.inf).max(axis=1)
            mean = np.where(valid, cosine, 0.0).sum(axis=1) / valid.sum(axis=1)
        ok = valid.any(axis=1) & (item_norm > 0)
        out[start:start + chunk] = np.where(ok[:, None], np.stack([best, mean], axis=1), np.nan)
    return out


def recent_matrix(lists: Sequence[Any], width: int = 5) -> np.ndarray:
    """(n, width) int64 item ids of each row's recent-items list (-1 = padding or no list)."""
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for row, value in enumerate(lists):
        if is_list(value) and len(value):
            ids = np.asarray(list(value)[:width], dtype=np.int64)
            out[row, : len(ids)] = ids
    return out


N_LIST = 2  # the ALS score against the user's candidate list: z-score, gap to the list's best


def list_features(dot: np.ndarray, groups: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) float32: each row's ALS score standardised within its group (one user's candidate
    list) and its gap to the group's best. Mean, std and best come from the ``reference`` rows
    (the retrieved candidates; random negatives are scored against the list, not part of it).
    A pointwise model needs this: raw ALS scores differ in scale from user to user. The serving
    endpoint computes the same over its batch (one user's candidates)."""
    dot = np.asarray(dot, dtype=np.float32)
    reference = np.ones(len(dot), bool) if reference is None else np.asarray(reference, bool)
    out = np.zeros((len(dot), N_LIST), dtype=np.float32)
    if not len(dot):
        return out
    # one pass per statistic over all groups (bincount), not one mask over all rows per group:
    # the latter is O(rows x groups), which a training frame of thousands of lists cannot afford
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1
    has_reference = np.bincount(group, weights=reference, minlength=n_groups) > 0
    used = reference | ~has_reference[group]  # a group without reference rows uses all of its rows
    count = np.bincount(group, weights=used, minlength=n_groups)
    mean = np.bincount(group, weights=np.where(used, dot, 0.0), minlength=n_groups) / count
    centred = dot - mean[group]
    std = np.sqrt(np.bincount(group, weights=np.where(used, centred * centred, 0.0), minlength=n_groups) / count)
    best = np.full(n_groups, -np.inf)
    np.maximum.at(best, group[used], dot[used])
    out[:, 0] = centred / (std[group] + 1e-6)
    out[:, 1] = dot - best[group]
    return out


@dataclass
class FeatureEncoder:
    """Turns feature columns into the model's tensors. ``means``/``stds`` are fitted on the
    training frame (after log1p where it applies), so missing values impute to the mean."""

    rank: int
    category_buckets: int
    user_means: list[float] = field(default_factory=list)
    user_stds: list[float] = field(default_factory=list)
    item_means: list[float] = field(default_factory=list)
    item_stds: list[float] = field(default_factory=list)

    @property
    def user_dim(self) -> int:
        return 2 * len(USER_NUMERIC) + 1 + N_CONTEXT

    @property
    def item_dim(self) -> int:
        return 2 * len(ITEM_NUMERIC) + 2 * len(USER_LISTS) + 1

    @classmethod
    def fit(cls, frame: pd.DataFrame, rank: int, category_buckets: int) -> FeatureEncoder:
        def stats(spec: tuple[tuple[str, str], ...]) -> tuple[list[float], list[float]]:
            means, stds = [], []
            for name, kind in spec:
                x = transform(floats(frame[name] if name in frame else None, len(frame)), kind)
                finite = x[np.isfinite(x)]
                means.append(float(finite.mean()) if finite.size else 0.0)
                std = float(finite.std()) if finite.size else 0.0
                stds.append(std if std > 1e-9 else 1.0)
            return means, stds

        user_means, user_stds = stats(USER_NUMERIC)
        item_means, item_stds = stats(ITEM_NUMERIC)
        return cls(rank, category_buckets, user_means, user_stds, item_means, item_stds)

    def _numeric(self, cols: Mapping[str, Any], spec: tuple[tuple[str, str], ...], means: list[float],
                 stds: list[float], n: int) -> np.ndarray:
        values, masks = [], []
        for (name, kind), mean, std in zip(spec, means, stds):
            x = transform(floats(cols.get(name), n), kind)
            missing = ~np.isfinite(x)
            values.append(np.where(missing, 0.0, (x - mean) / std))
            masks.append(missing.astype(np.float64))
        return np.stack(values + masks, axis=1)

    def user_matrix(self, cols: Mapping[str, Any], timestamps: Sequence[Any] | pd.Series, n: int) -> np.ndarray:
        """(n, user_dim): standardised values, their masks, has-ALS-vector, context."""
        has_vector = np.array([is_list(v) and len(v) == self.rank for v in column_of(cols, USER_EMBEDDING, n)])
        return np.concatenate([self._numeric(cols, USER_NUMERIC, self.user_means, self.user_stds, n),
                               has_vector[:, None].astype(np.float64), _context(timestamps)], axis=1).astype(np.float32)

    def item_matrix(self, cols: Mapping[str, Any], user_lists: Mapping[str, Sequence[Any]], n: int) -> np.ndarray:
        """(n, item_dim): standardised values, masks, category matches with the user's lists
        (row i against ``user_lists[name][i]``) and their masks, has-ALS-vector."""
        category = floats(cols.get(S.COL_CATEGORY), n)
        matches, masks = [], []
        sets: dict[int, set[int]] = {}  # one set per list object: serving repeats the user's list n times
        for name in USER_LISTS:
            lists = user_lists.get(name) or [None] * n
            known = np.array([is_list(v) and len(v) > 0 for v in lists]) & np.isfinite(category)
            hit = np.array([bool(k) and int(c) in _id_set(v, sets) for k, c, v in zip(known, category, lists)])
            matches.append(hit.astype(np.float64))
            masks.append((~known).astype(np.float64))
        has_vector = np.array([is_list(v) and len(v) == self.rank for v in column_of(cols, ITEM_EMBEDDING, n)])
        return np.concatenate([self._numeric(cols, ITEM_NUMERIC, self.item_means, self.item_stds, n),
                               np.stack(matches + masks, axis=1), has_vector[:, None].astype(np.float64)],
                              axis=1).astype(np.float32)

    def categories(self, cols: Mapping[str, Any], n: int) -> np.ndarray:
        """(n,) int32 bucket of ``category_id``: 1 + id mod (buckets - 1); 0 = missing."""
        category = floats(cols.get(S.COL_CATEGORY), n)
        known = np.isfinite(category)
        out = np.zeros(n, dtype=np.int32)
        out[known] = 1 + np.mod(category[known].astype(np.int64), self.category_buckets - 1)
        return out

    def embeddings(self, values: Sequence[Any], n: int) -> np.ndarray:
        """(n, rank) float32; a missing vector (or one of the wrong size) is all zeros."""
        if isinstance(values, np.ndarray) and values.shape == (n, self.rank):
            return values.astype(np.float32, copy=False)
        values = list(values)
        try:  # every row a vector (the usual candidate list): one conversion in C
            dense = np.array(values, dtype=np.float32)
            if dense.shape == (n, self.rank):
                return dense
        except (TypeError, ValueError):  # a missing (None) or ragged row: row by row below
            pass
        out = np.zeros((n, self.rank), dtype=np.float32)
        rows = [row for row, value in enumerate(values) if is_list(value) and len(value) == self.rank]
        if rows:  # one C-level stack, not a row-by-row copy
            out[rows] = np.stack([np.asarray(values[row], dtype=np.float32) for row in rows])
        return out

    def encode_frame(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """One training row per frame row: the model's inputs (row-aligned with ``frame``)."""
        n = len(frame)
        cols = {c: frame[c].tolist() for c in frame.columns}
        lists = {name: cols.get(name) or [None] * n for name in USER_LISTS}
        user_vec = self.embeddings(column_of(cols, USER_EMBEDDING, n), n)
        item_vec = self.embeddings(column_of(cols, ITEM_EMBEDDING, n), n)
        reference = frame[COL_RETRIEVED].to_numpy(bool) if COL_RETRIEVED in frame else None
        return {
            "als_list": list_features((user_vec * item_vec).sum(axis=1), list_ids(frame), reference),
            "user": self.user_matrix(cols, frame[S.COL_TS], n),
            "item": self.item_matrix(cols, lists, n),
            "item_category": self.categories(cols, n),
            "user_embedding": user_vec,
            "item_embedding": item_vec,
        }


def list_ids(frame: pd.DataFrame) -> np.ndarray:
    """Each row's list: :data:`COL_LIST` where the frame has it, else its user."""
    return frame[COL_LIST if COL_LIST in frame else S.COL_USER].to_numpy()


def column_of(cols: Mapping[str, Any], name: str, n: int) -> Sequence[Any]:
    """``cols[name]``, or ``n`` missing values when there is no such column."""
    values = cols.get(name)
    return [None] * n if values is None else values
