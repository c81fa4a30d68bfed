"""``recsys train two-tower``: the two towers trained on the active dataset
(:func:`train_two_tower_job`), exported to :func:`two_tower_path` with the item vectors of the
whole catalogue (:func:`export_item_vectors`, what serving searches), logged to MLflow
(registered as the pyfunc model ``recsys-two-tower``) and saved to the BentoML model store as
``two_tower``.

Rows. One row per positive event up to the reference time (the protocol's definition,
:func:`models.protocol.positive_condition`: a rating >= 4, or CLICK or stronger), one per
distinct (user, item, time): :func:`positive_rows`. Above ``max_rows`` the latest rows are kept:
they are contiguous in time, so the split below still cuts one timeline, and the most recent
behaviour is the closest to what the towers will serve.

Features. Each row is stamped one microsecond before its event, as the ranker stamps its labels
(:mod:`models.ranker.examples`): the real-time view holds a row stamped at each event's own time
with that event already folded in (the positive item in ``last_5_items``), which the
point-in-time join must not hand back. :func:`point_in_time_frame` joins the ``two_tower_v1``
feature service through :func:`pipelines.feature_store.get_training_frame`, the ranker's frame
builder (chunked Spark joins, each written to parquet: bounded memory).

Split. By time, never at random (:func:`time_split`): the rows of the last ``valid_fraction`` of
label times validate (early stopping, the loss choice, the metrics), all strictly later than every
training row.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from models.names import BENTO_TWO_TOWER_MODEL, TRAINING_EXPERIMENT, TWO_TOWER_MODEL_NAME
from models.two_tower.config import TwoTowerConfig
from models.two_tower.export import META_FILE, export_two_tower
from models.two_tower.training import TENSORBOARD_DIR, TrainedTwoTower, train_two_tower
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

ONE_US = timedelta(microseconds=1)  # the ranker's stamp: features strictly before the event
#: one column per view of the service (user_profile, user_realtime, item_profile), for the log
_VIEW_PROBES = ("n_events", "interaction_count", "title")


@dataclass(frozen=True)
class TwoTowerJobConfig:
    """How the job builds its frames. ``max_rows``: positives kept (the latest; None = all);
    each costs one entity row in the Feast join and one training row held in memory.
    ``chunk_rows``: entity rows per point-in-time join (None: the frame builder's
    ``TRAINING_FRAME_CHUNK_ROWS``)."""

    max_rows: int | None = 500_000
    valid_fraction: float = 0.1
    feature_service: str = "two_tower_v1"
    chunk_rows: int | None = None

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 2:
            raise ValueError(f"max_rows={self.max_rows} must be >= 2 (a training and a validation row), "
                             "or None for every positive")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction={self.valid_fraction} must be within (0, 1), e.g. 0.1")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be >= 1 (or None for the default)")


def two_tower_path(settings: Settings) -> Path:
    """``<data_path>/models/<dataset>/two_tower/``: where ``recsys train two-tower`` exports."""
    return settings.data_path / "models" / settings.dataset / "two_tower"


@dataclass
class TwoTowerTrainResult:
    """What ``recsys train two-tower`` did: the trained towers, where they went, the cutoff and
    the split time, the frames they learned and were validated on, and (when tracked) the MLflow
    run, registered version and BentoML tag."""

    trained: TrainedTwoTower
    path: Path
    cutoff: datetime
    split_time: datetime  # validation rows are at or after it, training rows before
    train_frame: pd.DataFrame
    valid_frame: pd.DataFrame
    positives: int  # positive rows available up to the cutoff, before the ``max_rows`` cap
    job: TwoTowerJobConfig = field(default_factory=TwoTowerJobConfig)
    run_id: str | None = None
    bento_tag: str | None = None
    registered: dict[str, str] = field(default_factory=dict)  # MLflow registered name -> version
    seconds: dict[str, float] = field(default_factory=dict)


def positive_rows(settings: Settings, cutoff: datetime, max_rows: int | None) -> tuple[pd.DataFrame, int]:
    """(rows, available): distinct (user_id, item_id, event_timestamp) of the dataset's positive
    events at or before ``cutoff``, the latest ``max_rows`` of them, sorted by time; ``available``
    counts them all. Raises ValueError, naming the fix, when there is none."""
    from pyspark.sql import functions as F

    from models.protocol import MIN_POSITIVE_RATING, POSITIVE_CLICKSTREAM, positive_condition
    from recsys.spark import get_spark

    events = (get_spark(settings, app_name="recsys-train-two-tower").read.parquet(str(settings.dataset_path / "events"))
              .filter(F.col(S.COL_TS) <= F.lit(cutoff)))
    positives = events.filter(positive_condition()).select(S.COL_USER, S.COL_ITEM, S.COL_TS).distinct()
    available = positives.count()
    if available == 0:
        raise ValueError(
            f"dataset {settings.dataset!r} has no positive events up to {cutoff.isoformat()} (ratings >= "
            f"{MIN_POSITIVE_RATING:g} or {', '.join(POSITIVE_CLICKSTREAM)}): the two towers learn from positives "
            "only; use a dataset that has them (`recsys data generate`, `recsys data load`) or a later --as-of")
    if max_rows is not None and available > max_rows:
        positives = positives.orderBy(F.col(S.COL_TS).desc(), S.COL_USER, S.COL_ITEM).limit(max_rows)
    rows = cast(pd.DataFrame, positives.toPandas())
    rows[S.COL_USER] = rows[S.COL_USER].astype(np.int64)
    rows[S.COL_ITEM] = rows[S.COL_ITEM].astype(np.int64)
    rows[S.COL_TS] = pd.to_datetime(rows[S.COL_TS], utc=True)
    return rows.sort_values([S.COL_TS, S.COL_USER, S.COL_ITEM], kind="stable").reset_index(drop=True), available


def point_in_time_frame(positives: pd.DataFrame, settings: Settings, feature_service: str = "two_tower_v1",
                        chunk_rows: int | None = None) -> pd.DataFrame:
    """The rows of ``positives`` (user_id, item_id, event_timestamp), in their order, with the
    service's features as of one microsecond before each event; ``event_timestamp`` becomes that
    instant (the features' time, which also ages the items)."""
    from feast.errors import FeatureServiceNotFoundException

    from pipelines.feature_store import TRAINING_FRAME_CHUNK_ROWS, FeatureStoreError, training_frame_in_order

    entity = positives[[S.COL_USER, S.COL_ITEM]].assign(**{
        S.COL_TS: pd.to_datetime(positives[S.COL_TS], utc=True) - ONE_US})
    started = time.perf_counter()
    try:
        frame = training_frame_in_order(entity, feature_service, settings, chunk_rows or TRAINING_FRAME_CHUNK_ROWS)
    except FeatureServiceNotFoundException as exc:  # a registry applied before the service existed
        raise FeatureStoreError(f"feature service {feature_service!r} is not in the feature store's registry: run "
                                "`recsys features apply` (it registers feature_repo/recsys_repo.py's services)") from exc
    # a row without a view's values is masked, not dropped: say how many rows each view reached
    present = {column: int(frame[column].notna().sum()) for column in _VIEW_PROBES if column in frame}
    log.info("two-tower frame: %d rows x %d columns from %r in %.1fs; rows with a value: %s", len(frame),
             frame.shape[1], feature_service, time.perf_counter() - started, present)
    return frame


def time_split(frame: pd.DataFrame, valid_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, datetime]:
    """(train, valid, split time): rows at or after the split time validate, the rows before it
    train. The split time is the time of the first of the last ``ceil(valid_fraction * n)`` rows
    by time, so rows sharing that instant all validate (validation may come out a little larger)
    and every validation row is strictly later than every training row."""
    times = pd.to_datetime(frame[S.COL_TS], utc=True)
    n_valid = max(1, math.ceil(valid_fraction * len(times)))
    split = times.sort_values(kind="stable").iloc[len(times) - n_valid] if len(times) else None
    if split is None or not (times < split).any():
        raise ValueError(f"{len(frame)} positive rows leave no training row before the last {valid_fraction:.0%} "
                         "of label time: use a dataset with more positives over time or a smaller valid_fraction")
    is_valid = (times >= split).to_numpy()
    return (frame[~is_valid].reset_index(drop=True), frame[is_valid].reset_index(drop=True),
            split.to_pydatetime())


def train_two_tower_job(settings: Settings, config: TwoTowerConfig | None = None, job: TwoTowerJobConfig | None = None,
                        out: Path | None = None, track: bool = True, bentoml_home: Path | None = None,
                        progress: bool = True) -> TwoTowerTrainResult:
    """Train the two towers on the active dataset's positives up to its reference time, with
    point-in-time features from its feature store (run `recsys features build`/backfill and
    `recsys features apply` first), export them to ``out`` (default :func:`two_tower_path`), log
    to MLflow and save to BentoML as ``two_tower``. Checkpoints and TensorBoard logs go to the
    folder beside the export, ``<out>_work`` (replaced on each run)."""
    from tqdm.auto import tqdm

    from pipelines.canonical import reference_time
    from pipelines.feature_store import TRAINING_FRAME_CHUNK_ROWS

    cfg, job = config or TwoTowerConfig(), job or TwoTowerJobConfig()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    cutoff = reference_time(settings.dataset_path, settings.as_of)
    steps = tqdm(total=4 + int(track), desc="train two-tower", unit="step", disable=not progress)
    positives, available = positive_rows(settings, cutoff, job.max_rows)
    log.info("two-tower: %d positive rows up to %s; %s; Feast service %r, joined in chunks of %d entity rows",
             available, cutoff.isoformat(),
             f"kept the latest {len(positives)} (max_rows={job.max_rows})" if len(positives) < available
             else f"all kept (max_rows={job.max_rows})", job.feature_service,
             job.chunk_rows or TRAINING_FRAME_CHUNK_ROWS)
    seconds["two_tower_positives_s"] = _lap(started)
    steps.update()
    frame = point_in_time_frame(positives, settings, job.feature_service, job.chunk_rows)
    train_frame, valid_frame, split_time = time_split(frame, job.valid_fraction)
    del frame
    log.info("two-tower: %d training rows before %s, %d validation rows from it (valid_fraction=%g)",
             len(train_frame), split_time.isoformat(), len(valid_frame), job.valid_fraction)
    seconds["two_tower_frame_s"] = _lap(started, seconds)
    steps.update()
    path = Path(out or two_tower_path(settings))
    workdir = path.with_name(f"{path.name}_work")
    shutil.rmtree(workdir, ignore_errors=True)  # this run's logs only, never an earlier run's mixed in
    trained = train_two_tower(train_frame, valid_frame, cfg, workdir, progress=progress)
    seconds["two_tower_train_s"] = _lap(started, seconds)
    steps.update()
    metadata = {"dataset": settings.dataset, "training_cutoff": cutoff.isoformat(),
                "split_time": split_time.isoformat(), "feature_service": job.feature_service,
                "frame_rows": {"train": len(train_frame), "valid": len(valid_frame), "positives": available}}
    export_two_tower(trained, path, metadata)
    n_items = export_item_vectors(settings, trained, path, cutoff)
    log.info("two-tower: %d catalogue item vectors written to %s", n_items, path)
    seconds["two_tower_export_s"] = _lap(started, seconds)
    steps.update()
    result = TwoTowerTrainResult(trained, path, cutoff, split_time, train_frame, valid_frame, available, job,
                                 seconds=seconds)
    seconds["two_tower_s"] = round(time.perf_counter() - started, 2)  # before tracking, as the ranker's
    if track:
        _track(settings, result, workdir / TENSORBOARD_DIR, bentoml_home)
        steps.update()
    steps.close()
    return result


def export_item_vectors(settings: Settings, trained: TrainedTwoTower, path: Path, cutoff: datetime) -> int:
    """The item tower's vector of every item of the dataset's items table, aged at ``cutoff``,
    written into the export at ``path`` (:func:`models.two_tower.export.write_item_vectors`): the
    served model then carries its index. Returns how many items."""
    from models.two_tower.export import write_item_vectors
    from models.two_tower.features import catalogue_frame
    from pipelines.canonical import read_table

    # every catalogue item, also one no training row reached: its id hashes to a bucket and its
    # category, tags, title and price still place it
    items = catalogue_frame(read_table(settings.dataset_path, "items"))
    vectors = trained.item_vectors(items, as_of=cutoff)
    write_item_vectors(path, items[S.COL_ITEM].to_numpy(dtype=np.int64), vectors)
    return len(items)


def _lap(started: float, done: dict[str, float] | None = None) -> float:
    """Seconds since ``started`` less the stages already in ``done``: this stage's own time."""
    return round(time.perf_counter() - started - sum((done or {}).values()), 2)


def _track(settings: Settings, result: TwoTowerTrainResult, tensorboard: Path, bentoml_home: Path | None) -> None:
    """The MLflow run (params, validation metrics per loss and of the kept one, the export and
    the TensorBoard logs as artifacts, the registered pyfunc), then the BentoML model."""
    from models.tracking import RANKER_REQUIREMENTS, ModelSpec, dataset_fingerprint, log_training_run, save_to_bentoml
    from models.two_tower.pyfunc import ARTIFACT, TwoTowerModel

    trained, job = result.trained, result.job
    params = {**{f"two_tower_{k}": v for k, v in trained.config.to_json().items()}, "chosen_loss": trained.loss,
              "max_rows": job.max_rows, "valid_fraction": job.valid_fraction, "feature_service": job.feature_service,
              "dataset": settings.dataset, "training_cutoff": result.cutoff.isoformat(),
              "split_time": result.split_time.isoformat(), "device": trained.device}
    # the kept loss's numbers at the top level (recall_at_10, recall_at_50, auc), each trained
    # loss's under its name (softmax/recall_at_10, ...)
    metrics = {**trained.metrics, **trained.trials, "train_rows": len(result.train_frame),
               "valid_rows": len(result.valid_frame), "positives": result.positives, **result.seconds}
    artifacts = {ARTIFACT: result.path, **({"tensorboard": tensorboard} if tensorboard.is_dir() else {})}
    # a TensorFlow model: the ranker's pinned TensorFlow and Keras load it
    model = ModelSpec(TWO_TOWER_MODEL_NAME, TwoTowerModel(), {ARTIFACT: result.path}, None, tuple(RANKER_REQUIREMENTS))
    run = log_training_run(settings.effective_mlflow_uri, TRAINING_EXPERIMENT, f"two-tower-{settings.dataset}",
                           params, metrics,
                           dataset_fingerprint(settings.dataset_path, reference_time=result.cutoff.isoformat()),
                           artifacts=artifacts, models=[model])
    result.run_id, result.registered = run.run_id, run.registered
    meta_path = result.path / META_FILE  # the run id is the version a server would report
    meta = json.loads(meta_path.read_text())
    meta.update({"mlflow_run_id": run.run_id, "version": run.run_id})
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    result.bento_tag = save_to_bentoml(BENTO_TWO_TOWER_MODEL, result.path, run.run_id, bentoml_home=bentoml_home,
                                       metadata={"loss": trained.loss, "metrics": trained.metrics,
                                                 "validation": trained.trials, "dataset": settings.dataset,
                                                 "training_cutoff": result.cutoff.isoformat()})
