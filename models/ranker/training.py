"""Training the ranker on label windows of the training events (:func:`train_ranker_on`).

Labels. The training events are split per user by the protocol
(:func:`models.protocol.temporal_split` applied to training data, exactly as the test split is
carved): each user's last 20% is the label window ``[t0_u, cutoff)``, the rest is the *fit* part.
The ALS that scores the labels (and the index that finds their candidates) is fitted on the fit
part only, i.e. on data before each user's ``t0_u``; the ranker therefore learns on ALS scores as
honest as the ones it sees at test time, where ALS is refitted on all training data. Examples and
their features: :mod:`models.ranker.examples`.

Windows. ``ExampleConfig.windows`` > 1 carves further label windows the same way from the
previous fit part (each with its own, earlier ALS): more lists for the listwise loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from models.als import ALSConfig, Factors, fit_als
from models.protocol import positives_of, temporal_split
from models.ranker.config import RankerConfig
from models.ranker.examples import (
    COL_LABEL,
    MAX_WINDOWS,
    ExampleConfig,
    feature_frame,
    first_times,
    item_stats,
    sample_examples,
    sample_label_users,
)
from models.ranker.features import COL_LIST
from models.ranker.fit import FitResult, fit_ranker_cv
from models.retrieval import RetrievalIndex, generate_candidates_batch, history
from pipelines.cleaning import CleaningConfig, clean_events
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)


@dataclass
class RankerTraining:
    """What :func:`train_ranker_on` returns: the fit, the first window's ALS and the training frame."""

    fit: FitResult
    factors: Factors  # the label-time ALS (fit part)
    examples: pd.DataFrame  # the training frame: features, labels
    seconds: dict[str, float] = field(default_factory=dict)
    #: per label window: (label users kept, label users with a positive), the cap is ``max_users``
    label_users: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class LabelWindow:
    """One label window's examples with their features, and the ALS that scored them."""

    frame: pd.DataFrame
    factors: Factors
    users: int
    available: int  # label users with a positive, before the ``max_users`` sample
    #: seconds per stage: split (and its collects), clean, als (with item statistics and the
    #: index), candidates (with the example sampling), frame (the Feast join and its columns)
    seconds: dict[str, float] = field(default_factory=dict)


class _Stages:
    """Wall-clock seconds per named stage, each stage ending where the next one starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def label_window(events: DataFrame, items: DataFrame, catalogue: np.ndarray, feature_settings: Settings,
                 als: ALSConfig, cleaning: CleaningConfig, ex: ExampleConfig, window: int,
                 progress: bool = True) -> tuple[LabelWindow, DataFrame]:
    """Split ``events`` into fit part and label window (the protocol's split), fit ALS, its
    item statistics and the index on the fit part, sample the window's examples and join their
    point-in-time features. Returns the window and the fit part (persisted: the next, earlier
    window is carved from it; the caller unpersists it)."""
    stages = _Stages()
    fit, labels = temporal_split(events)
    fit, labels = fit.persist(), labels.persist()
    fit_rows = fit.select(S.COL_USER, S.COL_ITEM, S.COL_TS).toPandas()
    positives = positives_of(fit, labels).toPandas()
    label_time = first_times(labels)
    fit_end = pd.to_datetime(fit_rows[S.COL_TS], utc=True).max().to_pydatetime()
    stages.done("split")
    cleaned = clean_events(fit, fit_end, cleaning, catalogue=items)
    stages.done("clean")
    factors = fit_als(cleaned.interactions, als, cleaned.reference_time)
    stats = item_stats(fit)
    cleaned.interactions.unpersist()
    cleaned.events.unpersist()
    labels.unpersist()
    index = RetrievalIndex.build(factors)
    stages.done("als")
    recent, seen = history(fit_rows, ex.candidates.max_recent)
    available = int(positives[S.COL_USER].nunique())
    users, positives = sample_label_users(positives, ex.max_users, ex.seed + window)
    candidates = generate_candidates_batch(index, factors, users, recent, seen, ex.candidates, progress=progress)
    entity = sample_examples(candidates, positives, seen, label_time, catalogue, ex)
    stages.done("candidates")
    frame = feature_frame(entity, feature_settings, factors, ex.feature_service, stats)
    frame[COL_LIST] = frame[S.COL_USER].to_numpy(np.int64) * MAX_WINDOWS + window  # one list per user and window
    stages.done("frame")
    log.info("label window %d: %d of %d label users, %d rows (%d positive), %d fit events; seconds %s", window,
             len(users), available, len(frame), int((frame[COL_LABEL] > 0).sum()), len(fit_rows), stages.seconds)
    return LabelWindow(frame, factors, len(users), available, stages.seconds), fit


def train_ranker_on(events: DataFrame, items: DataFrame, catalogue: np.ndarray, feature_settings: Settings,
                    als: ALSConfig, cleaning: CleaningConfig, config: RankerConfig | None = None,
                    examples: ExampleConfig | None = None, progress: bool = True) -> RankerTraining:
    """``examples.windows`` label windows (:func:`label_window`), the first = the last 20% of
    each user's ``events`` (training data only), each next one carved the same way from the
    previous fit part; then the ranker, trained on all of their lists (``feature_settings``: a
    workspace whose offline tables hold features of these events). ``factors`` in the result is
    the first window's ALS."""
    ex = examples or ExampleConfig()
    started = time.perf_counter()
    windows: list[LabelWindow] = []
    remaining, previous = events, None
    for window in range(ex.windows):
        found, remaining = label_window(remaining, items, catalogue, feature_settings, als, cleaning, ex, window,
                                        progress)
        if previous is not None:
            previous.unpersist()
        previous = remaining
        windows.append(found)
    if previous is not None:
        previous.unpersist()
    frame = pd.concat([w.frame for w in windows], ignore_index=True)
    seconds = {"ranker_examples_s": round(time.perf_counter() - started, 2)}
    for stage in windows[0].seconds:  # summed over the windows: ranker_split_s, ..., ranker_frame_s
        seconds[f"ranker_{stage}_s"] = round(sum(w.seconds.get(stage, 0.0) for w in windows), 2)
    started = time.perf_counter()
    result = fit_ranker_cv(frame, frame[COL_LABEL].to_numpy(), windows[0].factors.rank, config, progress=progress)
    seconds["ranker_fit_s"] = round(time.perf_counter() - started, 2)
    log.info("ranker trained on %d rows (%d positives, %s label users by window): %s", result.rows, result.positives,
             [w.users for w in windows], seconds)
    return RankerTraining(result, windows[0].factors, frame, seconds, [(w.users, w.available) for w in windows])
