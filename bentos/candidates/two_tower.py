"""The two-tower strategy of /recommend (:class:`TwoTowerRetriever`): the user vector computed per
request from the online row the engine already read, with the model's own encoder and user tower
(:meth:`models.two_tower.export.LoadedTwoTower.user_vectors`, the code training validated), and
the nearest of the catalogue's item vectors that the export carries, by inner product."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

Ranked = tuple[list[int], list[float]]  # item ids, best first, and their scores


class TwoTowerRetriever:
    """Holds a loaded two-tower model (:class:`~models.two_tower.export.LoadedTwoTower`) and an
    exact inner-product FAISS index over its catalogue vectors (unit rows: inner product =
    cosine). ``ready`` is False for an export without item vectors: it then retrieves nothing."""

    def __init__(self, loaded: Any) -> None:
        from models.index import IndexConfig, ItemIndex

        self.model = loaded
        self.version = str(loaded.metadata.get("version") or "unversioned")
        self.index: ItemIndex | None = None
        # the SavedModel's call and the encoder are safe to share; one lock keeps the per-request
        # TensorFlow call from running beside itself, which only oversubscribes the cores
        self._lock = threading.Lock()
        ids, vectors = getattr(loaded, "catalogue_ids", None), getattr(loaded, "catalogue_vectors", None)
        if ids is None or vectors is None or len(ids) == 0:
            log.warning("the two-tower model has no catalogue item vectors: serving without two-tower candidates")
            return
        # exact search: the flat index answers a few thousand items in well under a millisecond.
        # A 10M-item catalogue needs the IVF/HNSW path of issue 16 (ItemIndex's "hnsw" kind and
        # its recall calibration), not a flat scan per request
        self.index = ItemIndex.build(ids, vectors, "ip", IndexConfig(kind="flat"))

    @property
    def ready(self) -> bool:
        return self.index is not None

    def user_frame(self, user_id: int | None, user_row: Mapping[str, Any]) -> pd.DataFrame:
        """The one-row frame of the user tower's columns from the online row (short feature names);
        a feature the row lacks is None, which the encoder masks, as it does in training."""
        from models.two_tower.features import USER_COLUMNS
        from recsys import schema as S

        row = {col: user_row.get(col) for col in USER_COLUMNS}
        row[S.COL_USER] = None if user_id is None else int(user_id)
        return pd.DataFrame([row], columns=list(USER_COLUMNS))

    def user_vector(self, user_id: int | None, user_row: Mapping[str, Any]) -> np.ndarray:
        """float32 (1, output_dim): the user tower's vector, as training computes it."""
        with self._lock:
            return self.model.user_vectors(self.user_frame(user_id, user_row))

    def retrieve(self, user_id: int | None, user_row: Mapping[str, Any], seen: set[int], n: int) -> Ranked:
        """Up to ``n`` nearest unseen items, best first, and their inner products."""
        if self.index is None or n <= 0:
            return [], []
        scores, ids = self.index.search(self.user_vector(user_id, user_row), n + len(seen))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in seen][:n]
        return [i for i, _ in pairs], [s for _, s in pairs]


def load_retriever(folder: Path | None) -> TwoTowerRetriever | None:
    """The retriever of a two-tower export folder, None when there is none or it cannot be loaded
    (logged: the engine serves the other strategies, never fails to start for it)."""
    if folder is None:
        return None
    if not Path(folder).exists():
        log.warning("two-tower folder %s does not exist: serving without two-tower candidates", folder)
        return None
    try:
        from models.two_tower.export import load_two_tower

        return TwoTowerRetriever(load_two_tower(Path(folder)))
    except Exception:  # noqa: BLE001 - any broken export must degrade, not stop the service
        log.exception("the two-tower model in %s could not be loaded: serving without two-tower candidates "
                      "(retrain with `recsys train two-tower`)", folder)
        return None
