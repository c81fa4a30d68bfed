"""The platform's Feast layer: one RepoConfig from Settings, apply, materialize, push, and
point-in-time training frames.

``feature_repo/feature_store.yaml`` holds the local defaults for plain ``feast`` commands; every
call in the platform builds its config from :class:`recsys.config.Settings` instead, so the
environment (``REDIS_URL``, ``SPARK_MASTER``, ...) always wins. ``render_feature_store_yaml``
writes that config out for ``feast -f``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.spark import prepare_spark_env, spark_conf

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import DataFrame as SparkDataFrame

log = logging.getLogger(__name__)

FEATURE_SERVICES = ("ranker_v1", "retrieval_v1", "two_tower_v1")
PUSH_SOURCE = "user_realtime_push"
_COL_ROW = "_row"  # entity row order: Feast hands a frame back in its own order


class FeatureStoreError(RuntimeError):
    """A feature-store call that cannot succeed as configured; the message says what to fix."""


def feature_repo_path(settings: Settings) -> Path:
    return settings.home / "feature_repo"


def registry_path(settings: Settings) -> Path:
    """The default dataset keeps Feast's own default location, so plain `feast` sees it too."""
    if settings.dataset == "synthetic" and settings.data_dir == Path("data"):
        return feature_repo_path(settings) / "data" / "registry.db"
    return settings.data_path / "feast" / settings.dataset / "registry.db"


#: Views that only materialization writes online: their bulk loads skip Feast's read-before-write
#: timestamp check (one Redis round trip instead of two). user_realtime keeps the check, so a
#: materialization never overwrites a newer value the stream pushed.
BATCH_ONLY_VIEWS = (T.USER_PROFILE, T.ITEM_PROFILE, T.USER_EMBEDDING, T.ITEM_EMBEDDING)


#: Feast's batch engine for every materialization (ours and plain `feast materialize`).
#: pipelines.materialize.engine.ColumnarRedisEngine is Feast's LocalComputeEngine plus a
#: column-wise Redis writer for the batch-only views: Feast's own engine builds a proto per value,
#: hashes every field name and serializes every entity key per row, so its cost is paid per value.
#: The fast path reads the same rows and writes byte-identical hashes (keys, fields, `_ts`, EXPIRE,
#: skip_dedup as configured); user_realtime, which the stream also writes, keeps Feast's own path.
#: Keep feature_repo/feature_store.yaml in step (tests/feature_repo/test_materialize_engine.py checks it).
BATCH_ENGINE_TYPE = "pipelines.materialize.engine.ColumnarRedisEngine"


def batch_engine_config() -> dict[str, Any]:
    return {"type": BATCH_ENGINE_TYPE, "fast_views": list(BATCH_ONLY_VIEWS)}


def repo_config_dict(settings: Settings, skip_dedup: bool = False) -> dict[str, Any]:
    online: dict[str, Any] = {"type": "redis", "connection_string": settings.feast_redis_connection_string}
    if settings.online_key_ttl_seconds:
        online["key_ttl_seconds"] = settings.online_key_ttl_seconds
    if skip_dedup:
        online["skip_dedup"] = True
    return {
        "project": settings.feast_project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(registry_path(settings)),
                     "cache_ttl_seconds": settings.registry_cache_ttl_seconds},
        "online_store": online,
        "offline_store": {"type": "spark", "spark_conf": spark_conf(settings)},
        "batch_engine": batch_engine_config(),
        "entity_key_serialization_version": 3,
    }


def render_feature_store_yaml(settings: Settings, out: Path | None = None) -> Path:
    """Write the effective feature_store.yaml (endpoints from the environment) for `feast -f`."""
    out = out or registry_path(settings).parent / "feature_store.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Rendered by `recsys features render` from the environment. Do not edit; re-render.\n"
    out.write_text(header + yaml.safe_dump(repo_config_dict(settings), sort_keys=False))
    return out


