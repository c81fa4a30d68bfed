"""Spark MLlib ALS on cleaned, weighted interactions, its factors on disk, and a popularity baseline.

The factors are written as the offline tables of Feast's ``user_embedding`` and ``item_embedding``
feature views (:func:`embedding_table_path`): one parquet row per user (item) with ``embedding``
(list<float32>), ``event_timestamp`` = the training cutoff (the features are valid from then on,
so point-in-time joins never see them before the data they were fitted on) and ``created``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.arrays import positions, replace_dir
from models.protocol import UNKNOWN_SCORE, EvalSet, ScoreFn, evaluate_scorer
from pipelines.cleaning import COL_WEIGHT
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

COL_EMBEDDING = T.feature_names(T.USER_EMBEDDING)[0]  # "embedding", as feature_tables declares
_INT32_MAX = 2**31 - 1
EmbeddingKind = Literal["user", "item"]
_TABLES: dict[str, str] = {"user": T.USER_EMBEDDING, "item": T.ITEM_EMBEDDING}


@dataclass(frozen=True)
class ALSConfig:
    """Spark ALS hyperparameters (implicit feedback). Defaults: among rank-64 points of the
    tuning grid, the best on the ML-100K validation split (rank 128 scored a little higher at a
    much longer fit; benchmarks/results/ holds the numbers). ``recsys evaluate`` and
    ``recsys train als --tune`` tune them for the data at hand."""

    rank: int = 64
    reg_param: float = 0.2
    alpha: float = 0.5
    max_iter: int = 15
    seed: int = 42
    #: Spark splits users and items into blocks; a few suit local mode, raise it on a cluster.
    num_blocks: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be >= 1")
        if self.reg_param < 0:
            problems.append(f"reg_param={self.reg_param} must be >= 0")
        if self.alpha <= 0:
            problems.append(f"alpha={self.alpha} must be > 0")
        if self.max_iter < 1:
            problems.append(f"max_iter={self.max_iter} must be >= 1")
        if self.num_blocks < 1:
            problems.append(f"num_blocks={self.num_blocks} must be >= 1")
        if problems:
            raise ValueError("invalid ALS config: " + "; ".join(problems))

    def params(self) -> dict[str, Any]:
        return {f"als_{k}": v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ALSGrid:
    """The small tuning grid: every combination, fitted on the fit part and scored on validation."""

    ranks: tuple[int, ...] = (32, 64, 128)
    reg_params: tuple[float, ...] = (0.1, 0.2, 0.4)
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0)

    def configs(self, base: ALSConfig) -> list[ALSConfig]:
        return [replace(base, rank=r, reg_param=g, alpha=a)
                for r in self.ranks for g in self.reg_params for a in self.alphas]


@dataclass(frozen=True)
class Factors:
    """ALS factors: row ``i`` of ``users`` is the vector of ``user_ids[i]`` (ids ascending)."""

    user_ids: np.ndarray
    users: np.ndarray
    item_ids: np.ndarray
    items: np.ndarray
    cutoff: datetime

    @property
    def rank(self) -> int:
        return int(self.items.shape[1])

    def user_vectors(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, known): zero vectors where a user has no factors (``known`` False)."""
        return _lookup(self.user_ids, self.users, user_ids)

    def item_vectors(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _lookup(self.item_ids, self.items, item_ids)

    def score_fn(self, catalogue: np.ndarray, fallback: np.ndarray | None = None) -> ScoreFn:
        """A protocol scorer over ``catalogue``: user . item; items without a vector rank last.
        Users without a vector get ``fallback`` scores (e.g. popularity), else all zeros."""
        item_vecs, item_known = self.item_vectors(catalogue)

        def score(users: np.ndarray) -> np.ndarray:
            user_vecs, user_known = self.user_vectors(users)
            scores = user_vecs @ item_vecs.T
            scores[:, ~item_known] = UNKNOWN_SCORE
            if fallback is not None and not user_known.all():
                scores[~user_known] = fallback
            return scores

        return score


def _lookup(ids: np.ndarray, vectors: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, known = positions(ids, wanted)
    out = np.zeros((len(pos), vectors.shape[1]), dtype=np.float32)
    out[known] = vectors[pos[known]]
    return out, known


# ---- fitting ----------------------------------------------------------------------------------


def _ensure_checkpoint_dir(spark: Any) -> None:
    """ALS only truncates its lineage at checkpoints; without a checkpoint directory a fit of
    15 iterations can fail with a StackOverflowError while serializing tasks."""
    sc = spark.sparkContext
    if sc.getCheckpointDir() is None:
        path = tempfile.mkdtemp(prefix="recsys-als-checkpoints-")
        sc.setCheckpointDir(path)
        log.info("Spark checkpoint dir set to %s (for ALS)", path)


def _check_id_range(interactions: DataFrame) -> None:
    from pyspark.sql import functions as F

    row = interactions.agg(F.max(S.COL_USER).alias("u"), F.max(S.COL_ITEM).alias("i"),
                           F.min(S.COL_USER).alias("u0"), F.min(S.COL_ITEM).alias("i0")).first()
    for name, value in ((S.COL_USER, row["u"]), (S.COL_ITEM, row["i"])):
        if value is not None and value > _INT32_MAX:
            raise ValueError(
                f"{name} {value} exceeds Spark ALS's int32 ids: map ids to 0..2^31-1 before training"
            )
    if row["u0"] is None:
        raise ValueError("no interactions to train on: the training data is empty after cleaning")


def fit_als(interactions: DataFrame, cfg: ALSConfig, cutoff: datetime) -> Factors:
    """Fit implicit ALS on (user_id, item_id, weight) rows; ``cutoff`` is the training data's end."""
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    _check_id_range(interactions)
    _ensure_checkpoint_dir(interactions.sparkSession)
    data = interactions.select(F.col(S.COL_USER).cast("int").alias("u"), F.col(S.COL_ITEM).cast("int").alias("i"),
                               F.col(COL_WEIGHT).cast("float").alias("w"))
    als = ALS(rank=cfg.rank, regParam=cfg.reg_param, alpha=cfg.alpha, maxIter=cfg.max_iter, seed=cfg.seed,
              implicitPrefs=True, userCol="u", itemCol="i", ratingCol="w", checkpointInterval=5,
              numUserBlocks=cfg.num_blocks, numItemBlocks=cfg.num_blocks)
    model = als.fit(data)
    user_ids, users = _collect(model.userFactors)
    item_ids, items = _collect(model.itemFactors)
    return Factors(user_ids, users, item_ids, items, cutoff.astimezone(timezone.utc))


def _collect(frame: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    pdf = frame.toPandas().sort_values("id")
    ids = pdf["id"].to_numpy().astype(np.int64)
    vectors = np.stack(pdf["features"].to_numpy()).astype(np.float32) if len(pdf) else np.empty((0, 0), np.float32)
    return ids, vectors


@dataclass
class Trial:
    config: ALSConfig
    metrics: dict[str, float]
    seconds: float


@dataclass
class TuningResult:
    best: ALSConfig
    trials: list[Trial] = field(default_factory=list)
    metric: str = "ndcg@10"

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best": asdict(self.best),
            "trials": [{**{k: v for k, v in asdict(t.config).items() if k in ("rank", "reg_param", "alpha")},
                        **t.metrics, "seconds": round(t.seconds, 2)} for t in self.trials],
        }


def tune_als(interactions: DataFrame, validation: EvalSet, cutoff: datetime, grid: ALSGrid | None = None,
             base: ALSConfig | None = None, metric: str = "ndcg@10", progress: bool = True) -> TuningResult:
    """Fit every grid config on ``interactions`` (the fit part of train) and keep the best on the
    validation split by ``metric`` (ties: the earlier config in the grid)."""
    base = base or ALSConfig()
    configs = (grid or ALSGrid()).configs(base)
    fallback = validation.popularity.astype(np.float64)
    trials: list[Trial] = []
    for cfg in tqdm(configs, desc="tuning ALS", unit="fit", disable=not progress):
        start = time.perf_counter()
        factors = fit_als(interactions, cfg, cutoff)
        report = evaluate_scorer(validation, factors.score_fn(validation.catalogue, fallback))
        metrics = {k: round(float(report[k]), 5) for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")}
        trials.append(Trial(cfg, metrics, time.perf_counter() - start))
        log.info("ALS rank=%d reg=%.3g alpha=%.3g: validation %s", cfg.rank, cfg.reg_param, cfg.alpha, metrics)
    best = max(trials, key=lambda t: t.metrics[metric])  # max keeps the first of equal values
    log.info("best ALS config on validation: %s (%s %.4f)", best.config, metric, best.metrics[metric])
    return TuningResult(best.config, trials, metric)


# ---- popularity baseline ----------------------------------------------------------------------


@dataclass(frozen=True)
class Popularity:
    """Items ranked by their number of distinct training users (ties: item id ascending)."""

    item_ids: np.ndarray
    counts: np.ndarray

    @classmethod
    def fit(cls, train: pd.DataFrame) -> Popularity:
        counts = train.drop_duplicates([S.COL_USER, S.COL_ITEM]).groupby(S.COL_ITEM).size().sort_index()
        return cls(counts.index.to_numpy().astype(np.int64), counts.to_numpy().astype(np.int64))

    def scores(self, catalogue: np.ndarray) -> np.ndarray:
        out = np.zeros(len(catalogue), dtype=np.float64)
        pos, hit = positions(self.item_ids, catalogue)
        out[hit] = self.counts[pos[hit]]
        return out

    def score_fn(self, catalogue: np.ndarray) -> ScoreFn:
        row = self.scores(catalogue)
        return lambda users: np.broadcast_to(row, (len(users), len(row)))


# ---- factors on disk (the Feast offline tables) -----------------------------------------------


def embedding_table_path(settings: Settings, kind: EmbeddingKind) -> Path:
    """``<data_path>/features/<dataset>/{user,item}_embedding/``: where Feast's ``user_embedding``
    and ``item_embedding`` feature views read the ALS factors of the active dataset."""
    if kind not in ("user", "item"):
        raise ValueError(f"kind={kind!r}: choose 'user' or 'item'")
    return T.table_path(settings, _TABLES[kind])


def _embedding_table(kind: EmbeddingKind, ids: np.ndarray, vectors: np.ndarray, cutoff: datetime,
                     created: datetime) -> pa.Table:
    """The rows of a ``{user,item}_embedding`` table, in the schema ``recsys.feature_tables`` fixes."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), flat)
    schema = T.table_schema(_TABLES[kind])
    columns = {
        T.entity_key(_TABLES[kind]): pa.array(ids, pa.int64()),
        S.COL_TS: pa.array([cutoff] * n, S.TS_TYPE),
        T.CREATED: pa.array([created] * n, S.TS_TYPE),
        COL_EMBEDDING: embedding,
    }
    return pa.table([columns[name] for name in schema.names], schema=schema)


def _write_table_dir(table: pa.Table, out_dir: Path) -> Path:
    # microsecond timestamps: Spark 4 (Feast's offline store) refuses nanoseconds
    return replace_dir(out_dir, lambda tmp: pq.write_table(table, tmp / "part-00000.parquet", coerce_timestamps="us"))


def export_factors(factors: Factors, user_dir: Path, item_dir: Path, created: datetime | None = None) -> None:
    """Write the user and item factors as the ``user_embedding`` / ``item_embedding`` tables."""
    created = created or datetime.now(timezone.utc)
    _write_table_dir(_embedding_table("user", factors.user_ids, factors.users, factors.cutoff, created), user_dir)
    _write_table_dir(_embedding_table("item", factors.item_ids, factors.items, factors.cutoff, created), item_dir)
    log.info("wrote %d user and %d item vectors (rank %d, cutoff %s) to %s and %s", len(factors.user_ids),
             len(factors.item_ids), factors.rank, factors.cutoff.isoformat(), user_dir, item_dir)


def _read_embeddings(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, datetime]:
    if not Path(path).exists():
        raise FileNotFoundError(f"no embeddings at {path}: run `recsys train als` first")
    table = pq.read_table(path).sort_by(key)
    ids = table.column(key).to_numpy().astype(np.int64)
    emb = table.column(COL_EMBEDDING).combine_chunks()
    vectors = emb.flatten().to_numpy().astype(np.float32).reshape(len(ids), -1) if len(ids) else np.empty((0, 0))
    cutoff = table.column(S.COL_TS)[0].as_py() if len(ids) else datetime.fromtimestamp(0, timezone.utc)
    return ids, vectors, cutoff


def load_factors(user_dir: Path, item_dir: Path) -> Factors:
    """Read factors written by :func:`export_factors`."""
    user_ids, users, cutoff = _read_embeddings(user_dir, S.COL_USER)
    item_ids, items, _ = _read_embeddings(item_dir, S.COL_ITEM)
    return Factors(user_ids, users, item_ids, items, cutoff)

