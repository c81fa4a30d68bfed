"""Feast's LocalComputeEngine with its per-view materialization step made a public, overridable method.

Feast calls the private ``_materialize_one`` once per view; :class:`FeastLocalEngine` is the only
place that overrides it, so an engine built on it overrides :meth:`FeastLocalEngine.materialize_view`
and reads its rows through :meth:`FeastLocalEngine.source_rows`, touching no Feast internals.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from feast import FeatureView
from feast.infra.common.materialization_job import MaterializationTask
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.utils import _validate_vector_field_lengths


class FeastLocalEngine(LocalComputeEngine):
    """LocalComputeEngine whose per-view step (:meth:`materialize_view`) a subclass may take over."""

    def _materialize_one(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
                         ) -> LocalMaterializationJob:
        return self.materialize_view(registry, task, **kwargs)

    def materialize_view(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
                         ) -> LocalMaterializationJob:
        """Materialize one view's task; by default exactly as Feast's LocalComputeEngine does."""
        return self.feast_materialize_view(registry, task, **kwargs)

    def feast_materialize_view(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
                               ) -> LocalMaterializationJob:
        """Feast's own materialization of one view (the fallback of a subclass)."""
        return super()._materialize_one(registry, task, **kwargs)

    def source_rows(self, registry: BaseRegistry, task: MaterializationTask) -> tuple[pa.Table, LocalFeatureBuilder]:
        """The rows Feast's own plan reads for ``task`` (its source node: the offline store's pull,
        renamed by the field mapping) and the builder that planned them."""
        context = self.get_execution_context(registry, task)
        builder = LocalFeatureBuilder(registry, task, backend=self._get_backend(context))
        return builder.build_source_node(task.feature_view).execute(context).data, builder

    @staticmethod
    def dedupes(builder: LocalFeatureBuilder, view: FeatureView) -> bool:
        """Whether Feast's plan keeps only the latest row per entity for ``view``."""
        return builder._should_dedupe(view)

    @staticmethod
    def validate_vector_lengths(table: pa.Table, view: FeatureView) -> None:
        """Feast's check that vector features have their declared length (raises otherwise)."""
        _validate_vector_field_lengths(table, view)
