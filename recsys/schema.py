"""The canonical tables: column names, event types and Arrow schemas, in one place.

Every room (pipelines, models, bentos, feature_repo) takes its column names from here.
Timestamps are microsecond UTC: Spark 4 refuses pandas' default nanosecond parquet timestamps.
"""

from __future__ import annotations

from enum import Enum

import pyarrow as pa

#: The clickstream wire format's version (the ``schema_version`` of every message on the events topic).
#: Optional fields are added without a bump: a message without them reads as before.
SCHEMA_VERSION = 1
#: The canonical tables' version, recorded in a dataset's manifest. 1: the first tables; 2: the
#: events table gains the nullable attribution columns ``request_id`` and ``position``. A version-1
#: dataset (or a part written before the bump) lacks them: readers take them as null (read with
#: :data:`EVENTS_SCHEMA` in pyarrow, :data:`EVENTS_SPARK_DDL` in Spark) and nothing else changes.
TABLES_VERSION = 2

# ---- column names ---------------------------------------------------------------------------
COL_EVENT_ID = "event_id"
COL_USER = "user_id"
COL_ITEM = "item_id"
COL_EVENT_TYPE = "event_type"
COL_VALUE = "value"
COL_TS = "event_timestamp"
COL_SESSION = "session_id"
COL_CONTEXT = "context"
COL_CATEGORY = "category_id"
COL_CREATED_AT = "created_at"
#: attribution of an event to a ``/recommend`` answer: the answer's id and the 1-based position of
#: the item in it (null when the client sent none, and for generated and loaded events)
COL_REQUEST_ID = "request_id"
COL_POSITION = "position"
ATTRIBUTION_COLUMNS: tuple[str, ...] = (COL_REQUEST_ID, COL_POSITION)


class EventType(str, Enum):
    """Interaction kinds, weakest to strongest signal. RATING carries the rating in ``value``."""

    VIEW = "VIEW"
    CLICK = "CLICK"
    ADD_TO_CART = "ADD_TO_CART"
    PURCHASE = "PURCHASE"
    RATING = "RATING"


EVENT_TYPES: tuple[str, ...] = tuple(e.value for e in EventType)
CLICKSTREAM_TYPES: tuple[str, ...] = ("VIEW", "CLICK", "ADD_TO_CART", "PURCHASE")

TS_TYPE = pa.timestamp("us", tz="UTC")

CONTEXT_TYPE = pa.struct(
    [
        pa.field("device", pa.string()),
        pa.field("location", pa.string()),
        pa.field("referrer", pa.string()),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field(COL_EVENT_ID, pa.string(), nullable=False),
        pa.field(COL_USER, pa.int64(), nullable=False),
        pa.field(COL_ITEM, pa.int64(), nullable=False),
        pa.field(COL_EVENT_TYPE, pa.string(), nullable=False),
        pa.field(COL_VALUE, pa.float64()),
        pa.field(COL_TS, TS_TYPE, nullable=False),
        pa.field(COL_SESSION, pa.string()),
        pa.field(COL_CONTEXT, CONTEXT_TYPE),
        pa.field(COL_REQUEST_ID, pa.string()),
        pa.field(COL_POSITION, pa.int64()),
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field(COL_ITEM, pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field(COL_CATEGORY, pa.int64(), nullable=False),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("price", pa.float64()),
        pa.field("margin", pa.float64()),
        pa.field("quality_score", pa.float64()),
        pa.field("inventory", pa.int64()),
        pa.field(COL_CREATED_AT, TS_TYPE, nullable=False),
        pa.field("image_url", pa.string()),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field(COL_USER, pa.int64(), nullable=False),
        pa.field("age", pa.int64()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("zip_code", pa.string()),
        pa.field(COL_CREATED_AT, TS_TYPE, nullable=False),
    ]
)

#: Rows that failed validation, kept with the reason (never dropped silently).
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
    ]
)

_SPARK_TYPES = {pa.string(): "string", pa.int64(): "bigint", pa.float64(): "double", TS_TYPE: "timestamp"}


def spark_ddl(schema: pa.Schema | pa.StructType) -> str:
    """A Spark DDL schema string for an Arrow schema of these tables (string, int64, float64, UTC
    microsecond timestamps, structs and lists of them), for ``spark.read.schema(...)``: a column a
    file lacks then reads as null instead of depending on which file Spark infers the schema from."""
    return ", ".join(f"{f.name} {_spark_type(f.type)}" for f in schema)


def _spark_type(dtype: pa.DataType) -> str:
    if isinstance(dtype, pa.StructType):
        return "struct<" + ", ".join(f"{f.name}:{_spark_type(f.type)}" for f in dtype) + ">"
    if isinstance(dtype, pa.ListType):
        return f"array<{_spark_type(dtype.value_type)}>"
    if dtype not in _SPARK_TYPES:
        raise TypeError(f"no Spark type for Arrow {dtype}: add it to recsys.schema._SPARK_TYPES")
    return _SPARK_TYPES[dtype]


#: the events table as Spark reads it: every column, the attribution ones null where a part lacks them
EVENTS_SPARK_DDL = spark_ddl(EVENTS_SCHEMA)

#: Categories that MovieLens genres map to, in u.genre order (index = category_id).
ML_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

#: Neutral values for item fields a dataset lacks (MovieLens has no price or stock). Chosen so no
#: business rule fires on them: margin 0 is not "over 0.3" (no boost), quality 3.0 is not
#: "under 3.0" (no penalty), inventory is large (never out of stock), price 0 means "not priced".
NEUTRAL_PRICE = 0.0
NEUTRAL_MARGIN = 0.0
NEUTRAL_QUALITY = 3.0
NEUTRAL_INVENTORY = 1_000_000


def recs_cache_key(user_id: int) -> str:
    """Redis key of a user's cached recommendations: written by serving, deleted by the stream."""
    return f"recs:{int(user_id)}"


def purchased_key(user_id: int) -> str:
    """Redis set of the items a user bought (their ids as decimal strings, at most
    ``stream_purchased_max`` of the latest purchases): written by the stream and the backfill's
    ``--seed-state`` from the user's fold state, read by serving, which never recommends them."""
    return f"purchased:{int(user_id)}"