def get_store(settings: Settings, skip_dedup: bool = False) -> FeatureStore:
    """A FeatureStore for ``settings``. ``skip_dedup`` is for a single writer that orders its own
    writes (the stream consumer): Feast then writes in one round trip and never drops a write
    whose event time equals the stored one."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    prepare_spark_env(settings)
    registry_path(settings).parent.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(repo_path=feature_repo_path(settings), **repo_config_dict(settings, skip_dedup))
    return FeatureStore(config=config, repo_path=str(feature_repo_path(settings)))


def check_online_store(settings: Settings, timeout_s: float = 2.0) -> None:
    """Fail fast with a clear message instead of hanging when Redis is not reachable."""
    from pipelines.stack import redis_healthy

    if not redis_healthy(settings.effective_redis_url, timeout_s):
        where = "run `recsys stack up`" if settings.redis_is_local else "check REDIS_URL"
        raise FeatureStoreError(f"online store at {settings.effective_redis_url} is not reachable: {where}")


def feast_cli(settings: Settings, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `feast` CLI from feature_repo/ with the rendered config and our environment."""
    config = render_feature_store_yaml(settings)
    env = {**os.environ, "RECSYS_HOME": str(settings.home), "RECSYS_DATA_DIR": str(settings.data_path),
           "RECSYS_DATASET": settings.dataset, "RECSYS_KAFKA_PORT": str(settings.kafka_port)}
    if settings.kafka_bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    command = [str(Path(sys.executable).with_name("feast")), "-c", str(feature_repo_path(settings)),
               "-f", str(config), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)  # noqa: S603
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise FeatureStoreError(f"`feast {' '.join(args)}` failed (exit {result.returncode}):\n{tail}")
    return result


def apply(settings: Settings) -> None:
    """Create the offline tables that are still missing, then `feast apply` (idempotent)."""
    events = settings.dataset_path / "events"
    if not events.is_dir():
        raise FeatureStoreError(
            f"no canonical events at {events}: run `recsys data generate` or `recsys data load PATH` first"
        )
    for path in T.ensure_tables(settings):
        log.info("created empty offline table %s", path)
    feast_cli(settings, "apply")


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _check_offline_tables(settings: Settings) -> None:
    missing = [str(T.table_path(settings, t)) for t in T.TABLES if not T.table_path(settings, t).is_dir()]
    if missing:
        raise FeatureStoreError(f"offline feature tables missing: {', '.join(missing)}: run `recsys features apply`")


def _split_views(views: list[str] | None) -> tuple[list[str], list[str]]:
    wanted = list(views) if views else list(T.TABLES)
    unknown = [v for v in wanted if v not in T.TABLES]
    if unknown:
        raise FeatureStoreError(f"unknown feature views {unknown}: choose from {list(T.TABLES)}")
    return [v for v in wanted if v in BATCH_ONLY_VIEWS], [v for v in wanted if v not in BATCH_ONLY_VIEWS]


def materialize(settings: Settings, start: datetime, end: datetime, views: list[str] | None = None) -> None:
    """Load the latest offline value of each entity within [start, end] into Redis."""
    check_online_store(settings)
    _check_offline_tables(settings)
    bulk, checked = _split_views(views)
    if bulk:
        get_store(settings, skip_dedup=True).materialize(_utc(start), _utc(end), feature_views=bulk)
    if checked:
        get_store(settings).materialize(_utc(start), _utc(end), feature_views=checked)


def materialize_incremental(settings: Settings, end: datetime, views: list[str] | None = None) -> None:
    """Materialize each view from where its last materialization ended."""
    check_online_store(settings)
    _check_offline_tables(settings)
    bulk, checked = _split_views(views)
    if bulk:
        get_store(settings, skip_dedup=True).materialize_incremental(_utc(end), feature_views=bulk)
    if checked:
        get_store(settings).materialize_incremental(_utc(end), feature_views=checked)


# ---- training frames --------------------------------------------------------------------------

#: Entity rows per point-in-time join. Each chunk is one Feast query whose result Spark writes to
#: parquet, so the Spark driver never holds more than a chunk's join, whatever the frame's size.
#: Every chunk also pays a fixed cost (Feast's query is some hundred Spark stages, whatever the
#: rows), so the chunk is as large as a local driver joins comfortably: the ranker's default
#: examples (``ExampleConfig.max_users`` label users x ~100 rows) fit in one.
TRAINING_FRAME_CHUNK_ROWS = 250_000
#: Spark SQL settings for the point-in-time join only (restored after it). Feast's query groups the
#: entity rows per view, then broadcast-joins each view's rows onto them, which multiplies every
#: entity row by the entity's rows in the view (an item's daily snapshots). Adaptive execution sizes
#: partitions by the grouped rows' few megabytes and coalesces them into one, so those multiplied
#: joins ran as a single task on one core; without coalescing they keep spark.sql.shuffle.partitions.
TRAINING_FRAME_SPARK_SQL: dict[str, str] = {"spark.sql.adaptive.coalescePartitions.enabled": "false"}
#: Entity rows a pandas training frame may have: the whole frame is held in this process's memory.
TRAINING_FRAME_MAX_ROWS = 5_000_000


