"""The ``served`` row of ``recsys evaluate`` (:func:`served`, a :data:`models.holdout.ServedFn`):
the service's own engine (:func:`bentos.factory.build_engine` ->
:meth:`bentos.engine.RecommendationEngine.recommend`: its candidate strategies, the ranker, the
business rules and the diversification) asked for every scored user of the protocol, with an
online store that holds training data only, as of the training cutoff.

What the engine reads, and where it comes from (training events only; nothing of the test split
exists in any of them):

- Feast's online store: the train-only feature dataset of the two-stage step
  (:func:`models.ranker.two_stage.train_only_dataset`, its own Feast project), with the ALS
  factors the evaluation fitted on all of train as its embedding views, materialized up to the
  cutoff;
- the stream's Redis state and purchased-item sets: the real-time backfill with ``seed_state``
  (:func:`pipelines.backfill.run_backfill`), up to the cutoff;
- trending: the window ending at the cutoff (:func:`pipelines.trending.refresh_trending`).

Those keys go to a Redis database of their own (:func:`borrowed_database`: an empty logical
database of the configured server, claimed for the run and emptied afterwards), because the
trending and purchased-item keys carry no project name and would otherwise overwrite the demo's.
The engine's clock and the ranker's request time are the cutoff; its index is built from the
evaluation's ALS factors; its ranker is the two-stage step's export (without a two-stage step:
no ranker, the strategy blend). The ranker's time budget is lifted (a loaded machine must not turn
answers into fallbacks); Redis reads get a generous socket timeout for the same reason.

Answers become catalogue columns as the two-stage row's do
(:func:`models.ranker.two_stage.fill_columns`): the protocol ranks no training item, so those
are dropped (counted), repeats keep their first place, and the ALS ranking fills a list that comes
up short (counted).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlunparse

import numpy as np
import pandas as pd
import redis
from tqdm.auto import tqdm

from bentos.answer import Recommendation
from bentos.config import ServingConfig
from models.protocol import evaluate_top_k
from models.ranker.two_stage import als_fallback, fill_columns
from pipelines.feature_store import FeatureStoreError
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from bentos.engine import RecommendationEngine
    from models.holdout import EvalContext

log = logging.getLogger(__name__)

SERVED = "served"
#: Logical databases the evaluation may borrow, tried from the highest: the demo uses 0.
EVALUATION_DBS = tuple(range(15, 0, -1))
#: Set (NX) in a borrowed database for the time of the run: two evaluations never share one.
CLAIM_KEY = "recsys:evaluation:claim"
#: The ranker's budget per call in evaluation: far above any scoring time, so that a loaded
#: machine never turns a ranker answer into a cosine fallback (the service measures its own).
EVAL_RANKER_TIMEOUT_MS = 60_000.0
#: Redis socket timeout in evaluation (the service's is short, to degrade rather than stall).
EVAL_REDIS_TIMEOUT_S = 10.0
DIAGNOSTIC_K = 10


def check_redis(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise :class:`FeatureStoreError` naming the fix when the configured Redis does not answer."""
    from pipelines.stack import redis_healthy

    if not redis_healthy(settings.effective_redis_url, timeout_s):
        where = "start it with `recsys stack up`" if settings.redis_is_local else "check REDIS_URL"
        raise FeatureStoreError(
            f"the served row needs Redis, and {settings.effective_redis_url} is not reachable: {where}, "
            "or skip the row with --no-served")


def _database_url(url: str, db: int) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{db}"))


@contextmanager
def borrowed_database(settings: Settings) -> Iterator[Settings]:
    """``settings`` pointed at an empty logical database of the same Redis server, claimed with
    :data:`CLAIM_KEY` and emptied (FLUSHDB) when the block ends, whatever happened in it."""
    check_redis(settings)
    base = settings.effective_redis_url
    own = int((urlparse(base).path or "/0").lstrip("/") or 0)
    for db in EVALUATION_DBS:
        if db == own:
            continue
        url = _database_url(base, db)
        client = redis.Redis.from_url(url, socket_timeout=EVAL_REDIS_TIMEOUT_S)
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, str(os.getpid()), nx=True):
                break
        except redis.ResponseError:  # a server configured with fewer databases
            pass
        client.close()
    else:
        raise FeatureStoreError(
            f"no empty Redis database among {EVALUATION_DBS[-1]}..{EVALUATION_DBS[0]} on {base} for the served "
            "row: empty one of them (they hold evaluation leftovers only), or pass --no-served")
    log.info("served row: Redis database %d borrowed", db)
    try:
        yield settings.with_overrides(redis_url=url)
    finally:
        client.flushdb()
        client.close()
        log.info("served row: Redis database %d emptied", db)


def seed_online_store(ctx: EvalContext, settings: Settings) -> dict[str, int]:
    """What the engine reads from Redis, from training events only, as of the cutoff (module
    docstring); ``settings`` is the train-only dataset's, pointed at the borrowed database.
    Returns how many users' states were seeded and how many trending events were counted."""
    from models.als import embedding_table_path, export_factors
    from models.ranker.examples import ONE_US
    from pipelines import feature_store as fs
    from pipelines.backfill import run_backfill
    from pipelines.trending import refresh_trending

    end = ctx.cutoff + ONE_US  # the train-only dataset's snapshots are computed up to here
    export_factors(ctx.factors, embedding_table_path(settings, "user"), embedding_table_path(settings, "item"))
    first = pd.to_datetime(ctx.train_rows[S.COL_TS], utc=True).min().to_pydatetime()
    fs.materialize(settings, first - timedelta(days=1), end)
    backfill = run_backfill(ctx.spark, settings, end, seed_state=True)
    trending = refresh_trending(settings, ctx.spark, ctx.cutoff)
    return {"states_seeded": backfill.seeded, "trending_events": trending.events}


