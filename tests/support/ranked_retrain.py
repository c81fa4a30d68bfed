"""The gate's case with rankers (tests/models/test_retrain.py): a small dataset with an applied
feature store (:func:`with_feature_store`), the challenger's ALS evaluation fit made exactly as
:func:`models.gate_scoring.gate` makes it (:func:`gate_als_fit`), so a champion can hold the very
same factors, and a model set stored as a retrain leaves one (the index with its factors, a
ranker) in a BentoML store (:func:`store_set`)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from models.als import ALSConfig, Factors, fit_als
from models.champion import ModelSet
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from pipelines.cleaning import CleaningConfig
from recsys import schema as S
from recsys.config import Settings
from tests.support.retrain import small_dataset


def with_feature_store(settings: Settings) -> Settings:
    """:func:`small_dataset` and `feast apply` in its own Feast project: what the gate's two-stage
    rows read their point-in-time features from. No feature is built (every offline table is
    created empty): cheap, for rankers that read only the ALS vectors (the set's own factors)."""
    from pipelines import feature_store as fs

    settings = small_dataset(settings.with_overrides(feast_project=f"g{uuid.uuid4().hex[:8]}"))
    fs.apply(settings)
    return settings


def gate_als_fit(settings: Settings, als: ALSConfig, cleaning: CleaningConfig) -> Factors:
    """The ALS fit the gate scores for the challenger: ``als`` on the train side of the gate's
    window split of the events up to ``settings.as_of``, cleaned to that side's last event (the
    steps of :func:`models.gate_scoring.gate`, which seeds ALS: the same factors)."""
    from pyspark.sql import functions as F

    from models.gate import window_eval_set
    from models.holdout import clean_to_last_event
    from recsys.spark import get_spark

    spark = get_spark(settings)
    events = spark.read.parquet(str(settings.dataset_path / "events")).filter(F.col(S.COL_TS) <= F.lit(settings.as_of))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM)
    catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
    window = window_eval_set(events, catalogue, settings.gate_window_days)
    cleaned = clean_to_last_event(window.train, cleaning, items)
    factors = fit_als(cleaned.interactions, als, cleaned.reference_time)
    cleaned.interactions.unpersist()
    window.train.unpersist()
    return factors


def store_set(settings: Settings, factors: Factors, ranker: Path, home: Path, work: Path, run: str) -> ModelSet:
    """The index of ``factors`` (with the factors inside, as `recsys retrain` stores them) and
    ``ranker`` saved to the BentoML store at ``home``, labelled with ``run``; their set."""
    from models.retrain import build_index_folder
    from models.tracking import save_to_bentoml

    index_dir, _ = build_index_folder(settings, factors, work / f"index-{run}")
    return ModelSet({BENTO_INDEX_MODEL: save_to_bentoml(BENTO_INDEX_MODEL, index_dir, run, bentoml_home=home),
                     BENTO_RANKER_MODEL: save_to_bentoml(BENTO_RANKER_MODEL, ranker, run, bentoml_home=home)},
                    reason="built by the test")
