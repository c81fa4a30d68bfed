"""Builds the one RecommendationEngine that the service, the precompute job and the evaluation of
the served pipeline all run: the served models resolved from the BentoML model store (the
champion, else the latest: :func:`served_models`), the serving configuration from Settings, then
:func:`build_engine`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bentos.catalog import ItemCatalog
from bentos.config import ServingConfig
from bentos.engine import RecommendationEngine
from bentos.experiments import Experiment
from bentos.features import ITEM_FEATURES, USER_FEATURES
from bentos.scoring import Scorer
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL, BENTO_TWO_TOWER_MODEL, RUN_ID_LABEL
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

NEW_ITEMS_CHANNEL = "recsys:new_items"


def new_items_log(settings: Settings) -> Path:
    """Items added while serving, one JSON per line: replayed at start-up so a restart keeps them."""
    return settings.data_path / "serving" / settings.dataset / "new_items.jsonl"


def record_new_item(settings: Settings, row: Mapping[str, Any]) -> bool:
    """Persist an item added while serving: a line of :func:`new_items_log` (replayed at start-up)
    and a row of the dataset's items table (:func:`pipelines.live_log.append_live_item`: idempotent
    per item id, safe with several workers), which the stream's catalogue reloads, so the item's
    events are accepted. Returns whether the table has it; a table that cannot be written is
    logged and the item still served (the log keeps it)."""
    from pipelines.live_log import append_live_item

    path = new_items_log(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(row), default=str) + "\n")
    try:
        written = append_live_item(settings.dataset_path, row)
    except (OSError, ValueError) as exc:
        log.warning("item %s is served but not in the items table %s (%s): the stream dead-letters "
                    "its events until it is", row.get(S.COL_ITEM), settings.dataset_path / "items", exc)
        return False
    if written is None:
        log.info("item %s is already in the dataset's items table", row.get(S.COL_ITEM))
    return True


def redis_client(settings: Settings, timeout_s: float = 0.25) -> redis.Redis:
    """Short timeouts: a slow or dead Redis must degrade an answer, not stall it."""
    return redis.Redis.from_url(settings.effective_redis_url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s, health_check_interval=0)


@dataclass(frozen=True)
class ServedModels:
    """The models an engine serves: their folders (None: absent, the engine runs without) and the
    ``model_versions`` every answer carries: ``index``, ``ranker`` and ``two_tower`` (the BentoML
    tag, or ``"absent"``) and, where the model was logged, ``index_mlflow_run`` /
    ``ranker_mlflow_run`` / ``two_tower_mlflow_run``."""

    index_dir: Path | None
    ranker_dir: Path | None
    versions: dict[str, str] = field(default_factory=dict)
    two_tower_dir: Path | None = None  # last, with a default: built positionally elsewhere


def latest_model(name: str, bentoml_home: Path | None = None) -> Any | None:
    """The BentoML store's latest model ``name`` (``$BENTOML_HOME`` unless ``bentoml_home``), or
    None when the store has none."""
    import bentoml

    from models.tracking import get_bentoml_model

    try:
        return get_bentoml_model(f"{name}:latest", bentoml_home=bentoml_home)
    except bentoml.exceptions.NotFound:
        return None


def _describe(stored: Any | None, name: str, label: str) -> tuple[Path | None, dict[str, str]]:
    """The folder and ``model_versions`` entries of one stored model (None: absent, logged)."""
    if stored is None:
        log.warning("no %s in the BentoML model store: run `recsys train` (serving without it)", name)
        return None, {label: "absent"}
    versions = {label: str(stored.tag)}
    run_id = stored.info.labels.get(RUN_ID_LABEL)
    if run_id:
        versions[f"{label}_mlflow_run"] = run_id
    return Path(stored.path), versions


def describe_models(index: Any | None, ranker: Any | None, two_tower: Any | None = None) -> ServedModels:
    """Folders and versions of stored BentoML models (None: absent, logged with what to do).
    The service passes its pinned models, precompute the store's latest: one derivation."""
    index_dir, versions = _describe(index, BENTO_INDEX_MODEL, "index")
    ranker_dir, ranker_versions = _describe(ranker, BENTO_RANKER_MODEL, "ranker")
    two_tower_dir, two_tower_versions = _describe(two_tower, BENTO_TWO_TOWER_MODEL, "two_tower")
    return ServedModels(index_dir, ranker_dir, {**versions, **ranker_versions, **two_tower_versions}, two_tower_dir)


