"""Training the ranker on point-in-time frames, and the two-stage evaluation.

Labels. The training events are split per user by the protocol (:func:`models.protocol.temporal_split`
applied to training data, exactly as the test split is carved): each user's last 20% is the label
window ``[t0_u, cutoff)``, the rest is the *fit* part. The ALS that scores the labels (and the
index that finds their candidates) is fitted on the fit part only, i.e. on data before each user's
``t0_u``; the ranker therefore learns on ALS scores as honest as the ones it sees at test time,
where ALS is refitted on all training data.

Examples, per label user: positives = the label window's positives (rating >= 4, CLICK or
stronger) not seen in the fit part that retrieval finds (``missed_positives`` keeps the others
too); hard negatives = up to ``n_hard`` retrieval candidates
(:func:`models.retrieval.generate_candidates_batch`) that are not positives; random negatives =
``n_random`` catalogue items the user never touched.

Features. Every example row is stamped ``t0_u - 1 microsecond`` (just before the user's first
label event) and joined with Feast's ``get_historical_features`` (:func:`pipelines.feature_store.get_training_frame`):
only feature values stamped at or before that time are used. The ALS vectors are not taken from
Feast: the embedding views hold the production factors (fitted on all data, stamped at the
cutoff), which the point-in-time join rightly refuses for earlier labels; the rows get the vectors
of the fit-part ALS instead. The same goes for what is derived from that ALS or its events: the
candidate's cosine with the user's ``last_5_items`` (Feast, point-in-time) uses the row's ALS
vectors, and the item statistics (:func:`item_stats`) count the ALS's own events (fit part for
labels, all of train at test time).

Windows. ``ExampleConfig.windows`` > 1 carves further label windows the same way from the
previous fit part (each with its own, earlier ALS): more lists for the listwise loss.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from models.als import ALSConfig, Factors, Popularity, fit_als
from models.protocol import positives_of, rank_with, temporal_split
from models.ranker import COL_LIST, COL_RETRIEVED, FitResult, RankerConfig, export_ranker, fit_ranker_cv, load_scorer
from models.retrieval import CandidateConfig, Candidates, RetrievalIndex, generate_candidates_batch, history
from pipelines.cleaning import CleaningConfig, clean_events
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from models.evaluate import EvalContext

log = logging.getLogger(__name__)

COL_LABEL = "label"
_COL_ROW = "_row"  # entity row order: Feast hands the frame back in its own order
ONE_US = timedelta(microseconds=1)
MAX_WINDOWS = 10  # list ids are user_id * MAX_WINDOWS + window


@dataclass(frozen=True)
class ExampleConfig:
    """How labels become examples. ``feature_service``: the Feast service the frame is pulled
    with (``ranker_v2`` holds exactly the ranker's inputs; ``ranker_v1`` works too)."""

    candidates: CandidateConfig = field(default_factory=lambda: CandidateConfig(n_als=100, n_similar=10))
    n_hard: int = 150  # every candidate of the default CandidateConfig (100 ALS + 5 x 10 similar)
    n_random: int = 10
    #: Keep label positives that retrieval missed. Off: the ranker only ever re-ranks retrieved
    #: candidates, and on ML-100K the missed ones taught it to prefer what ALS ranks low
    #: (two-stage ndcg@10 0.136 with them, 0.172 without, same split).
    missed_positives: bool = False
    feature_service: str = "ranker_v1"
    #: Label windows: 1 = the last 20% of each user's training events; each further window is
    #: the last 20% of what precedes the previous one (its own earlier ALS), for more lists.
    windows: int = 1
    #: Label users per window, drawn at random (seeded) when more have a positive; None = all.
    #: The fixed costs (the label ALS, the Feast join, the cross-validated fit) grow with the
    #: rows, about 160 per user: the cap keeps a large catalogue's training within minutes,
    #: and ML-100K's ~900 label users are all kept.
    max_users: int | None = 2_000
    seed: int = 42

    def __post_init__(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users={self.max_users} must be >= 1 (or None for every label user)")
        if self.n_hard < 0 or self.n_random < 0:
            raise ValueError(f"n_hard={self.n_hard} and n_random={self.n_random} must be >= 0")
        if not 1 <= self.windows <= MAX_WINDOWS:
            raise ValueError(f"windows={self.windows} must be within 1..{MAX_WINDOWS}")
        if self.n_hard == 0 and self.n_random == 0:
            raise ValueError("n_hard=0 and n_random=0 leave no negatives: set one above 0")


# ---- examples ---------------------------------------------------------------------------------


def first_times(events: DataFrame) -> pd.Series:
    """Per user, the time of their first event in ``events`` (a label or test window)."""
    from pyspark.sql import functions as F

    rows = events.groupBy(S.COL_USER).agg(F.min(S.COL_TS).alias(S.COL_TS)).toPandas()
    return pd.Series(pd.to_datetime(rows[S.COL_TS], utc=True).to_numpy(), index=rows[S.COL_USER].astype(np.int64))


def sample_label_users(positives: pd.DataFrame, max_users: int | None,
                       seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The label users (those with a positive), sorted, and their positives: all of them, or
    ``max_users`` drawn without replacement (seeded) when there are more."""
    users = np.unique(positives[S.COL_USER].to_numpy()).astype(np.int64)
    if max_users is None or len(users) <= max_users:
        return users, positives
    log.info("%d of %d label users sampled (ExampleConfig.max_users)", max_users, len(users))
    users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, positives[positives[S.COL_USER].isin(users)]


def sample_examples(candidates: dict[int, Candidates], positives: pd.DataFrame, seen: dict[int, set[int]],
                    label_time: pd.Series, catalogue: np.ndarray, cfg: ExampleConfig) -> pd.DataFrame:
    """(user_id, item_id, event_timestamp, label) rows; ``event_timestamp`` = the user's label
    time minus one microsecond, so no feature stamped at a label event can join."""
    rng = np.random.default_rng(cfg.seed)
    pos_by_user = positives.groupby(S.COL_USER)[S.COL_ITEM].apply(lambda s: set(s.astype(int))).to_dict()
    users, items, labels, found = [], [], [], []
    for user, pos in pos_by_user.items():
        user = int(user)
        retrieved = {int(i) for i in (candidates[user].item_ids if user in candidates else [])}
        pos = pos if cfg.missed_positives else pos & retrieved
        if not pos:
            continue
        hard = [int(i) for i in (candidates[user].item_ids if user in candidates else []) if int(i) not in pos]
        if len(hard) > cfg.n_hard:
            hard = rng.choice(hard, cfg.n_hard, replace=False).tolist()
        taken = pos | set(hard) | seen.get(user, set())
        pool = catalogue[~np.isin(catalogue, list(taken))]
        rand = rng.choice(pool, min(cfg.n_random, len(pool)), replace=False).tolist() if len(pool) else []
        chosen = sorted(pos) + hard + [int(i) for i in rand]
        users += [user] * len(chosen)
        items += chosen
        labels += [1.0] * len(pos) + [0.0] * (len(chosen) - len(pos))
        found += [i in retrieved for i in chosen]
    frame = pd.DataFrame({S.COL_USER: np.asarray(users, np.int64), S.COL_ITEM: np.asarray(items, np.int64),
                          COL_LABEL: np.asarray(labels, np.float32), COL_RETRIEVED: np.asarray(found, bool)})
    frame[S.COL_TS] = frame[S.COL_USER].map(label_time) - ONE_US
    return frame


def candidate_rows(candidates: dict[int, Candidates], when: pd.Series) -> pd.DataFrame:
    """(user_id, item_id, event_timestamp) for every candidate; time = ``when[user] - 1 us``."""
    users = np.concatenate([np.full(len(c), u, np.int64) for u, c in candidates.items()] or [np.empty(0, np.int64)])
    items = np.concatenate([c.item_ids for c in candidates.values()] or [np.empty(0, np.int64)])
    frame = pd.DataFrame({S.COL_USER: users, S.COL_ITEM: items.astype(np.int64)})
    frame[S.COL_TS] = frame[S.COL_USER].map(when) - ONE_US
    return frame


def attach_embeddings(frame: pd.DataFrame, factors: Factors) -> pd.DataFrame:
    """Set ``user_embedding``/``item_embedding`` from ``factors`` (None where a vector is missing)."""
    from models.ranker import ITEM_EMBEDDING, USER_EMBEDDING

    out = frame.copy()
    for column, ids, lookup in ((USER_EMBEDDING, out[S.COL_USER], factors.user_vectors),
                                (ITEM_EMBEDDING, out[S.COL_ITEM], factors.item_vectors)):
        vectors, known = lookup(ids.to_numpy(dtype=np.int64))
        out[column] = [v if k else None for v, k in zip(list(vectors), known)]
    return out


#: Pseudo-events pulling a rarely seen item's mean rating / positive share toward the overall one.
STATS_PRIOR = 20.0


def item_stats(events: DataFrame) -> pd.DataFrame:
    """Per item of ``events``: ``item_events`` (count), ``item_mean_rating`` (RATING events only;
    NaN without any) and ``item_positive_rate`` (share of positives by the protocol's rule), the
    last two smoothed with :data:`STATS_PRIOR` pseudo-events at the overall value. Computed from
    exactly the events the matching ALS is fitted on: the fit part for label rows, all of train
    for test rows, so the statistics are as of the same split point as the ALS score."""
    from pyspark.sql import functions as F

    from models.protocol import positive_condition

    is_rating = F.col(S.COL_EVENT_TYPE) == S.EventType.RATING.value
    rows = events.groupBy(S.COL_ITEM).agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.when(is_rating, 1).otherwise(0)).alias("n_ratings"),
        F.sum(F.when(is_rating, F.col(S.COL_VALUE))).alias("rating_sum"),
        F.sum(positive_condition().cast("double")).alias("positives"))
    rows = cast(pd.DataFrame, rows.toPandas()).set_index(S.COL_ITEM)
    mean_rating = rows["rating_sum"].sum() / max(rows["n_ratings"].sum(), 1)
    positive_rate = rows["positives"].sum() / max(rows["n"].sum(), 1)
    out = pd.DataFrame(index=rows.index.astype(np.int64))
    out["item_events"] = rows["n"].to_numpy(np.float64)
    out["item_mean_rating"] = np.where(rows["n_ratings"] > 0, (rows["rating_sum"].fillna(0) + STATS_PRIOR * mean_rating)
                                       / (rows["n_ratings"] + STATS_PRIOR), np.nan)
    out["item_positive_rate"] = ((rows["positives"] + STATS_PRIOR * positive_rate) / (rows["n"] + STATS_PRIOR)).to_numpy()
    return out


RECENT_ITEMS = "last_5_items"  # Feast's user_realtime view: the user's recent items, latest first


def attach_recent_similarity(frame: pd.DataFrame, factors: Factors) -> pd.DataFrame:
    """``frame`` with :data:`models.ranker.RECENT` from its (point-in-time) ``last_5_items`` and
    ``factors``: the same vectors as the row's ALS score."""
    from models.ranker import RECENT, recent_matrix, recent_similarity

    recent_ids = recent_matrix(frame[RECENT_ITEMS].tolist() if RECENT_ITEMS in frame else [None] * len(frame))
    item_vectors, known = factors.item_vectors(frame[S.COL_ITEM].to_numpy(np.int64))
    values = recent_similarity(np.where(known[:, None], item_vectors, 0.0), recent_ids, factors.item_vectors)
    out = frame.copy()
    for column, (name, _) in enumerate(RECENT):
        out[name] = values[:, column]
    return out


def attach_item_stats(frame: pd.DataFrame, stats: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` with :func:`item_stats` columns (NaN for an item without events)."""
    if stats is None:
        return frame
    return frame.drop(columns=[c for c in stats.columns if c in frame.columns]).join(stats, on=S.COL_ITEM)


def feature_frame(entity_df: pd.DataFrame, settings: Settings, factors: Factors,
                  feature_service: str = "ranker_v1", stats: pd.DataFrame | None = None) -> pd.DataFrame:
    """Point-in-time features for entity rows (Feast), in the rows' own order, with the vectors
    of ``factors`` and the item statistics ``stats`` of the same events (module docstring)."""
    from pipelines.feature_store import get_training_frame

    entity = entity_df.reset_index(drop=True).assign(**{_COL_ROW: np.arange(len(entity_df))})
    started = time.perf_counter()
    frame = cast(pd.DataFrame, get_training_frame(entity, feature_service, settings=settings))
    # Feast's Spark join repeats an entity row when a view holds two rows with the same entity,
    # event time and created time; they carry the same-time values, so one of them is kept
    duplicated = int(frame.duplicated(_COL_ROW).sum())
    if duplicated:
        log.warning("feature frame: %d entity rows came back more than once; kept one of each", duplicated)
    frame = (frame.drop_duplicates(_COL_ROW, keep="last").sort_values(_COL_ROW).reset_index(drop=True)
             .drop(columns=[_COL_ROW]))
    log.info("feature frame: %d rows x %d columns from %r in %.1fs", len(frame), frame.shape[1], feature_service,
             time.perf_counter() - started)
    return attach_recent_similarity(attach_item_stats(attach_embeddings(frame, factors), stats), factors)


# ---- training ---------------------------------------------------------------------------------


@dataclass
class RankerTraining:
    fit: FitResult
    factors: Factors  # the label-time ALS (fit part)
    examples: pd.DataFrame  # the training frame: features, labels
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LabelWindow:
    """One label window's examples with their features, and the ALS that scored them."""

    frame: pd.DataFrame
    factors: Factors
    users: int


def label_window(events: DataFrame, items: DataFrame, catalogue: np.ndarray, feature_settings: Settings,
                 als: ALSConfig, cleaning: CleaningConfig, ex: ExampleConfig, window: int,
                 progress: bool = True) -> tuple[LabelWindow, DataFrame]:
    """Split ``events`` into fit part and label window (the protocol's split), fit ALS, its
    item statistics and the index on the fit part, sample the window's examples and join their
    point-in-time features. Returns the window and the fit part (persisted: the next, earlier
    window is carved from it; the caller unpersists it)."""
    fit, labels = temporal_split(events)
    fit, labels = fit.persist(), labels.persist()
    fit_rows = fit.select(S.COL_USER, S.COL_ITEM, S.COL_TS).toPandas()
    positives = positives_of(fit, labels).toPandas()
    label_time = first_times(labels)
    fit_end = pd.to_datetime(fit_rows[S.COL_TS], utc=True).max().to_pydatetime()
    cleaned = clean_events(fit, fit_end, cleaning, catalogue=items)
    factors = fit_als(cleaned.interactions, als, cleaned.reference_time)
    stats = item_stats(fit)
    cleaned.interactions.unpersist()
    cleaned.events.unpersist()
    labels.unpersist()
    index = RetrievalIndex.build(factors)
    recent, seen = history(fit_rows, ex.candidates.max_recent)
    users, positives = sample_label_users(positives, ex.max_users, ex.seed + window)
    candidates = generate_candidates_batch(index, factors, users, recent, seen, ex.candidates, progress=progress)
    entity = sample_examples(candidates, positives, seen, label_time, catalogue, ex)
    frame = feature_frame(entity, feature_settings, factors, ex.feature_service, stats)
    frame[COL_LIST] = frame[S.COL_USER].to_numpy(np.int64) * MAX_WINDOWS + window  # one list per user and window
    return LabelWindow(frame, factors, len(users)), fit


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
    started = time.perf_counter()
    result = fit_ranker_cv(frame, frame[COL_LABEL].to_numpy(), windows[0].factors.rank, config, progress=progress)
    seconds["ranker_fit_s"] = round(time.perf_counter() - started, 2)
    log.info("ranker trained on %d rows (%d positives, %s label users by window): %s", result.rows, result.positives,
             [w.users for w in windows], seconds)
    return RankerTraining(result, windows[0].factors, frame, seconds)


# ---- two-stage ranking ------------------------------------------------------------------------


def rerank(scorer: Any, frame: pd.DataFrame, users: np.ndarray, catalogue: np.ndarray, fallback: np.ndarray,
           depth: int, progress: bool = True) -> np.ndarray:
    """Ranked catalogue columns (len(users) x depth): each user's candidates in ``frame`` by the
    ranker's logits (ties by item id), then ``fallback`` (that user's row of ALS-ranked columns)
    for the rest. ``scorer`` is a :class:`models.ranker.RankerScorer` (the exported SavedModel)."""
    out = np.full((len(users), depth), -1, dtype=np.int64)
    logits = scorer.score_frame(frame, progress)  # each user's candidates scored as one list
    groups = {int(u): rows for u, rows in frame.groupby(S.COL_USER, sort=False).indices.items()} if len(frame) else {}
    item_ids = frame[S.COL_ITEM].to_numpy(np.int64)
    for row, user in enumerate(users.tolist()):
        ranked: list[int] = []
        rows = groups.get(int(user))
        if rows is not None and len(rows):
            ids = item_ids[rows]
            ranked = ids[np.lexsort((ids, -logits[rows]))].tolist()
        cols = np.searchsorted(catalogue, np.asarray(ranked, np.int64))
        chosen = list(dict.fromkeys(cols.tolist()))[:depth]
        taken = set(chosen)
        for col in fallback[row].tolist():
            if len(chosen) >= depth:
                break
            if col >= 0 and col not in taken:
                chosen.append(col)
                taken.add(col)
        out[row, : len(chosen)] = chosen
    return out


def train_only_dataset(ctx: EvalContext) -> Settings:
    """A canonical dataset next to the evaluated one holding its *training* events only, with
    its daily snapshots, real-time backfill and `feast apply`: every feature the two-stage
    evaluation joins is then computed from training data, as of each row's time."""
    from pipelines import feature_store as fs
    from pipelines.backfill import run_backfill
    from pipelines.batch_features import DayRange, run_batch_features

    name = f"{ctx.dataset_dir.name}-train"
    target = ctx.settings.data_path / "canonical" / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for entry in ctx.dataset_dir.iterdir():
        if entry.name != "events":
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target / entry.name)
    ctx.train.write.mode("overwrite").parquet(str(target / "events"))
    settings = ctx.settings.with_overrides(dataset=name, feast_project=f"eval{uuid.uuid4().hex[:8]}")
    if settings.dataset_path != target:
        raise RuntimeError(f"dataset path {settings.dataset_path} is not {target}: check Settings.dataset_path")
    end = ctx.cutoff + ONE_US
    first = pd.to_datetime(ctx.train_rows[S.COL_TS], utc=True).min().date()
    run_batch_features(ctx.spark, settings, end, DayRange(first, end.date()))
    run_backfill(ctx.spark, settings, end)
    fs.apply(settings)
    return settings


def two_stage(ctx: EvalContext, config: RankerConfig | None = None, examples: ExampleConfig | None = None,
              depth: int = 20, progress: bool = True) -> np.ndarray:
    """The report's two-stage model (a ``TwoStageFn`` for :func:`models.evaluate.run_evaluation`):
    ranker trained on the training data (module docstring), then each scored user's retrieval
    candidates (from ALS fitted on all of train) re-ranked by the exported SavedModel, with
    features as of just before the user's first test event."""
    from pyspark.sql import functions as F

    ex = examples or ExampleConfig()
    fsettings = train_only_dataset(ctx)
    items = ctx.spark.read.parquet(str(ctx.dataset_dir / "items")).select(S.COL_ITEM)
    catalogue = ctx.eval_set.catalogue
    trained = train_ranker_on(ctx.train, items, catalogue, fsettings, ctx.als, ctx.cleaning, config, ex, progress)
    folder = export_ranker(trained.fit, ctx.settings.data_path / "models" / "ranker-eval")
    scorer = load_scorer(folder)

    users = ctx.eval_set.users
    index = RetrievalIndex.build(ctx.factors)
    recent, seen = history(ctx.train_rows, ex.candidates.max_recent)
    candidates = generate_candidates_batch(index, ctx.factors, users, recent, seen, ex.candidates, progress=progress)
    test_time = first_times(ctx.test.filter(F.col(S.COL_USER).isin([int(u) for u in users])))
    # item statistics of all training events: the same events as the test-time ALS
    frame = feature_frame(candidate_rows(candidates, test_time), fsettings, ctx.factors, ex.feature_service,
                          item_stats(ctx.train))
    popularity = Popularity.fit(ctx.train_rows)
    fallback = rank_with(ctx.eval_set, ctx.factors.score_fn(catalogue, fallback=popularity.scores(catalogue)), depth)
    return rerank(scorer, frame, users, catalogue, fallback, depth, progress)


# ---- `recsys train ranker`: the active dataset, MLflow, BentoML ---------------------------------


def ranker_path(settings: Settings) -> Path:
    """``<data_path>/models/<dataset>/ranker/``: where ``recsys train ranker`` exports the ranker."""
    return settings.data_path / "models" / settings.dataset / "ranker"


@dataclass
class RankerTrainResult:
    training: RankerTraining
    path: Path
    cutoff: datetime
    run_id: str | None = None
    bento_tag: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    registered: dict[str, str] = field(default_factory=dict)  # MLflow registered name -> version


def train_ranker(settings: Settings, config: RankerConfig | None = None, examples: ExampleConfig | None = None,
                 als: ALSConfig | None = None, cleaning: CleaningConfig | None = None, out: Path | None = None,
                 track: bool = True, bentoml_home: Path | None = None, progress: bool = True) -> RankerTrainResult:
    """Train the ranker on the active dataset's events up to its reference time, with features
    from its feature store (run `recsys features build`/backfill and `recsys features apply`
    first), export the SavedModel, log it to MLflow and save it to BentoML as ``ranker``."""
    from pyspark.sql import functions as F

    from pipelines.canonical import reference_time
    from recsys.spark import get_spark

    started = time.perf_counter()
    cutoff = reference_time(settings.dataset_path, settings.as_of)
    spark = get_spark(settings, app_name="recsys-train-ranker")
    events = spark.read.parquet(str(settings.dataset_path / "events")).filter(F.col(S.COL_TS) <= F.lit(cutoff))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM)
    catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
    training = train_ranker_on(events, items, catalogue, settings, als or ALSConfig(), cleaning or CleaningConfig(),
                               config, examples, progress)
    metadata = {"dataset": settings.dataset, "training_cutoff": cutoff.isoformat()}
    # serving scores with the production ALS, fitted on all events to the cutoff: the item
    # statistics that go with it are those of the same events (as evaluation does for test rows)
    path = export_ranker(training.fit, out or ranker_path(settings), metadata, item_stats=item_stats(events))
    result = RankerTrainResult(training, path, cutoff, seconds={**training.seconds,
                                                               "ranker_s": round(time.perf_counter() - started, 2)})
    if track:
        _track_ranker(settings, result, als or ALSConfig(), examples or ExampleConfig(), bentoml_home)
    return result


def _track_ranker(settings: Settings, result: RankerTrainResult, als: ALSConfig, examples: ExampleConfig,
                  bentoml_home: Path | None) -> None:
    import json

    from models.ranker import BENTO_RANKER_MODEL, META_FILE
    from models.tracking import (
        RANKER_MODEL_NAME,
        RANKER_REQUIREMENTS,
        ModelSpec,
        RankerModel,
        dataset_fingerprint,
        log_training_run,
        save_to_bentoml,
    )
    from models.train import TRAINING_EXPERIMENT

    fit = result.training.fit
    params = {**fit.config.params(), **{f"label_{k}": v for k, v in als.params().items()},
              "n_hard": examples.n_hard, "n_random": examples.n_random, "feature_service": examples.feature_service,
              "candidates": str(examples.candidates), "dataset": settings.dataset,
              "training_cutoff": result.cutoff.isoformat(), "device": fit.device}
    metrics = {"rows": fit.rows, "positives": fit.positives, **result.seconds,
               **{f"train_{k}": v[-1] for k, v in fit.history.items() if v}}
    run = log_training_run(settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"ranker-{settings.dataset}", params,
                           metrics, dataset_fingerprint(settings.dataset_path, reference_time=result.cutoff.isoformat()),
                           artifacts={"ranker": result.path},
                           models=[ModelSpec(RANKER_MODEL_NAME, RankerModel(), {"ranker": result.path}, None,
                                             tuple(RANKER_REQUIREMENTS))])
    result.run_id, result.registered = run.run_id, run.registered
    meta_path = result.path / META_FILE  # the run id is the version the service reports
    meta = json.loads(meta_path.read_text())
    meta.update({"mlflow_run_id": run.run_id, "version": run.run_id})
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    result.bento_tag = save_to_bentoml(BENTO_RANKER_MODEL, result.path, run.run_id, bentoml_home=bentoml_home,
                                       metadata={k: v for k, v in meta.items() if k != "history"} | {"metrics": metrics})
