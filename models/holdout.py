"""The protocol applied to one dataset's events, as training and evaluation share it: the holdout
split (:class:`Holdout`), ALS and time-decay tuning on a validation split (:func:`tune`), the
context a two-stage model is evaluated in (:class:`EvalContext`) and stage timings (:class:`Timer`).

``models.train``, the ranker's training and ``models.evaluate`` import this module; it imports none
of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.als import ALSConfig, ALSGrid, Factors, TuningResult, fit_als, tune_als
from models.protocol import KS, TEST_FRACTION, EvalSet, build_eval_set, evaluate_scorer, positives_of, temporal_split
from pipelines.cleaning import CleaningConfig, CleaningResult, clean_events
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """``grid=None`` skips tuning and uses ``als`` and ``cleaning`` as given. Otherwise the ALS
    grid is tuned first (with ``cleaning``), then the time decay over ``decays`` with the best
    ALS config, both on the validation split."""

    als: ALSConfig = field(default_factory=ALSConfig)
    grid: ALSGrid | None = field(default_factory=ALSGrid)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    decays: tuple[float, ...] = (0.0, 0.003, 0.01, 0.03)
    test_fraction: float = TEST_FRACTION
    ks: tuple[int, ...] = KS
    curve_to: int = 20  # ndcg@1..curve_to in the report, for the plot


@dataclass
class EvalContext:
    """What the models of one evaluation share. A two-stage step gets it whole: the raw train
    and test events (Spark), the test and validation :class:`EvalSet`, the tuned ALS config and
    the factors fitted on all of train, the cleaning config, and the workspace settings."""

    spark: SparkSession
    settings: Settings
    dataset_dir: Path
    train: DataFrame
    test: DataFrame
    train_rows: pd.DataFrame  # user_id, item_id, event_timestamp of every train event
    eval_set: EvalSet
    validation: EvalSet
    cleaning: CleaningConfig
    als: ALSConfig
    factors: Factors
    cutoff: datetime
    #: What the two-stage step built, recorded for the served step (which reuses them rather
    #: than training again): the train-only feature dataset's settings (its own Feast project)
    #: and the exported ranker's folder. None until a two-stage step ran.
    feature_settings: Settings | None = None
    ranker_dir: Path | None = None
    #: The two-stage lists re-ranked by the ranker's int8 variant (same candidates and frame):
    #: the report's ``quantized_*`` row. None when the export has no int8 variant.
    quantized_ranked: np.ndarray | None = None


#: Returns ranked catalogue columns (``eval_set.users`` x at least max(ks), -1 padded).
TwoStageFn = Callable[[EvalContext], np.ndarray]
#: The served pipeline's step: ranked catalogue columns as for :data:`TwoStageFn`, and counts
#: that say how the answers were turned into them (padding, fallback, degraded answers).
ServedFn = Callable[[EvalContext], tuple[np.ndarray, dict[str, Any]]]


class Timer:
    """Seconds per stage (``<stage>_s``), summed over repeated stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("evaluate: %s", stage)
        yield
        self.seconds[f"{stage}_s"] = round(self.seconds.get(f"{stage}_s", 0.0) + time.perf_counter() - start, 2)


# ---- the split ----------------------------------------------------------------------------------


@dataclass
class Holdout:
    """One protocol split of some events: the train and test frames (persisted), the test's
    :class:`EvalSet` and the train rows (user_id, item_id, event_timestamp) in pandas."""

    train: DataFrame
    test: DataFrame
    eval_set: EvalSet
    train_rows: pd.DataFrame

    def unpersist(self) -> None:
        self.train.unpersist()
        self.test.unpersist()


def _eval_set(train: DataFrame, test: DataFrame, catalogue: np.ndarray) -> tuple[EvalSet, pd.DataFrame]:
    rows = train.select(S.COL_USER, S.COL_ITEM, S.COL_TS).toPandas()
    positives = positives_of(train, test).toPandas()
    return build_eval_set(rows, positives, catalogue), rows


def holdout(events: DataFrame, catalogue: np.ndarray, test_fraction: float = TEST_FRACTION) -> Holdout:
    """Split ``events`` by the protocol; apply it to a holdout's ``train`` for validation."""
    train, test = temporal_split(events, test_fraction)
    train, test = train.persist(), test.persist()
    eval_set, train_rows = _eval_set(train, test, catalogue)
    log.info("split: %d train rows, %d users with test positives, catalogue %d",
             len(train_rows), len(eval_set.users), len(catalogue))
    return Holdout(train, test, eval_set, train_rows)


# ---- tuning on the validation split -------------------------------------------------------------


def _max_time(frame: DataFrame) -> datetime:
    from pyspark.sql import functions as F

    micros = frame.agg(F.max(F.unix_micros(F.col(S.COL_TS)))).first()[0]
    if micros is None:
        raise ValueError("no events to evaluate on: the dataset is empty")
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(micros))  # exact, no float


def clean_to_last_event(frame: DataFrame, cfg: CleaningConfig, items: DataFrame) -> CleaningResult:
    """:func:`pipelines.cleaning.clean_events` with the frame's own last event as reference time."""
    return clean_events(frame, _max_time(frame), cfg, catalogue=items)


def tune_decay(fit_events: DataFrame, items: DataFrame, validation: EvalSet, als: ALSConfig,
               cleaning: CleaningConfig, decays: tuple[float, ...]) -> tuple[CleaningConfig, list[dict[str, float]]]:
    """The time decay (per day) with the best validation ndcg@10 for the tuned ALS config; ties
    keep the smaller decay. Returns the cleaning config to train with and the trials."""
    trials: list[dict[str, float]] = []
    best_cfg, best_ndcg = cleaning, -1.0
    for decay in sorted(decays):
        candidate = replace(cleaning, decay_per_day=decay)
        cleaned = clean_to_last_event(fit_events, candidate, items)
        factors = fit_als(cleaned.interactions, als, cleaned.reference_time)
        report = evaluate_scorer(validation, factors.score_fn(validation.catalogue, validation.popularity))
        cleaned.interactions.unpersist()
        trials.append({"decay_per_day": decay, "ndcg@10": round(report["ndcg@10"], 5),
                       "recall@10": round(report["recall@10"], 5)})
        log.info("decay %.3g/day: validation ndcg@10 %.4f", decay, report["ndcg@10"])
        if report["ndcg@10"] > best_ndcg:
            best_cfg, best_ndcg = candidate, report["ndcg@10"]
    return best_cfg, trials


def tune(validation: Holdout, items: DataFrame, cfg: EvaluationConfig, timer: Timer,
         progress: bool = True) -> tuple[ALSConfig, CleaningConfig, dict[str, Any] | None]:
    """(ALS config, cleaning config, tuning report), fitted on ``validation.train`` and scored on
    its test part; ``cfg.grid=None`` returns the configured ones untouched."""
    if cfg.grid is None:
        return cfg.als, cfg.cleaning, None
    with timer("clean"):
        clean_fit = clean_to_last_event(validation.train, cfg.cleaning, items)
    with timer("tune"):
        result: TuningResult = tune_als(clean_fit.interactions, validation.eval_set, clean_fit.reference_time,
                                        cfg.grid, cfg.als, progress=progress)
        clean_fit.interactions.unpersist()
        cleaning, decay_trials = tune_decay(validation.train, items, validation.eval_set, result.best, cfg.cleaning,
                                            cfg.decays)
    return result.best, cleaning, {**result.as_dict(), "decay_trials": decay_trials}
