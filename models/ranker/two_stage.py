"""The two-stage model of ``recsys evaluate`` (:func:`two_stage`, a
:data:`models.holdout.TwoStageFn`): the ranker trained on the evaluation's training events, then
each scored user's retrieval candidates re-ranked by the exported SavedModel (:func:`rerank`).
It records its train-only feature dataset and ranker folder on the context for the served step
(``bentos.evaluation``), and shares with it how ranked ids become catalogue columns
(:func:`fill_columns`) and the ALS fallback (:func:`als_fallback`)."""

from __future__ import annotations

import shutil
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.als import Factors, Popularity
from models.protocol import rank_with
from models.ranker.config import RankerConfig
from models.ranker.examples import ONE_US, ExampleConfig, candidate_rows, feature_frame, first_times, item_stats
from models.ranker.export import QUANTIZED_FILE, export_ranker
from models.ranker.scorer import RankerScorer, load_scorer
from models.ranker.training import train_ranker_on
from models.retrieval import RetrievalIndex, generate_candidates_batch, history
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from models.holdout import EvalContext


def fill_columns(ranked_ids: list[int] | np.ndarray, catalogue: np.ndarray, fallback: np.ndarray, depth: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """One user's ranked item ids as ``depth`` catalogue columns: ids outside the catalogue and
    columns in ``exclude`` dropped, repeats kept once (first place), then ``fallback`` (that
    user's ALS-ranked columns, -1 padded) for the rest; -1 pads what even that leaves. Returns
    the row and how many of its columns came from ``fallback``."""
    ids = np.asarray(ranked_ids, dtype=np.int64)
    cols = np.searchsorted(catalogue, ids)
    known = (cols < len(catalogue)) & (catalogue[np.minimum(cols, len(catalogue) - 1)] == ids) if len(catalogue) \
        else np.zeros(len(ids), bool)
    taken = set() if exclude is None else {int(c) for c in exclude}
    chosen: list[int] = []
    for col in cols[known].tolist():
        if len(chosen) >= depth:
            break
        if col not in taken:
            chosen.append(col)
            taken.add(col)
    own = len(chosen)
    for col in fallback.tolist():
        if len(chosen) >= depth:
            break
        if col >= 0 and col not in taken:
            chosen.append(col)
            taken.add(col)
    row = np.full(depth, -1, dtype=np.int64)
    row[: len(chosen)] = chosen
    return row, len(chosen) - own


def rerank(scorer: Any, frame: pd.DataFrame, users: np.ndarray, catalogue: np.ndarray, fallback: np.ndarray,
           depth: int, progress: bool = True) -> np.ndarray:
    """Ranked catalogue columns (len(users) x depth): each user's candidates in ``frame`` by the
    ranker's logits (ties by item id), then ``fallback`` (that user's row of ALS-ranked columns)
    for the rest (:func:`fill_columns`). ``scorer`` is a
    :class:`models.ranker.scorer.RankerScorer` (the exported SavedModel)."""
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
        out[row], _ = fill_columns(ranked, catalogue, fallback[row], depth)
    return out


def als_fallback(ctx: EvalContext, depth: int) -> np.ndarray:
    """Every scored user's ALS ranking (popularity for a user without an ALS vector), training
    items excluded: what fills a two-stage or served list that comes up short."""
    catalogue = ctx.eval_set.catalogue
    popularity = Popularity.fit(ctx.train_rows)
    return rank_with(ctx.eval_set, ctx.factors.score_fn(catalogue, fallback=popularity.scores(catalogue)), depth)


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


def candidate_frame(factors: Factors, train_rows: pd.DataFrame, users: np.ndarray, when: pd.Series,
                    feature_settings: Settings, examples: ExampleConfig, stats: pd.DataFrame | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """What :func:`rerank` scores: each of ``users``' retrieval candidates (an index of
    ``factors``, the history of ``train_rows``, ``examples.candidates``) with their point-in-time
    features from ``feature_settings``' store as of just before ``when[user]``
    (:func:`models.ranker.examples.feature_frame`: the vectors of ``factors``, the item
    statistics ``stats``; None leaves them to the scorer's exported ones). Shared by the two-stage
    row and the promotion gate (:mod:`models.gate_scoring`)."""
    index = RetrievalIndex.build(factors)
    recent, seen = history(train_rows, examples.candidates.max_recent)
    candidates = generate_candidates_batch(index, factors, users, recent, seen, examples.candidates,
                                           progress=progress)
    return feature_frame(candidate_rows(candidates, when), feature_settings, factors, examples.feature_service, stats)


def two_stage(ctx: EvalContext, config: RankerConfig | None = None, examples: ExampleConfig | None = None,
              depth: int = 20, progress: bool = True) -> np.ndarray:
    """The report's two-stage model (a ``TwoStageFn`` for :func:`models.evaluate.run_evaluation`):
    ranker trained on the training data (:mod:`models.ranker.training`), then each scored user's
    retrieval candidates (from ALS fitted on all of train) re-ranked by the exported SavedModel,
    with features as of just before the user's first test event."""
    from pyspark.sql import functions as F

    ex = examples or ExampleConfig()
    fsettings = train_only_dataset(ctx)
    items = ctx.spark.read.parquet(str(ctx.dataset_dir / "items")).select(S.COL_ITEM)
    catalogue = ctx.eval_set.catalogue
    trained = train_ranker_on(ctx.train, items, catalogue, fsettings, ctx.als, ctx.cleaning, config, ex, progress)
    # item statistics of all training events: the same events as the test-time ALS; exported with
    # the ranker too, so the served step's scorer reads the very values this frame carries
    stats = item_stats(ctx.train)
    folder = export_ranker(trained.fit, ctx.settings.data_path / "models" / "ranker-eval", item_stats=stats)
    scorer = load_scorer(folder)

    users = ctx.eval_set.users
    test_time = first_times(ctx.test.filter(F.col(S.COL_USER).isin([int(u) for u in users])))
    frame = candidate_frame(ctx.factors, ctx.train_rows, users, test_time, fsettings, ex, stats, progress)
    ctx.feature_settings, ctx.ranker_dir = fsettings, folder  # the served step reuses both
    fallback = als_fallback(ctx, depth)
    if (folder / QUANTIZED_FILE).is_file():  # the int8 variant on the very same lists: its ndcg cost
        ctx.quantized_ranked = rerank(RankerScorer(folder, "quantized"), frame, users, catalogue, fallback, depth,
                                      progress)
    return rerank(scorer, frame, users, catalogue, fallback, depth, progress)
