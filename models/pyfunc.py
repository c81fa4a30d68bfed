"""The MLflow pyfunc wrappers of the ALS factors (:class:`AlsRecommender`) and the item -> item
index (:class:`SimilarItems`): what a registered model predicts once loaded. The ranker's wrapper
is :class:`models.ranker.pyfunc.RankerModel`, inside the ranker's package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from recsys import schema as S


class AlsRecommender(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with ``user_id``; params ``k`` (default 10). Output: ``user_id``,
    ``item_ids`` and ``scores`` (top k by user . item; unknown users get empty lists)."""

    def load_context(self, context: Any) -> None:
        from models.als import load_factors

        artifacts = context.artifacts
        self.factors = load_factors(Path(artifacts["user_embedding"]), Path(artifacts["item_embedding"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from models.protocol import top_k

        k = int((params or {}).get("k", 10))
        users = np.asarray(model_input[S.COL_USER], dtype=np.int64)
        vectors, known = self.factors.user_vectors(users)
        scores = vectors @ self.factors.items.T
        cols = top_k(scores, k) if len(users) else np.empty((0, k), np.int64)
        rows = []
        for row, user in enumerate(users.tolist()):
            picked = cols[row][cols[row] >= 0] if known[row] else np.empty(0, np.int64)
            rows.append({S.COL_USER: user, "item_ids": self.factors.item_ids[picked].tolist(),
                         "scores": scores[row, picked].astype(float).tolist()})
        return pd.DataFrame(rows, columns=[S.COL_USER, "item_ids", "scores"])


class SimilarItems(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with ``item_id``; params ``k``. Output: ``item_id``, ``item_ids``,
    ``scores`` (cosine neighbours from the item -> item index, the item itself left out)."""

    def load_context(self, context: Any) -> None:
        from models.retrieval import RetrievalIndex

        self.index = RetrievalIndex.load(Path(context.artifacts["index"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        items = np.asarray(model_input[S.COL_ITEM], dtype=np.int64)
        known = self.index.item_to_item.contains(items)
        rows = []
        for item, ok in zip(items.tolist(), known.tolist()):
            if not ok:
                rows.append({S.COL_ITEM: item, "item_ids": [], "scores": []})
                continue
            scores, ids = self.index.item_to_item.search(self.index.item_to_item.vectors(np.array([item])), k + 1)
            keep = (ids[0] >= 0) & (ids[0] != item)
            rows.append({S.COL_ITEM: item, "item_ids": ids[0][keep][:k].tolist(),
                         "scores": scores[0][keep][:k].astype(float).tolist()})
        return pd.DataFrame(rows, columns=[S.COL_ITEM, "item_ids", "scores"])
