"""The offline feature tables behind Feast's views: names, paths and Arrow schemas.

This is the contract between the jobs that write offline features (batch features, the stream's
offline log, ALS embeddings) and ``feature_repo/`` that declares them. Every table has the entity
key, ``event_timestamp`` (when the value became true) and ``created`` (when it was written; Feast
uses it to break ties between rows with the same event time).

Daily snapshot tables are partitioned by ``snapshot_date`` (YYYY-MM-DD) so a date range can be
recomputed idempotently (dynamic partition overwrite).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys import schema as S
from recsys.config import Settings

USER_PROFILE = "user_profile"
ITEM_PROFILE = "item_profile"
USER_REALTIME = "user_realtime"
USER_EMBEDDING = "user_embedding"
ITEM_EMBEDDING = "item_embedding"

CREATED = "created"
SNAPSHOT_DATE = "snapshot_date"
#: Tables written as daily snapshots, partitioned by SNAPSHOT_DATE.
PARTITIONED = (USER_PROFILE, ITEM_PROFILE)
#: The snapshot views' TTLs in days (``feature_repo/`` declares them from these). item_profile is
#: sparse: a row on change or every ITEM_PROFILE_TTL_DAYS-th day (a heartbeat), so no unchanged
#: value ages out of a point-in-time join while the batch job runs (docs/feature-store.md).
USER_PROFILE_TTL_DAYS = 2
ITEM_PROFILE_TTL_DAYS = 30

_KEYS = {
    USER_PROFILE: S.COL_USER,
    ITEM_PROFILE: S.COL_ITEM,
    USER_REALTIME: S.COL_USER,
    USER_EMBEDDING: S.COL_USER,
    ITEM_EMBEDDING: S.COL_ITEM,
}

_FEATURES: dict[str, list[pa.Field]] = {
    USER_PROFILE: [
        pa.field("n_events", pa.int64()),
        pa.field("n_views", pa.int64()),
        pa.field("n_clicks", pa.int64()),
        pa.field("n_carts", pa.int64()),
        pa.field("n_purchases", pa.int64()),
        pa.field("n_ratings", pa.int64()),
        pa.field("mean_rating", pa.float64()),
        pa.field("n_events_7d", pa.int64()),
        pa.field("days_since_first_seen", pa.float64()),
        pa.field("top_categories", pa.list_(pa.int64())),
    ],
    ITEM_PROFILE: [
        pa.field(S.COL_CATEGORY, pa.int64()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("price", pa.float64()),
        pa.field("margin", pa.float64()),
        pa.field("quality_score", pa.float64()),
        pa.field("inventory", pa.int64()),
        pa.field("popularity_1d", pa.int64()),
        pa.field("popularity_7d", pa.int64()),
        pa.field(S.COL_CREATED_AT, S.TS_TYPE),
        pa.field("title", pa.string()),
        pa.field("image_url", pa.string()),
    ],
    USER_REALTIME: [
        pa.field("last_5_items", pa.list_(pa.int64())),
        pa.field("last_action_ts", S.TS_TYPE),
        pa.field("interaction_count", pa.int64()),
        pa.field("total_purchases", pa.int64()),
        pa.field("preferred_categories", pa.list_(pa.int64())),
    ],
    USER_EMBEDDING: [pa.field("embedding", pa.list_(pa.float32()))],
    ITEM_EMBEDDING: [pa.field("embedding", pa.list_(pa.float32()))],
}

TABLES: tuple[str, ...] = tuple(_FEATURES)


def entity_key(table: str) -> str:
    return _KEYS[table]


def feature_names(table: str) -> list[str]:
    return [f.name for f in _FEATURES[table]]


def table_schema(table: str) -> pa.Schema:
    """Columns as stored in the parquet files (the partition column lives in the folder name)."""
    return pa.schema(
        [pa.field(_KEYS[table], pa.int64(), nullable=False), pa.field(S.COL_TS, S.TS_TYPE, nullable=False),
         pa.field(CREATED, S.TS_TYPE), *_FEATURES[table]]
    )


def features_root(settings: Settings) -> Path:
    return settings.data_path / "features" / settings.dataset


def table_path(settings: Settings, table: str) -> Path:
    if table not in _FEATURES:
        raise ValueError(f"unknown feature table {table!r}: choose from {TABLES}")
    return features_root(settings) / table


def ensure_tables(settings: Settings) -> list[Path]:
    """Create each missing table as one empty parquet file with its schema.

    Feast validates sources on ``apply`` and Spark needs a schema to read, so every view's table
    exists from the first apply on, before training or the stream fill it.
    """
    created = []
    for table in TABLES:
        root = table_path(settings, table)
        if root.exists() and any(root.rglob("*.parquet")):
            continue
        folder = root / f"{SNAPSHOT_DATE}=1970-01-01" if table in PARTITIONED else root
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table_schema(table).empty_table(), folder / "part-00000-empty.parquet",
                       coerce_timestamps="us")
        created.append(root)
    return created
