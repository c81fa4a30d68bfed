"""Tiny trained models for tests on a clean machine: a hand-made ranker training frame
(:func:`tiny_frame`; one user of it as the scorer takes it: :func:`user_and_items`), a tiny
exported ranker (:func:`train_tiny_ranker`), and a small synthetic dataset with its ALS and item
indexes, logged and stored like the real ones (:func:`train_tiny_models`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.als import ALSConfig
from models.ranker.config import RankerConfig
from models.ranker.export import export_ranker
from models.ranker.features import ITEM_EMBEDDING, USER_EMBEDDING
from models.ranker.fit import fit_ranker
from models.train import AlsTrainResult, IndexBuildResult, build_index, train_als
from recsys import schema as S
from recsys.config import Settings


def tiny_frame(n_users: int = 12, n_items: int = 20, rank: int = 8, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A hand-made training frame: every user likes the items of category ``user % 3``; the ALS
    vectors agree (one-hot of the category), and a third of the item vectors are missing."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for user in range(1, n_users + 1):
        user_vec = np.zeros(rank, np.float32)
        user_vec[user % 3] = 1.0
        for item in range(1, n_items + 1):
            item_vec = np.zeros(rank, np.float32)
            item_vec[item % 3] = 1.0
            rows.append({S.COL_USER: user, S.COL_ITEM: item, S.COL_TS: pd.Timestamp("2026-01-01 12:00", tz="UTC"),
                         "n_events": float(user * 3), "interaction_count": None if user % 4 == 0 else user,
                         "top_categories": [user % 3], S.COL_CATEGORY: item % 3, "price": float(item),
                         "popularity_7d": int(rng.integers(0, 10)), USER_EMBEDDING: user_vec,
                         ITEM_EMBEDDING: None if item % 3 == 0 and item % 2 else item_vec})
            labels.append(float(item % 3 == user % 3))
    return pd.DataFrame(rows), np.asarray(labels, dtype=np.float32)


def user_and_items(user: int, rank: int = 8) -> tuple[dict, dict, np.ndarray]:
    """One user of :func:`tiny_frame` as the scorer takes it: the user's features, its candidates'
    columns and their item ids."""
    frame, _ = tiny_frame(rank=rank)
    rows = frame[frame[S.COL_USER] == user]
    first = rows.iloc[0]
    user_feats = {c: first[c] for c in ("n_events", "interaction_count", "top_categories", "user_embedding")}
    return user_feats, {c: rows[c].tolist() for c in rows.columns}, rows[S.COL_ITEM].to_numpy()


def train_tiny_ranker(folder: Path, rank: int = 8, epochs: int = 20) -> Path:
    """Train and export a tiny ranker on :func:`tiny_frame`: what the service's tests load with
    :func:`models.ranker.scorer.load_scorer` on a clean machine. Returns ``folder``."""
    frame, labels = tiny_frame(rank=rank)
    result = fit_ranker(frame, labels, rank, RankerConfig(hidden=(16,), epochs=epochs, batch_size=32, learning_rate=1e-2,
                                                          category_buckets=8, dropout=0.0), progress=False)
    # item statistics for the service's path (hand-checkable: item_events = the item's id)
    ids = np.unique(frame[S.COL_ITEM].to_numpy(np.int64))
    stats = pd.DataFrame({"item_events": ids.astype(np.float64), "item_mean_rating": 3.5, "item_positive_rate": 0.5},
                         index=pd.Index(ids, name=S.COL_ITEM))
    return export_ranker(result, Path(folder), {"version": "tiny"}, item_stats=stats)


@dataclass
class TinyModels:
    als: AlsTrainResult
    index: IndexBuildResult


def train_tiny_models(settings: Settings, bentoml_home: Path | None = None, n_users: int = 200,
                      n_items: int = 100, track: bool = True) -> TinyModels:
    """A small synthetic dataset (when the active one is missing), ALS and its indexes, logged
    and stored like the real ones: what a test of the service needs on a clean machine. Pass
    settings whose data_dir and MLflow belong to the test."""
    from pipelines.canonical import DatasetError, read_manifest
    from pipelines.generator import GeneratorConfig, generate

    try:
        read_manifest(settings.dataset_path)
    except DatasetError:
        generate(GeneratorConfig(n_users=n_users, n_items=n_items, n_categories=5, days=7), settings.dataset_path,
                 progress=False)
    als = train_als(settings, ALSConfig(rank=8, max_iter=5, num_blocks=1), track=track, progress=False)
    return TinyModels(als, build_index(settings, track=track, bentoml_home=bentoml_home))
