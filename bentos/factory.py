"""Builds a RecommendationEngine from Settings and the model artefacts (service and precompute)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bentos.catalog import ItemCatalog
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.features import ITEM_FEATURES, USER_FEATURES
from bentos.scoring import Scorer
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

NEW_ITEMS_CHANNEL = "recsys:new_items"


def new_items_log(settings: Settings) -> Path:
    """Items added while serving, one JSON per line: replayed at start-up so a restart keeps them."""
    return settings.data_path / "serving" / settings.dataset / "new_items.jsonl"


def redis_client(settings: Settings, timeout_s: float = 0.25) -> redis.Redis:
    """Short timeouts: a slow or dead Redis must degrade an answer, not stall it."""
    return redis.Redis.from_url(settings.effective_redis_url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s, health_check_interval=0)


def load_index(folder: Path | None) -> Any | None:
    if folder is None or not Path(folder).exists():
        return None
    from models.retrieval import RetrievalIndex

    return RetrievalIndex.load(Path(folder))


def load_scorer(folder: Path | None) -> Scorer | None:
    if folder is None or not Path(folder).exists():
        return None
    from models.ranker import load_scorer as _load  # the training issue's SavedModel wrapper

    return _load(Path(folder))


def build_engine(settings: Settings, index_dir: Path | None = None, ranker_dir: Path | None = None,
                 config: ServingConfig | None = None, model_versions: Mapping[str, str] | None = None,
                 client: redis.Redis | None = None, scorer: Scorer | None = None) -> RecommendationEngine:
    """The engine with the catalogue, the online reader, the index of ``index_dir`` and the
    ranker of ``ranker_dir`` (or ``scorer``, already loaded), items added while serving replayed,
    and the ranker warmed up with its time budget measured (:meth:`Scoring.calibrate`)."""
    from pipelines.feature_store import get_store
    from pipelines.online_features import OnlineFeatureReader

    client = client or redis_client(settings)
    catalog = ItemCatalog.from_item_profile(T.table_path(settings, T.ITEM_PROFILE))
    reader = OnlineFeatureReader(settings, USER_FEATURES, ITEM_FEATURES, store=get_store(settings), client=client)
    config = config or ServingConfig(cache_ttl_s=settings.recs_cache_ttl_seconds,
                                     ranker_timeout_ms=settings.ranker_timeout_ms,
                                     ranker_timeout_headroom=settings.ranker_timeout_headroom)
    engine = RecommendationEngine(catalog, client, reader.read, index=load_index(index_dir),
                                  scorer=scorer or load_scorer(ranker_dir), config=config,
                                  model_versions=model_versions)
    replay_new_items(engine, new_items_log(settings))
    if engine.scoring.scorer is not None:
        engine.scoring.calibrate(warm_up_items(catalog, config.n_candidates))
    log.info("engine ready: %d items in the catalogue, index %s, ranker %s", len(catalog),
             "loaded" if engine.index is not None else "absent (popularity and content only)",
             f"loaded, budget {engine.scoring.budget.describe()}" if engine.scoring.scorer is not None
             else "absent (strategy blend)")
    return engine


def warm_up_items(catalog: ItemCatalog, n: int) -> np.ndarray:
    """``n`` item ids for the ranker's warm-up batch: the most popular, repeated if the catalogue
    is smaller (the batch's size is what its time depends on)."""
    popular = np.asarray(catalog.popular, dtype=np.int64)
    return np.resize(popular, n) if len(popular) else np.zeros(n, dtype=np.int64)


def add_item(engine: RecommendationEngine, item: Mapping[str, Any]) -> str:
    """Add one item to the catalogue and the FAISS indexes; returns where its vector came from."""
    row = dict(item)
    row.setdefault("popularity_1d", 0)
    row.setdefault("popularity_7d", 0)
    row.setdefault(S.COL_CREATED_AT, engine.now())
    engine.catalog.add(row)
    source = "none (no index loaded)"
    if engine.index is not None:
        ids = np.array([int(row[S.COL_ITEM])], dtype=np.int64)
        with engine.index_lock:
            if engine.index.user_to_item.contains(ids)[0]:
                return "its trained vector (already in the index)"
            engine.index.add_items(ids, None, np.array([int(row[S.COL_CATEGORY])], dtype=np.int64))
        source = "mean of its category's vectors"
    return source


def replay_new_items(engine: RecommendationEngine, path: Path) -> int:
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        if line.strip():
            add_item(engine, json.loads(line))
            n += 1
    if n:
        log.info("replayed %d items added while serving", n)
    return n
