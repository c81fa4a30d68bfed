"""Training jobs on the active dataset (``Settings.dataset_path``): ALS and the item indexes.

``train_als``: events up to the reference time -> cleaning -> (optional tuning on a validation
split carved by the protocol) -> Spark ALS -> factors at :func:`models.als.embedding_table_path`
-> MLflow run with the registered ``recsys-als`` model.

``build_index``: those factors -> the two FAISS indexes at :func:`models.retrieval.index_path`
-> MLflow run with the registered ``recsys-item-index`` model -> BentoML model ``item_index``
labelled with the run id.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.als import ALSConfig, ALSGrid, Factors, embedding_table_path, export_factors, fit_als, load_factors
from models.index import IndexConfig, categories_for
from models.names import TRAINING_EXPERIMENT
from models.retrieval import RetrievalIndex, index_path
from pipelines.canonical import read_table, reference_time
from pipelines.cleaning import CleaningConfig, clean_events
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)


@dataclass
class AlsTrainResult:
    factors: Factors
    config: ALSConfig
    user_path: Path
    item_path: Path
    cleaning: dict[str, Any]
    tuning: dict[str, Any] | None = None
    run_id: str | None = None
    registered: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def cutoff(self) -> datetime:
        return self.factors.cutoff


def train_als(settings: Settings, als: ALSConfig | None = None, cleaning: CleaningConfig | None = None,
              tune: bool = False, grid: ALSGrid | None = None, track: bool = True,
              progress: bool = True, export: bool = True) -> AlsTrainResult:
    """Fit ALS on every event of the active dataset up to its reference time (the cutoff:
    ``settings.as_of``, else the latest event). With ``tune``, ALS and the time decay are first
    tuned on a validation split carved from those events by the protocol. ``export=False`` only
    fits (no embedding tables, no MLflow): e.g. the ranker's ALS fitted on data before its label
    window, ``train_als(settings.with_overrides(as_of=t0), export=False)``."""
    from pyspark.sql import functions as F

    from models.holdout import EvaluationConfig, Timer, holdout
    from models.holdout import tune as tune_on
    from recsys.spark import get_spark

    als = als or ALSConfig()
    cleaning = cleaning or CleaningConfig()
    cutoff = reference_time(settings.dataset_path, settings.as_of)
    spark = get_spark(settings, app_name="recsys-train-als")
    events = spark.read.parquet(str(settings.dataset_path / "events")).filter(F.col(S.COL_TS) <= F.lit(cutoff))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM)
    timer = Timer()
    tuning = None
    if tune:
        catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
        validation = holdout(events, catalogue)
        config = EvaluationConfig(als=als, cleaning=cleaning, grid=grid or ALSGrid())
        als, cleaning, tuning = tune_on(validation, items, config, timer, progress)
        validation.unpersist()
    with timer("clean"):
        cleaned = clean_events(events, cutoff, cleaning, catalogue=items)
    with timer("als"):
        factors = fit_als(cleaned.interactions, als, cutoff)
    user_path, item_path = embedding_table_path(settings, "user"), embedding_table_path(settings, "item")
    result = AlsTrainResult(factors, als, user_path, item_path, cleaned.as_dict(), tuning, seconds=timer.seconds)
    cleaned.interactions.unpersist()
    cleaned.events.unpersist()
    if export:
        export_factors(factors, user_path, item_path)
        if track:
            _track_als(settings, result, cleaning)
    return result


def _track_als(settings: Settings, result: AlsTrainResult, cleaning: CleaningConfig) -> None:
    from models.names import ALS_MODEL_NAME
    from models.pyfunc import AlsRecommender
    from models.tracking import ModelSpec, dataset_fingerprint, log_training_run

    metrics: dict[str, Any] = {"users": len(result.factors.user_ids), "items": len(result.factors.item_ids),
                               **result.seconds}
    for step in result.cleaning["steps"]:
        metrics[f"cleaning/{step['step']}/rows_removed"] = step["rows_removed"]
        metrics[f"cleaning/{step['step']}/users_removed"] = step["users_removed"]
    if result.tuning:
        best = max(result.tuning["trials"], key=lambda t: t[result.tuning["metric"]])
        metrics.update({f"validation/{k}": v for k, v in best.items() if "@" in k})
    params = {**result.config.params(), **{f"cleaning_{k}": v for k, v in asdict(cleaning).items()},
              "dataset": settings.dataset, "training_cutoff": result.cutoff.isoformat(), "tuned": bool(result.tuning)}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "training_report.json"
        report.write_text(json.dumps({"cleaning": result.cleaning, "tuning": result.tuning,
                                      "seconds": result.seconds}, indent=2, default=str) + "\n")
        run = log_training_run(
            settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"als-{settings.dataset}", params, metrics,
            dataset_fingerprint(settings.dataset_path, reference_time=result.cutoff.isoformat()),
            artifacts={"user_embedding": result.user_path, "item_embedding": result.item_path, "report": report},
            models=[ModelSpec(ALS_MODEL_NAME, AlsRecommender(),
                              {"user_embedding": result.user_path, "item_embedding": result.item_path}, S.COL_USER)],
        )
    result.run_id, result.registered = run.run_id, run.registered


@dataclass
class IndexBuildResult:
    index: RetrievalIndex
    path: Path
    run_id: str | None = None
    registered: dict[str, str] = field(default_factory=dict)
    bento_tag: str | None = None


def build_index(settings: Settings, config: IndexConfig | None = None, out: Path | None = None,
                track: bool = True, bentoml_home: Path | None = None) -> IndexBuildResult:
    """Build both indexes from the active dataset's ALS factors and hand them to serving."""
    factors = load_factors(embedding_table_path(settings, "user"), embedding_table_path(settings, "item"))
    items = read_table(settings.dataset_path, "items", columns=[S.COL_ITEM, S.COL_CATEGORY])
    category_of = dict(zip(items[S.COL_ITEM].astype(int), items[S.COL_CATEGORY].astype(int)))
    index = RetrievalIndex.build(factors, categories_for(factors.item_ids, category_of), config)
    path = index.save(out or index_path(settings))
    result = IndexBuildResult(index, path)
    if track:
        _track_index(settings, result, factors, bentoml_home)
    return result


def _track_index(settings: Settings, result: IndexBuildResult, factors: Factors, bentoml_home: Path | None) -> None:
    from models.names import BENTO_INDEX_MODEL, INDEX_MODEL_NAME
    from models.pyfunc import SimilarItems
    from models.tracking import ModelSpec, dataset_fingerprint, log_training_run, save_to_bentoml

    config = result.index.user_to_item.config
    params = {**{f"index_{k}": v for k, v in asdict(config).items()}, "dataset": settings.dataset,
              "training_cutoff": factors.cutoff.isoformat(), "rank": factors.rank}
    run = log_training_run(
        settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"index-{settings.dataset}", params, result.index.report,
        dataset_fingerprint(settings.dataset_path, reference_time=factors.cutoff.isoformat()),
        artifacts={"index": result.path},
        models=[ModelSpec(INDEX_MODEL_NAME, SimilarItems(), {"index": result.path}, S.COL_ITEM)],
    )
    result.run_id, result.registered = run.run_id, run.registered
    result.bento_tag = save_to_bentoml(
        BENTO_INDEX_MODEL, result.path, run.run_id, bentoml_home=bentoml_home,
        metadata={"dataset": settings.dataset, "training_cutoff": factors.cutoff.isoformat(),
                  "report": result.index.report},
    )
