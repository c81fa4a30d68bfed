"""Materialization into Feast's Redis online store, column-wise: the engine, its view writer, its encoders.

``engine`` is the batch engine named in ``feature_repo/feature_store.yaml``; ``writer`` packs one
view's rows as Feast's Redis store writes them; ``encoders`` turns Arrow columns into Feast's value
bytes. Feast's own layout comes from :mod:`pipelines.feast_redis`.
"""

from pipelines.materialize.encoders import encode_column
from pipelines.materialize.engine import ENGINE_TYPE, ColumnarRedisEngine, ColumnarRedisEngineConfig

__all__ = ["ColumnarRedisEngine", "ColumnarRedisEngineConfig", "ENGINE_TYPE", "encode_column"]