def with_pins(champion: ServedModels, pins: Mapping[str, str], bentoml_home: Path | None = None) -> ServedModels:
    """``champion`` with the models of ``pins`` (BentoML model name -> tag, an arm's
    :meth:`~bentos.experiments.ArmModels.pins`) replaced by those stored versions. Raises
    ``bentoml.exceptions.NotFound`` for a tag the store lacks (a reload then keeps what serves)."""
    from models.tracking import get_bentoml_model

    folders = {BENTO_INDEX_MODEL: champion.index_dir, BENTO_RANKER_MODEL: champion.ranker_dir,
               BENTO_TWO_TOWER_MODEL: champion.two_tower_dir}
    versions = dict(champion.versions)
    for name, label in ((BENTO_INDEX_MODEL, "index"), (BENTO_RANKER_MODEL, "ranker"),
                        (BENTO_TWO_TOWER_MODEL, "two_tower")):
        if name in pins:
            folders[name], own = _describe(get_bentoml_model(pins[name], bentoml_home), name, label)
            versions = {k: v for k, v in versions.items() if not k.startswith(label)} | own
    return ServedModels(folders[BENTO_INDEX_MODEL], folders[BENTO_RANKER_MODEL], versions,
                        folders[BENTO_TWO_TOWER_MODEL])


def champion_model(name: str, bentoml_home: Path | None = None) -> Any | None:
    """The champion's model ``name`` (:mod:`models.champion`: the pointer a promotion writes);
    the store's latest when no champion was promoted yet, or the champion has no such model. A
    champion's model missing from the store is absent (logged), never replaced by the latest: an
    unpromoted challenger is never served."""
    import bentoml

    from models.champion import champion_tag
    from models.tracking import get_bentoml_model

    tag = champion_tag(name, bentoml_home)
    if tag is None:
        return latest_model(name, bentoml_home)
    try:
        return get_bentoml_model(tag, bentoml_home=bentoml_home)
    except bentoml.exceptions.NotFound:
        log.error("the champion's %s is not in the BentoML model store: serving without it", tag)
        return None


def served_models(bentoml_home: Path | None = None) -> ServedModels:
    """What the service serves: the champion's ``item_index``, ``ranker`` and ``two_tower``
    (:mod:`models.names`) in the BentoML model store (``$BENTOML_HOME`` unless ``bentoml_home``),
    else the latest."""
    return describe_models(champion_model(BENTO_INDEX_MODEL, bentoml_home),
                           champion_model(BENTO_RANKER_MODEL, bentoml_home),
                           champion_model(BENTO_TWO_TOWER_MODEL, bentoml_home))


def serving_config(settings: Settings, **overrides: Any) -> ServingConfig:
    """The serving configuration of ``settings`` (cache TTL, the ranker's budget), with overrides."""
    base = ServingConfig(cache_ttl_s=settings.recs_cache_ttl_seconds, ranker_timeout_ms=settings.ranker_timeout_ms,
                         ranker_timeout_headroom=settings.ranker_timeout_headroom,
                         ranker_warmup_timeout_s=settings.ranker_warmup_timeout_s,
                         item_feature_ttl_s=settings.item_feature_ttl_s, trending_cache_ttl_s=settings.trending_cache_ttl_s,
                         n_two_tower=settings.two_tower_candidates)
    return replace(base, **overrides) if overrides else base


