"""The batch engine named in ``feature_store.yaml``: Feast's LocalComputeEngine plus a column-wise
Redis writer for the batch-only views.

Named as ``batch_engine: {type: pipelines.materialize.engine.ColumnarRedisEngine}``, so
``FeatureStore.materialize`` *and* plain ``feast materialize`` / ``materialize-incremental`` use it;
Feast still records the materialization intervals in the registry after the engine returns.

Feast's own engine spends most of a materialization in Python per value: a proto per value, the
``mmh3`` of every field name and ``serialize_entity_key`` per row, then redis-py's pipeline per
command. For the views listed in ``fast_views`` this engine reads the same rows through Feast's own
source node (the offline store's pull, renamed by the field mapping), keeps the latest row per
entity as Feast's dedup node does, and hands them to :class:`~pipelines.materialize.writer.ViewWriter`,
which writes them as Feast's Redis store would (``_ts``, ``EXPIRE key_ttl_seconds``, ``skip_dedup``),
with a progress bar per view. The Redis content is byte-identical to Feast's
(tests/feature_repo/test_materialize_engine.py). Every other view (``user_realtime``, which the
stream also writes) and every view shape the fast path does not cover (transformations,
aggregations, several join keys, a non-Redis online store, ...) goes through Feast's engine unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, List, Optional

import numpy as np
import pyarrow as pa
from feast import FeatureView
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.compute_engines.utils import ENTITY_TS_ALIAS
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel
from feast.types import Int64
from pydantic import StrictInt, StrictStr

from pipelines.feast_redis.compute import FeastLocalEngine
from pipelines.feast_redis.layout import plain_redis_refusal
from pipelines.materialize.writer import InFlight, ViewWriter

log = logging.getLogger(__name__)

ENGINE_TYPE = "pipelines.materialize.engine.ColumnarRedisEngine"


class ColumnarRedisEngineConfig(FeastConfigBaseModel):
    """``batch_engine:`` block of feature_store.yaml for :class:`ColumnarRedisEngine`."""

    type: StrictStr = ENGINE_TYPE
    backend: Optional[StrictStr] = None
    """As LocalComputeEngine's: the DataFrame backend of the views Feast materializes itself."""
    fast_views: List[StrictStr] = []
    """Views written column-wise; every other view goes through Feast's LocalComputeEngine."""
    chunk_rows: StrictInt = 10_000
    """Rows per pipelined round trip (and per progress-bar step)."""


