"""The MLflow pyfunc wrapper of the exported ranker (:class:`RankerModel`): what the registered
``recsys-ranker`` model predicts once loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from recsys import schema as S


class RankerModel(mlflow.pyfunc.PythonModel):
    """Input: candidate rows, one user's candidates together: ``user_id``, ``item_id``, any of
    the ranker's feature columns as :func:`pipelines.feature_store.get_training_frame` names them
    (embeddings as lists; a missing column counts as missing values) and optionally
    ``event_timestamp`` for the context. Output: ``user_id``, ``item_id`` and ``score`` (the
    exported ranker's logit, blend included), row-aligned with the input."""

    def load_context(self, context: Any) -> None:
        from models.ranker.scorer import load_scorer

        self.scorer = load_scorer(Path(context.artifacts["ranker"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in (S.COL_USER, S.COL_ITEM) if c not in model_input.columns]
        if missing:
            raise ValueError(f"ranker input lacks column(s) {missing}: pass one row per (user_id, item_id) candidate")
        frame = model_input.reset_index(drop=True)
        return pd.DataFrame({S.COL_USER: frame[S.COL_USER].to_numpy(np.int64),
                             S.COL_ITEM: frame[S.COL_ITEM].to_numpy(np.int64), "score": self.scorer.score_frame(frame)})
