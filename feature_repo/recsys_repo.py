"""Feast declarations for the recommendation platform, read top-down:
entities -> sources -> feature views -> feature services.

Declarations only: nothing here computes. Table paths come from the project's settings (the
environment and ``recsys.yaml``), so the same file serves the demo, a test workspace and a
cluster. The view names are the public contract for notebooks and the service.

TTL, as it works here (Feast issue #6821 and its Redis store):
- a view's ``ttl`` bounds how old a value a *training frame* (point-in-time join) may use: a user
  profile expires 2 days after the user's last active day; the sparse item profile gets a row on
  each change and at least every 30 days (a heartbeat), so its 30-day TTL only fires when the
  batch job stops; real-time state and embeddings stay valid until replaced (ttl 0 = no limit);
- *online* reads ignore view TTLs. Redis expiry (``RECSYS_ONLINE_KEY_TTL_SECONDS``) is per entity
  key: when it fires, every view of that user (or item) disappears at once. It is off by default,
  because a user's features must not vanish while their cached recommendations still exist.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, KafkaSource, PushSource
from feast.data_format import JsonFormat
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import load_settings

_settings = load_settings()


def _path(table: str) -> str:
    return str(T.table_path(_settings, table))


# ---- entities ---------------------------------------------------------------------------------

user = Entity(name="user", join_keys=[S.COL_USER], value_type=ValueType.INT64, description="A shopper.")
item = Entity(name="item", join_keys=[S.COL_ITEM], value_type=ValueType.INT64, description="A catalogue item.")

# ---- sources ----------------------------------------------------------------------------------

user_profile_source = SparkSource(
    name="user_profile_source",
    path=_path(T.USER_PROFILE),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    created_timestamp_column=T.CREATED,
    date_partition_column=T.SNAPSHOT_DATE,
    description="Daily snapshots of each active user's history (pipelines.batch_features).",
)
item_profile_source = SparkSource(
    name="item_profile_source",
    path=_path(T.ITEM_PROFILE),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    created_timestamp_column=T.CREATED,
    date_partition_column=T.SNAPSHOT_DATE,
    description="Daily snapshots of item attributes and popularity (pipelines.batch_features).",
)
user_realtime_log_source = SparkSource(
    name="user_realtime_log_source",
    path=_path(T.USER_REALTIME),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    created_timestamp_column=T.CREATED,
    description="Every real-time state the stream pushed, plus the backfill: what serving saw.",
)
user_realtime_push = PushSource(
    name="user_realtime_push",
    batch_source=user_realtime_log_source,
    description="Real-time user features pushed by the clickstream consumer.",
)
user_embedding_source = SparkSource(
    name="user_embedding_source",
    path=_path(T.USER_EMBEDDING),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    created_timestamp_column=T.CREATED,
    field_mapping={"embedding": "user_embedding"},  # unique feature names across views
    description="ALS user factors, stamped at the training cutoff.",
)
item_embedding_source = SparkSource(
    name="item_embedding_source",
    path=_path(T.ITEM_EMBEDDING),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    created_timestamp_column=T.CREATED,
    field_mapping={"embedding": "item_embedding"},  # unique feature names across views
    description="ALS item factors, stamped at the training cutoff.",
)
clickstream_events_batch = SparkSource(
    name="clickstream_events_batch",
    path=str(_settings.dataset_path / "events"),
    file_format="parquet",
    timestamp_field=S.COL_TS,
    description="The canonical event log (what the topic carries, at rest).",
)
clickstream_events = KafkaSource(
    name="clickstream_events",
    kafka_bootstrap_servers=_settings.effective_kafka_bootstrap,
    topic=_settings.events_topic,
    timestamp_field=S.COL_TS,
    batch_source=clickstream_events_batch,
    message_format=JsonFormat(
        schema_json=(
            "schema_version int, event_id string, user_id bigint, item_id bigint, event_type string, "
            "value double, event_timestamp timestamp, session_id string, "
            "context struct<device:string, location:string, referrer:string>"
        )
    ),
    description="Clickstream topic, key = user_id, JSON value; consumed by `recsys stream run`.",
)

# ---- feature views ----------------------------------------------------------------------------

user_profile_fv = FeatureView(
    name=T.USER_PROFILE,
    entities=[user],
    ttl=timedelta(days=T.USER_PROFILE_TTL_DAYS),
    schema=[
        Field(name="n_events", dtype=Int64),
        Field(name="n_views", dtype=Int64),
        Field(name="n_clicks", dtype=Int64),
        Field(name="n_carts", dtype=Int64),
        Field(name="n_purchases", dtype=Int64),
        Field(name="n_ratings", dtype=Int64),
        Field(name="mean_rating", dtype=Float64),
        Field(name="n_events_7d", dtype=Int64),
        Field(name="days_since_first_seen", dtype=Float64),
        Field(name="top_categories", dtype=Array(Int64)),
    ],
    source=user_profile_source,
    online=True,
)
user_realtime_fv = FeatureView(
    name=T.USER_REALTIME,
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="last_5_items", dtype=Array(Int64)),
        Field(name="last_action_ts", dtype=UnixTimestamp),
        Field(name="interaction_count", dtype=Int64),
        Field(name="total_purchases", dtype=Int64),
        Field(name="preferred_categories", dtype=Array(Int64)),
    ],
    source=user_realtime_push,
    online=True,
)
user_embedding_fv = FeatureView(
    name=T.USER_EMBEDDING,
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name="user_embedding", dtype=Array(Float32))],
    source=user_embedding_source,
    online=True,
)
item_embedding_fv = FeatureView(
    name=T.ITEM_EMBEDDING,
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name="item_embedding", dtype=Array(Float32))],
    source=item_embedding_source,
    online=True,
)
item_profile_fv = FeatureView(
    name=T.ITEM_PROFILE,
    entities=[item],
    ttl=timedelta(days=T.ITEM_PROFILE_TTL_DAYS),
    schema=[
        Field(name=S.COL_CATEGORY, dtype=Int64),
        Field(name="tags", dtype=Array(String)),
        Field(name="price", dtype=Float64),
        Field(name="margin", dtype=Float64),
        Field(name="quality_score", dtype=Float64),
        Field(name="inventory", dtype=Int64),
        Field(name="popularity_1d", dtype=Int64),
        Field(name="popularity_7d", dtype=Int64),
        Field(name=S.COL_CREATED_AT, dtype=UnixTimestamp),
        Field(name="title", dtype=String),
        Field(name="image_url", dtype=String),
    ],
    source=item_profile_source,
    online=True,
)

# ---- feature services (one per model, versioned) ----------------------------------------------

ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[user_profile_fv, user_realtime_fv, user_embedding_fv, item_profile_fv, item_embedding_fv],
    description="The TensorFlow ranker's input set: every view, for a user x candidate item.",
)
retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[user_embedding_fv, user_realtime_fv[["last_5_items", "preferred_categories"]]],
    description="What candidate generation needs for a user.",
)
two_tower_v1 = FeatureService(
    name="two_tower_v1",
    features=[
        # models.two_tower.features: USER_COLUMNS and ITEM_COLUMNS less the join keys, exactly
        # (tests/models/test_two_tower_job.py checks the two lists agree)
        user_profile_fv[["n_events", "n_events_7d", "mean_rating", "days_since_first_seen", "top_categories"]],
        user_realtime_fv[["last_5_items", "interaction_count", "total_purchases", "preferred_categories"]],
        item_profile_fv[[S.COL_CATEGORY, "tags", "title", "price", S.COL_CREATED_AT]],
    ],
    description="The two-tower retrieval model's inputs: the user tower's and the item tower's columns.",
)
