"""The exported ranker as the service's ``Scorer`` (:class:`RankerScorer`, loaded by
:func:`load_scorer`): the same :class:`~models.ranker.features.FeatureEncoder` as training turns
one user's features and N candidates' into the SavedModel's tensors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.ranker.export import ITEM_STATS_FILE, META_FILE, SAVED_MODEL_DIR, SERVE_ENDPOINT
from models.ranker.features import (
    ITEM_EMBEDDING,
    ITEM_STATS,
    USER_EMBEDDING,
    USER_INPUTS,
    USER_LISTS,
    FeatureEncoder,
    column_of,
)
from recsys import schema as S
from recsys.arrays import positions


class RankerScorer:
    """The exported ranker as the service's ``Scorer`` (bentos.engine): logits for one user
    (``user``: feature name -> value) against N candidates (``items``: feature name -> N values)."""

    def __init__(self, folder: Path) -> None:
        import tensorflow as tf

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        self.encoder = FeatureEncoder(**meta["encoder"])
        self.version = str(meta.get("version") or meta.get("mlflow_run_id") or meta.get("created", "unknown"))
        self.metadata = meta
        self._model = tf.saved_model.load(str(folder / SAVED_MODEL_DIR))
        self._serve = getattr(self._model, SERVE_ENDPOINT)
        stats_path = folder / ITEM_STATS_FILE
        stats = pd.read_parquet(stats_path).sort_index() if stats_path.is_file() else None
        self._stats_ids = stats.index.to_numpy(np.int64) if stats is not None else np.empty(0, np.int64)
        self._stats = {name: stats[name].to_numpy(np.float64) for name, _ in ITEM_STATS} if stats is not None else {}

    def with_item_stats(self, items: Mapping[str, Sequence[Any]], item_ids: np.ndarray) -> Mapping[str, Sequence[Any]]:
        """``items`` plus the exported :data:`ITEM_STATS` of ``item_ids`` where the caller has none
        (the service; training and evaluation frames carry their own). NaN = unknown = imputed."""
        missing = [name for name, _ in ITEM_STATS if name not in items]
        if not missing or not self._stats:
            return items
        pos, found = positions(self._stats_ids, np.asarray(item_ids, dtype=np.int64))
        return {**items, **{name: np.where(found, self._stats[name][pos], np.nan).tolist() for name in missing}}

    def inputs(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], n: int,
               context: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The ``serve`` endpoint's tensors for one user and ``n`` candidates."""
        enc = self.encoder
        when = (context or {}).get("timestamp") or datetime.now(timezone.utc)
        user_cols = {k: [v] for k, v in user.items()}
        lists = {name: [user.get(name)] * n for name in USER_LISTS}
        return {
            "user": enc.user_matrix(user_cols, [when], 1)[0],
            "items": enc.item_matrix(items, lists, n),
            "item_category": enc.categories(items, n),
            "user_embedding": enc.embeddings([user.get(USER_EMBEDDING)], 1)[0],
            "item_embedding": enc.embeddings(column_of(items, ITEM_EMBEDDING, n), n),
        }

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        """(N,) float64 logits, one per candidate in ``item_ids`` order. ``strategy_scores`` is
        not an input: candidates from different strategies carry incomparable scores."""
        n = len(item_ids)
        if n == 0:
            return np.empty(0, dtype=np.float64)
        out = self._serve(**self.inputs(user, self.with_item_stats(items, item_ids), n, context))
        return np.asarray(out, dtype=np.float64).reshape(n)

    def score_frame(self, frame: pd.DataFrame, progress: bool = False) -> np.ndarray:
        """(len(frame),) float64 logits for candidate rows (``user_id``, ``item_id``, feature
        columns named as in :func:`pipelines.feature_store.get_training_frame`, optionally
        ``event_timestamp`` for the context), row-aligned. Each user's rows are scored together
        as one candidate list (the list features depend on the list), with the user's features
        taken from their first row."""
        out = np.empty(len(frame), dtype=np.float64)
        if not len(frame):
            return out
        from tqdm.auto import tqdm

        user_cols = [c for c in USER_INPUTS if c in frame.columns]
        groups = frame.groupby(S.COL_USER, sort=False).indices
        for rows in tqdm(groups.values(), total=len(groups), desc="score", unit="user", disable=not progress):
            group = frame.iloc[rows]
            first = group.iloc[0]
            when = first[S.COL_TS] if S.COL_TS in group.columns else None
            out[rows] = self.score({c: first[c] for c in user_cols}, {c: group[c].tolist() for c in group.columns},
                                   group[S.COL_ITEM].to_numpy(np.int64), np.zeros(len(rows)), {"timestamp": when})
        return out


def load_scorer(path: Path) -> RankerScorer:
    """The ranker saved by :func:`export_ranker` (a BentoML model's path works as is)."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / SAVED_MODEL_DIR).is_dir():
        raise FileNotFoundError(f"no ranker at {path}: expected {META_FILE} and {SAVED_MODEL_DIR}/ "
                                "(train one with `recsys train ranker`)")
    return RankerScorer(path)