def get_training_frame(
    entity_df: pd.DataFrame,
    feature_service: str = "ranker_v1",
    settings: Settings | None = None,
    output: Literal["pandas", "spark"] = "pandas",
    store: FeatureStore | None = None,
    chunk_rows: int = TRAINING_FRAME_CHUNK_ROWS,
    max_rows: int = TRAINING_FRAME_MAX_ROWS,
) -> pd.DataFrame | SparkDataFrame:
    """Labels plus point-in-time-correct features.

    ``entity_df`` has ``event_timestamp`` (the label's time) and the join keys the service needs
    (``user_id`` and/or ``item_id``), plus any label columns. Each row gets, for every feature
    view, the latest value whose event time is at or before the label's time and within the view's
    TTL; nothing stamped after the label is ever joined. Missing values come back as nulls, rows in
    Feast's order (not the entity's).

    Bounded memory: the entity rows reach Spark as a parquet scan, never as an in-memory relation
    (Feast's query reads the entity table several times per feature view, and a relation built
    from pandas puts a copy of every row into the driver's heap for each read). ``output="pandas"`` joins them in chunks of at
    most ``chunk_rows`` rows, in label-time order, each written to parquet by Spark and read back
    with pyarrow; a frame over ``max_rows`` rows raises :class:`FeatureStoreError` before any work.
    ``output="spark"`` is one lazy query over all the rows (its entity parquet is removed when
    this process exits). The pandas joins run with :data:`TRAINING_FRAME_SPARK_SQL` set on the
    session (restored after), which changes how Spark parallelises them, never a value.
    """
    from recsys.config import load_settings

    settings = settings or load_settings()
    if S.COL_TS not in entity_df.columns:
        raise FeatureStoreError(f"entity_df needs an {S.COL_TS!r} column (the label time); it has {list(entity_df.columns)}")
    if feature_service not in FEATURE_SERVICES:
        raise FeatureStoreError(f"unknown feature service {feature_service!r}: choose from {FEATURE_SERVICES}")
    if chunk_rows < 1:
        raise FeatureStoreError(f"chunk_rows={chunk_rows} must be >= 1")
    if output == "pandas" and len(entity_df) > max_rows:
        raise FeatureStoreError(
            f"the training frame would have {len(entity_df):,} entity rows, over max_rows={max_rows:,} (all held "
            "in memory): sample fewer label users (`recsys train ranker --max-users`, ExampleConfig.max_users) "
            "or raise max_rows (pipelines.feature_store.TRAINING_FRAME_MAX_ROWS) on a machine with the memory")
    frame = entity_df.reset_index(drop=True)
    frame[S.COL_TS] = pd.to_datetime(frame[S.COL_TS], utc=True).dt.as_unit("us")
    store = store or get_store(settings)
    service = store.get_feature_service(feature_service)
    scratch = settings.data_path / "tmp" / f"training-frame-{uuid.uuid4().hex[:12]}"
    chunks = _write_entity_chunks(frame, scratch / "entity", chunk_rows if output == "pandas" else len(frame) or 1)
    if output == "spark":
        atexit.register(shutil.rmtree, scratch, True)
        return store.get_historical_features(entity_df=_entity_spark_df(settings, chunks), features=service).to_spark_df()
    try:
        started = time.perf_counter()
        parts = []
        with _session_sql_conf(settings, TRAINING_FRAME_SPARK_SQL):
            for number, chunk in enumerate(chunks):
                result = scratch / "frame" / chunk.name
                job = store.get_historical_features(entity_df=_entity_spark_df(settings, [chunk]), features=service)
                job.to_spark_df().write.mode("overwrite").parquet(str(result))
                parts.append(pq.read_table(result))
                log.info("training frame: chunk %d/%d joined, %d entity rows (%.1fs so far)", number + 1, len(chunks),
                         parts[-1].num_rows, time.perf_counter() - started)
        return _frame_from_arrow(pa.concat_tables(parts, promote_options="permissive"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def training_frame_in_order(entity_df: pd.DataFrame, feature_service: str, settings: Settings,
                            chunk_rows: int = TRAINING_FRAME_CHUNK_ROWS) -> pd.DataFrame:
    """:func:`get_training_frame` as pandas, one row per entity row, in ``entity_df``'s order.
    Feast's Spark join repeats an entity row when a view holds two rows with the same entity,
    event time and created time (the same values): one of them is kept, with a warning."""
    entity = entity_df.reset_index(drop=True).assign(**{_COL_ROW: np.arange(len(entity_df))})
    frame = cast(pd.DataFrame, get_training_frame(entity, feature_service, settings=settings, chunk_rows=chunk_rows))
    duplicated = int(frame.duplicated(_COL_ROW).sum())
    if duplicated:
        log.warning("%s frame: %d entity rows came back more than once; kept one of each", feature_service, duplicated)
    return (frame.drop_duplicates(_COL_ROW, keep="last").sort_values(_COL_ROW).reset_index(drop=True)
            .drop(columns=[_COL_ROW]))


@contextmanager
def _session_sql_conf(settings: Settings, conf: dict[str, str]) -> Iterator[None]:
    """Set Spark SQL ``conf`` on the process's session (the one Feast's offline store uses) for the
    block's duration, then restore each key's previous value, so other Spark jobs keep theirs."""
    from recsys.spark import get_spark

    spark = get_spark(settings)
    previous = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _write_entity_chunks(frame: pd.DataFrame, folder: Path, chunk_rows: int) -> list[Path]:
    """The entity rows as parquet folders of at most ``chunk_rows`` rows, in label-time order (a
    chunk then spans few days, and Feast prunes the profile views' date partitions to them)."""
    ordered = frame.sort_values(S.COL_TS, kind="stable")
    table = pa.Table.from_pandas(ordered, preserve_index=False)
    paths = []
    for number, start in enumerate(range(0, max(len(ordered), 1), chunk_rows)):
        path = folder / f"chunk={number:05d}"
        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(start, chunk_rows), path / "part-0.parquet", coerce_timestamps="us")
        paths.append(path)
    return paths


def _entity_spark_df(settings: Settings, paths: list[Path]) -> SparkDataFrame:
    from pyspark.sql import functions as F

    from recsys.spark import get_spark

    entity = get_spark(settings).read.parquet(*[str(p) for p in paths])
    # timestamp_ntz (UTC wall-clock) because Feast takes the label-time range from a collect()
    # of this column, and pyspark turns a plain timestamp into the Python process's local time
    return entity.withColumn(S.COL_TS, F.col(S.COL_TS).cast("timestamp_ntz"))


def _frame_from_arrow(table: pa.Table) -> pd.DataFrame:
    """The joined parquet as pandas, typed as Feast's own ``to_df()`` types it: the label time in
    UTC, every other timestamp naive UTC (as Spark's collect hands them back)."""
    result = table.to_pandas()
    for column in result.columns:
        if isinstance(result[column].dtype, pd.DatetimeTZDtype):
            result[column] = result[column].dt.tz_convert(None)
    result[S.COL_TS] = pd.to_datetime(result[S.COL_TS], utc=True)
    return result


# ---- push -------------------------------------------------------------------------------------


def realtime_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows for the user_realtime push source, in the offline table's column order and types."""
    schema = T.table_schema(T.USER_REALTIME)
    missing = [c for c in schema.names if c not in rows.columns and c != T.CREATED]
    if missing:
        raise FeatureStoreError(f"user_realtime rows lack columns {missing}")
    frame = rows.copy()
    if T.CREATED not in frame:
        frame[T.CREATED] = pd.Timestamp.now(tz="UTC")
    for col in (S.COL_TS, T.CREATED, "last_action_ts"):
        frame[col] = pd.to_datetime(frame[col], utc=True).dt.as_unit("us")  # Spark 4 rejects ns parquet
    return frame[schema.names]


def push_user_realtime(store: FeatureStore, rows: pd.DataFrame, online: bool = True, offline: bool = False) -> None:
    """Write real-time user rows through Feast's push source (online store, offline log, or both)."""
    from feast.data_source import PushMode

    if not (online or offline):
        return
    mode = (PushMode.ONLINE_AND_OFFLINE if online and offline else PushMode.ONLINE if online else PushMode.OFFLINE)
    store.push(PUSH_SOURCE, realtime_frame(rows), to=mode)
