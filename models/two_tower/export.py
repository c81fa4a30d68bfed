"""The two towers on disk and back: :func:`export_two_tower` writes a folder (layout below) and
:func:`load_two_tower` reads it as a :class:`LoadedTwoTower`, whose vectors come from the same
encoder code and the same batched calls as training's, so a served vector equals the trained one.

Layout of the folder::

    user_tower/       SavedModel, endpoint ``serve``: the user tensors (dict) -> float32 (n, 128)
    item_tower/       SavedModel, endpoint ``serve``: the item tensors (dict) -> float32 (n, 128)
    encoder.json      the encoder's parameters and statistics
    title_vocabulary.txt  the title vocabulary, one JSON string a line
    two_tower.json    config, kept loss, validation metrics (per trained loss), history, created
    item_vectors.npy  float32 (n, output_dim): the item tower's vector of every catalogue item
    item_ids.npy      int64 (n,): their item ids, row for row (both written by the training job,
                      :func:`write_item_vectors`; an export without them serves no candidates)

TensorFlow is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.two_tower.config import TwoTowerConfig
from models.two_tower.features import ITEM_TENSORS, USER_TENSORS, TwoTowerEncoder
from models.two_tower.network import run_tower, tower_inputs
from models.two_tower.training import TrainedTwoTower
from recsys.arrays import replace_dir

USER_TOWER_DIR, ITEM_TOWER_DIR = "user_tower", "item_tower"
SAVED_MODEL_DIRS = (USER_TOWER_DIR, ITEM_TOWER_DIR)
META_FILE = "two_tower.json"
SERVE_ENDPOINT = "serve"
ITEM_VECTORS_FILE, ITEM_IDS_FILE = "item_vectors.npy", "item_ids.npy"

log = logging.getLogger(__name__)


def export_two_tower(trained: TrainedTwoTower, folder: Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the folder described in this module's docstring (``metadata`` is merged into
    ``two_tower.json``). Replaces ``folder`` whole, never leaving a half-written one."""

    def write(tmp: Path) -> None:
        for name, tower, tensors in ((USER_TOWER_DIR, trained.user_tower, USER_TENSORS),
                                     (ITEM_TOWER_DIR, trained.item_tower, ITEM_TENSORS)):
            _export_tower(tower, trained.encoder, tensors, tmp / name)
        trained.encoder.save(tmp)
        meta = {"config": trained.config.to_json(), "loss": trained.loss, "validation": trained.trials,
                "metrics": trained.metrics, "history": trained.history, "device": trained.device,
                "rows": trained.rows, "created": datetime.now(UTC).isoformat(), **dict(metadata or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")

    return replace_dir(Path(folder), write)


def _export_tower(tower: Any, encoder: TwoTowerEncoder, tensors: tuple[str, ...], path: Path) -> None:
    """``tower`` as a SavedModel whose ``serve`` endpoint takes its ``tensors`` as one dict."""
    import keras
    import tensorflow as tf

    specs = {name: tf.TensorSpec([None, *spec.shape[1:]], spec.dtype, name=name)
             for name, spec in tower_inputs(encoder).items() if name in tensors}
    archive = keras.export.ExportArchive()
    archive.track(tower)

    def serve(inputs: dict[str, Any]) -> Any:
        return tower(inputs, training=False)

    archive.add_endpoint(SERVE_ENDPOINT, serve, input_signature=[specs])
    archive.write_out(str(path), verbose=False)


def write_item_vectors(folder: Path, item_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add the catalogue's item vectors to an export folder (``item_ids.npy``, ``item_vectors.npy``),
    the index the served model searches. Raises ValueError when they do not pair up row for row."""
    ids = np.asarray(item_ids, dtype=np.int64)
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.ndim != 2 or len(ids) != len(vecs):
        raise ValueError(f"item vectors of shape {vecs.shape} do not pair with {len(ids)} item ids: "
                         "pass one (n, output_dim) row per id")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("item ids repeat: pass one row per catalogue item (e.g. catalogue_frame)")
    np.save(Path(folder) / ITEM_IDS_FILE, ids)
    np.save(Path(folder) / ITEM_VECTORS_FILE, vecs)


class LoadedTwoTower:
    """An exported two-tower model: ``user_vectors(frame)`` and ``item_vectors(frame)``, float32
    (n, output_dim) with unit rows, computed by the SavedModels on the encoder's tensors;
    ``catalogue_ids`` / ``catalogue_vectors``: the catalogue's precomputed item vectors (None in an
    export written without them: it is loadable, and retrieves nothing)."""

    def __init__(self, folder: Path) -> None:
        import tensorflow as tf

        folder = Path(folder)
        self.metadata: dict[str, Any] = json.loads((folder / META_FILE).read_text())
        self.config = TwoTowerConfig.from_json(self.metadata["config"])
        self.loss: str = self.metadata["loss"]
        self.encoder = TwoTowerEncoder.load(folder)
        self._user = tf.saved_model.load(str(folder / USER_TOWER_DIR))
        self._item = tf.saved_model.load(str(folder / ITEM_TOWER_DIR))
        self.catalogue_ids: np.ndarray | None = None
        self.catalogue_vectors: np.ndarray | None = None
        if (folder / ITEM_IDS_FILE).is_file() and (folder / ITEM_VECTORS_FILE).is_file():
            self.catalogue_ids = np.load(folder / ITEM_IDS_FILE).astype(np.int64)
            self.catalogue_vectors = np.load(folder / ITEM_VECTORS_FILE).astype(np.float32)
        else:
            log.warning("the two-tower export %s has no %s/%s (an older export): it computes vectors but "
                        "serves no candidates; retrain with `recsys train two-tower`", folder, ITEM_IDS_FILE,
                        ITEM_VECTORS_FILE)

    def user_vectors(self, frame: pd.DataFrame) -> np.ndarray:
        """One vector per row of ``frame`` (the user columns)."""
        return run_tower(getattr(self._user, SERVE_ENDPOINT), self.encoder.encode_users(frame), self.config.output_dim)

    def item_vectors(self, frame: pd.DataFrame, as_of: datetime | pd.Timestamp | None = None) -> np.ndarray:
        """One vector per row of ``frame`` (the item columns), aged at ``as_of``, else at each
        row's ``event_timestamp``, else now."""
        return run_tower(getattr(self._item, SERVE_ENDPOINT), self.encoder.encode_items(frame, as_of),
                         self.config.output_dim)


def load_two_tower(folder: Path) -> LoadedTwoTower:
    """Read a folder written by :func:`export_two_tower`."""
    return LoadedTwoTower(folder)