def load_index(folder: Path | None) -> Any | None:
    if folder is None or not Path(folder).exists():
        return None
    from models.retrieval import RetrievalIndex

    return RetrievalIndex.load(Path(folder))


def load_two_tower_retriever(folder: Path | None) -> Any | None:
    """The two-tower retriever of ``folder`` (bentos.candidates.two_tower), None when absent or
    broken (logged there): start-up never fails for it."""
    from bentos.candidates.two_tower import load_retriever

    return load_retriever(folder)


def load_scorer(folder: Path | None) -> Scorer | None:
    if folder is None or not Path(folder).exists():
        return None
    from models.ranker import load_scorer as _load  # the training issue's SavedModel wrapper

    return _load(Path(folder))


def build_engine(settings: Settings, index_dir: Path | None = None, ranker_dir: Path | None = None,
                 config: ServingConfig | None = None, model_versions: Mapping[str, str] | None = None,
                 client: redis.Redis | None = None, scorer: Scorer | None = None,
                 now: Callable[[], datetime] | None = None,
                 experiment: Experiment | None = None, catalog: ItemCatalog | None = None,
                 read_features: Callable[..., Any] | None = None,
                 two_tower_dir: Path | None = None) -> RecommendationEngine:
    """The engine with the catalogue, the online reader, the index of ``index_dir``, the
    ranker of ``ranker_dir`` (or ``scorer``, already loaded) and the two-tower retriever of
    ``two_tower_dir`` (one that fails to load is logged and left out), items added while serving replayed,
    and the ranker warmed up with its time budget measured (:meth:`Scoring.calibrate`). ``now``:
    the engine's clock (default: the catalogue's snapshot time; the evaluation sets its cutoff).
    ``experiment``: split users into its arms (the service and precompute pass the declared one).
    ``client``, ``catalog`` and ``read_features`` (default: made here) may be shared with other
    engines (:func:`bentos.arm_engines.build_engines`)."""
    client = client or redis_client(settings)
    catalog = catalog if catalog is not None else load_catalog(settings)
    read_features = read_features or feature_reader(settings, client)
    config = config or serving_config(settings)
    scorer = scorer or load_scorer(ranker_dir)
    if getattr(scorer, "variant", None):  # answers say which variant of the ranker scored them
        model_versions = {**(model_versions or {}), "ranker_variant": str(scorer.variant)}  # type: ignore[union-attr]
    two_tower = load_two_tower_retriever(two_tower_dir) if config.n_two_tower > 0 else None
    engine = RecommendationEngine(catalog, client, read_features, index=load_index(index_dir),
                                  scorer=scorer, config=config,
                                  now=now, model_versions=model_versions, experiment=experiment, two_tower=two_tower)
    replay_new_items(engine, new_items_log(settings))
    if engine.scoring.scorer is not None:
        engine.scoring.calibrate(warm_up_items(catalog, config.n_candidates))
    log.info("engine ready: %d items in the catalogue, index %s, two-tower %s, ranker %s", len(catalog),
             "loaded" if engine.index is not None else "absent (popularity and content only)",
             "loaded" if engine.candidates.two_tower is not None else "absent",
             f"loaded, budget {engine.scoring.budget.describe()}" if engine.scoring.scorer is not None
             else "absent (strategy blend)")
    return engine


def load_catalog(settings: Settings) -> ItemCatalog:
    """The catalogue of the dataset's item profile (what every engine of a service shares)."""
    return ItemCatalog.from_item_profile(T.table_path(settings, T.ITEM_PROFILE))


def feature_reader(settings: Settings, client: redis.Redis) -> Callable[..., Any]:
    """The online feature read of the serving features (the Feast store's layout, over ``client``)."""
    from pipelines.feature_store import get_store
    from pipelines.online_features import OnlineFeatureReader

    return OnlineFeatureReader(settings, USER_FEATURES, ITEM_FEATURES, store=get_store(settings), client=client).read


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
        with engine.index_lock.write_lock():
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
