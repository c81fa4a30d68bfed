"""The MLflow pyfunc wrapper of the exported two towers (:class:`TwoTowerModel`): what the
registered ``recsys-two-tower`` model predicts once loaded.

A pyfunc, not MLflow's TensorFlow flavour: ``mlflow.tensorflow.log_model`` (3.17) takes one
Keras model or ``tf.Module`` fed with tensors, while this model is two SavedModels behind
:class:`~models.two_tower.features.TwoTowerEncoder` (NumPy hashing, the title vocabulary, item
ages), which turns feature frames into those tensors. The wrapper serves the export folder
itself, through :func:`~models.two_tower.export.load_two_tower`, so it computes what serving
computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from models.two_tower.features import ITEM_COLUMNS, USER_COLUMNS
from recsys import schema as S

ARTIFACT = "two_tower"  # the artifact key of the export folder


class TwoTowerModel(mlflow.pyfunc.PythonModel):
    """Input: rows with every user column (:data:`~models.two_tower.features.USER_COLUMNS`), every
    item column (:data:`~models.two_tower.features.ITEM_COLUMNS`), or both, as the two-tower
    feature service names them; ``event_timestamp`` ages the items (else now). Output, row-aligned:
    ``user_id`` and ``user_vector`` for user rows, ``item_id`` and ``item_vector`` for item rows
    (lists of float32, unit norm), and ``score`` (their dot product) when a row has both."""

    def load_context(self, context: Any) -> None:
        from models.two_tower.export import load_two_tower

        self.model = load_two_tower(Path(context.artifacts[ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input.reset_index(drop=True)
        users = all(c in frame.columns for c in USER_COLUMNS)
        items = all(c in frame.columns for c in ITEM_COLUMNS)
        if not (users or items):
            lacking = {"user": [c for c in USER_COLUMNS if c not in frame.columns],
                       "item": [c for c in ITEM_COLUMNS if c not in frame.columns]}
            raise ValueError(f"two-tower input has neither tower's columns (missing {lacking}): pass every user "
                             "column, every item column, or both (nulls are fine)")
        out = pd.DataFrame(index=frame.index)
        vectors: dict[str, np.ndarray] = {}
        if users:
            vectors["user"] = self.model.user_vectors(frame)
            out[S.COL_USER] = frame[S.COL_USER]
            out["user_vector"] = list(vectors["user"])
        if items:
            vectors["item"] = self.model.item_vectors(frame)
            out[S.COL_ITEM] = frame[S.COL_ITEM]
            out["item_vector"] = list(vectors["item"])
        if users and items:
            out["score"] = (vectors["user"] * vectors["item"]).sum(axis=1)
        return out