def build_served_engine(ctx: EvalContext, settings: Settings) -> RecommendationEngine:
    """The service's engine on ``settings`` (seeded), with the evaluation's ALS index, the
    two-stage ranker when there is one, and the cutoff as its clock."""
    from bentos.factory import build_engine
    from models.retrieval import RetrievalIndex

    items = pd.read_parquet(ctx.dataset_dir / "items", columns=[S.COL_ITEM, S.COL_CATEGORY])
    category = items.set_index(S.COL_ITEM)[S.COL_CATEGORY]
    categories = category.reindex(ctx.factors.item_ids).fillna(-1).to_numpy(np.int64)
    index_dir = RetrievalIndex.build(ctx.factors, categories).save(ctx.settings.data_path / "models" / "served-index")
    client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=EVAL_REDIS_TIMEOUT_S,
                                  socket_connect_timeout=EVAL_REDIS_TIMEOUT_S)
    config = ServingConfig(cache_ttl_s=settings.recs_cache_ttl_seconds, ranker_timeout_ms=EVAL_RANKER_TIMEOUT_MS)
    cutoff = ctx.cutoff
    return build_engine(settings, index_dir=index_dir, ranker_dir=ctx.ranker_dir, config=config, client=client,
                        now=lambda: cutoff)


def answer_ids(rec: Recommendation) -> list[int]:
    """The answer's whole ranked list (what the cache would hold), best first."""
    return [int(item["item_id"]) for item in (rec.top or rec.items)]


def by_score(rec: Recommendation) -> list[int]:
    """The same items re-sorted by final score (ties by id): the order before diversification,
    which moves items without changing their scores (a diagnostic)."""
    items = rec.top or rec.items
    return [int(i["item_id"]) for i in sorted(items, key=lambda i: (-float(i["score"]), int(i["item_id"])))]


def answers_to_columns(answers: list[list[int]], catalogue: np.ndarray, fallback: np.ndarray, depth: int,
                       seen: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Each user's answer as ``depth`` catalogue columns (:func:`fill_columns`; ``seen[u]``, the
    user's training columns, dropped when given), and the counts: ``training_items_dropped@10``
    (of each answer's first 10 items, those the user trained on), ``users_filled`` and
    ``slots_filled`` (columns from ``fallback``)."""
    out = np.full((len(answers), depth), -1, dtype=np.int64)
    dropped = users_filled = slots_filled = 0
    for row, ids in enumerate(answers):
        exclude = None if seen is None else seen[row]
        if exclude is not None and len(ids):
            first = np.searchsorted(catalogue, np.asarray(ids[:DIAGNOSTIC_K], np.int64))
            dropped += int(np.isin(first, exclude).sum())
        out[row], filled = fill_columns(ids, catalogue, fallback[row], depth, exclude)
        users_filled += filled > 0
        slots_filled += filled
    return out, {"training_items_dropped@10": dropped, "users_filled": users_filled, "slots_filled": slots_filled}


def served(ctx: EvalContext, depth: int = 20, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The report's served row (module docstring): ranked catalogue columns for
    ``ctx.eval_set.users`` (``depth`` each), and how they were obtained (counts of cold-start,
    degraded and filled answers, the strategies of the top 10, and the ndcg@10 of two variants
    that locate a gap: the answers with training items kept, and re-sorted by final score)."""
    from models.ranker.two_stage import train_only_dataset

    feature_settings = ctx.feature_settings or train_only_dataset(ctx)
    eval_set, catalogue = ctx.eval_set, ctx.eval_set.catalogue
    with borrowed_database(feature_settings) as settings:
        seeded = seed_online_store(ctx, settings)
        engine = build_served_engine(ctx, settings)
        try:
            answers, resorted, strategies, reasons = [], [], Counter(), Counter()
            cold = degraded = 0
            for user in tqdm(eval_set.users.tolist(), desc="served", unit="user", disable=not progress):
                rec = engine.recommend(int(user), k=depth, use_cache=False, context={"timestamp": ctx.cutoff})
                answers.append(answer_ids(rec))
                resorted.append(by_score(rec))
                strategies.update(item["strategy"] for item in (rec.top or rec.items)[:DIAGNOSTIC_K])
                reasons.update(rec.degraded_reasons)
                cold += rec.cold_start
                degraded += rec.degraded
            ranker = engine.scoring.scorer is not None
        finally:
            engine.close()
    fallback = als_fallback(ctx, depth)
    ranked, counts = answers_to_columns(answers, catalogue, fallback, depth, eval_set.seen)
    kept, _ = answers_to_columns(answers, catalogue, fallback, depth)
    undiversified, _ = answers_to_columns(resorted, catalogue, fallback, depth, eval_set.seen)
    info: dict[str, Any] = {
        "users": len(answers), "ranker": ranker, "cold_start": cold,
        "degraded": degraded, "degraded_reasons": dict(reasons),
        **counts, "strategies@10": dict(strategies), **seeded,
        "ndcg@10_training_items_kept": evaluate_top_k(eval_set, kept, (10,))["ndcg@10"],
        "ndcg@10_by_score_undiversified": evaluate_top_k(eval_set, undiversified, (10,))["ndcg@10"],
    }
    log.info("served: %s", info)
    return ranked, info