class ColumnarRedisEngine(FeastLocalEngine):
    """Feast's LocalComputeEngine with a column-wise Redis writer for the views in ``fast_views``."""

    def __init__(self, *, fast_views: Sequence[str] = (), chunk_rows: int = 10_000,
                 backend: Optional[str] = None, **kwargs: Any) -> None:
        kwargs.pop("type", None)
        super().__init__(backend=backend, **kwargs)
        self.fast_views = frozenset(fast_views)
        self.chunk_rows = max(1, int(chunk_rows))

    # -- which views take the fast path

    def fast_path_refusal(self, feature_view: Any) -> str | None:
        """Why ``feature_view`` goes through Feast's own engine, or None if it takes the fast path."""
        config = self.repo_config
        if feature_view.name not in self.fast_views:
            return "not a fast view"
        if type(feature_view) is not FeatureView:
            return f"{type(feature_view).__name__} (transformations or streams)"
        if not feature_view.online or feature_view.offline:
            return "not an online-only view"
        if getattr(feature_view, "feature_transformation", None) or getattr(feature_view, "aggregations", None) \
                or getattr(feature_view, "filter", None) or getattr(feature_view, "enable_validation", False):
            return "transformation, aggregation, filter or validation"
        if feature_view.batch_source is None or feature_view.data_source is None:
            return "no batch source of its own"
        store_refusal = plain_redis_refusal(self.online_store, config)
        if store_refusal is not None:
            return store_refusal
        if len(feature_view.entity_columns) != 1 or feature_view.entity_columns[0].dtype != Int64:
            return "not a single Int64 join key"
        return None

    def materialize_view(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
                         ) -> LocalMaterializationJob:
        """The fast path for a view it covers; Feast's own engine for every other view."""
        reason = self.fast_path_refusal(task.feature_view)
        if reason is not None:
            log.debug("materializing %s with Feast's engine: %s", task.feature_view.name, reason)
            return self.feast_materialize_view(registry, task, **kwargs)
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        try:
            self._materialize_fast(registry, task)
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
        except Exception as e:  # noqa: BLE001 - Feast's contract: the job carries the error
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)

    # -- reading: the rows Feast's own plan would hand its output node

    def _read_rows(self, registry: BaseRegistry, task: MaterializationTask) -> pa.Table:
        view = task.feature_view
        table, builder = self.source_rows(registry, task)
        if ENTITY_TS_ALIAS in table.column_names:  # never for materialization; Feast's filter would apply
            raise RuntimeError(f"unexpected {ENTITY_TS_ALIAS} column materializing {view.name}")
        if self.dedupes(builder, view):
            table = self._latest_per_entity(builder, view, table)
        return table

    @staticmethod
    def _latest_per_entity(builder: LocalFeatureBuilder, view: FeatureView, table: pa.Table) -> pa.Table:
        """Feast's dedup node (sort by event then created time, descending; first row per key), in NumPy."""
        info = builder.get_column_info(view)
        (key_col,) = info.join_keys_columns
        sort_cols = [info.timestamp_column]
        if info.created_timestamp_column and info.created_timestamp_column in table.column_names:
            sort_cols.append(info.created_timestamp_column)
        if table.num_rows < 2:
            return table
        if any(table.column(c).null_count for c in (key_col, *sort_cols)):
            backend = builder.backend  # nulls sort last in pandas: let Feast's own dedup decide
            df = backend.drop_duplicates(backend.from_arrow(table), keys=[key_col], sort_by=sort_cols, ascending=False)
            return backend.to_arrow(df)
        keys = table.column(key_col).to_numpy()
        sort_values = []
        for c in sort_cols:
            col = table.column(c)
            arr = col.to_numpy() if not pa.types.is_timestamp(col.type) else col.cast(pa.int64()).to_numpy()
            sort_values.append(arr)
        # lexsort is stable and sorts by the last key first: newest event, then newest created
        order = np.lexsort([-v for v in reversed(sort_values)])
        _, first = np.unique(keys[order], return_index=True)
        if len(first) == table.num_rows:
            return table
        return table.take(pa.array(np.sort(order[first])))

    # -- writing

    def _materialize_fast(self, registry: BaseRegistry, task: MaterializationTask) -> None:
        view: FeatureView = task.feature_view
        started = time.perf_counter()
        table = self._read_rows(registry, task)
        read_s = time.perf_counter() - started
        n = table.num_rows
        if n == 0:
            log.info("materialized %s: no rows in range", view.name)
            return
        self.validate_vector_lengths(table, view)
        writer = ViewWriter(self.repo_config, view, self.online_store)
        bar = task.tqdm_builder(n) if task.tqdm_builder else None
        written = 0
        in_flight: InFlight | None = None  # chunk i is on the wire while chunk i+1 is packed
        try:
            for lo in range(0, n, self.chunk_rows):
                chunk = table.slice(lo, self.chunk_rows)
                if not writer.skip_dedup and in_flight is not None:
                    in_flight = in_flight.finish()  # the timestamp check reads what was written
                packed, commands, rows = writer.pack(chunk)
                if in_flight is not None:
                    in_flight = in_flight.finish()
                in_flight = writer.start(packed, commands) if commands else None
                written += rows
                if bar is not None:
                    bar.update(chunk.num_rows)
                else:
                    log.debug("%s: %d/%d rows", view.name, lo + chunk.num_rows, n)
            if in_flight is not None:
                in_flight = in_flight.finish()
        finally:
            if in_flight is not None:
                in_flight.abort()
            if bar is not None:
                bar.close()
        log.info("materialized %s: %d rows (%d written) in %.1fs (read %.1fs)",
                 view.name, n, written, time.perf_counter() - started, read_s)


__all__ = ["ColumnarRedisEngine", "ColumnarRedisEngineConfig", "ENGINE_TYPE"]
