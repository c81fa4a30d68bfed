"""The one adapter to Feast's Redis format: its private helpers and its byte layout, for one Feast version.

The platform writes and reads Feast's Redis online store itself (the batch engine, the stream's
writer, the serving reader) because Feast's generic paths convert value by value. Every private
Feast name those paths need and every byte of the layout live in this package, and only here: a
Feast upgrade is checked in one place. Importing it checks the installed Feast version first and
refuses any other than :data:`SUPPORTED_FEAST_VERSION`; the byte-parity tests (Feast's own writer
and reader against ours) are what make a new version supported.
"""

from __future__ import annotations

import importlib.metadata

SUPPORTED_FEAST_VERSION = "0.67.0"
PARITY_TESTS = ("tests/feature_repo/test_materialize_engine.py", "tests/feature_repo/test_online_decoding.py",
                "tests/feature_repo/test_feature_store.py", "tests/pipelines/test_stream.py")


class UnsupportedFeastVersion(ImportError):
    """The installed Feast is not the version whose Redis layout this package was checked against."""


def check_feast_version(installed: str | None = None) -> None:
    """Raise :class:`UnsupportedFeastVersion` unless ``installed`` (default: the installed Feast)
    is :data:`SUPPORTED_FEAST_VERSION`."""
    installed = installed if installed is not None else importlib.metadata.version("feast")
    if installed != SUPPORTED_FEAST_VERSION:
        raise UnsupportedFeastVersion(
            f"feast {installed} is installed, but pipelines.feast_redis supports feast=={SUPPORTED_FEAST_VERSION} "
            "only: it writes and reads Feast's Redis layout through Feast internals that change between releases. "
            f"Pin feast=={SUPPORTED_FEAST_VERSION}, or re-run the byte-parity tests ({', '.join(PARITY_TESTS)}) "
            "against the new version and update pipelines/feast_redis/ (SUPPORTED_FEAST_VERSION with it).")


# Before anything below imports a private Feast name: a missing one would hide the clear message.
check_feast_version()

from pipelines.feast_redis.compute import FeastLocalEngine  # noqa: E402
from pipelines.feast_redis.layout import (  # noqa: E402
    INT64_ID,
    INT64_ID_DTYPE,
    feast_redis_key,
    feature_field,
    int64_key_function,
    int64_key_prefix,
    online_store_client,
    plain_redis_refusal,
    store_provider,
    stored_view_name,
    timestamp_field,
)
from pipelines.feast_redis.wire import (  # noqa: E402
    NULL_TIMESTAMP,
    NULL_VALUE,
    TAG_DOUBLE,
    TAG_FLOAT,
    TAG_FLOAT_LIST,
    TAG_INT32,
    TAG_INT64,
    TAG_INT64_LIST,
    TAG_LIST_VAL,
    TAG_STRING,
    TAG_STRING_LIST,
    TAG_UNIX_TIMESTAMP,
    decode_value,
    event_time_us,
    feast_timestamp,
    int64_list_value,
    int64_value,
    stored_event_nanos,
    timestamp_nanos,
    unix_timestamp_value,
    value_tag,
    varint,
)

__all__ = [
    "FeastLocalEngine", "INT64_ID", "INT64_ID_DTYPE", "NULL_TIMESTAMP", "NULL_VALUE", "PARITY_TESTS",
    "SUPPORTED_FEAST_VERSION", "TAG_DOUBLE", "TAG_FLOAT", "TAG_FLOAT_LIST", "TAG_INT32", "TAG_INT64",
    "TAG_INT64_LIST", "TAG_LIST_VAL", "TAG_STRING", "TAG_STRING_LIST", "TAG_UNIX_TIMESTAMP",
    "UnsupportedFeastVersion", "check_feast_version", "decode_value", "event_time_us", "feast_redis_key",
    "feast_timestamp", "feature_field", "int64_key_function", "int64_key_prefix", "int64_list_value",
    "int64_value", "online_store_client", "plain_redis_refusal", "store_provider", "stored_event_nanos",
    "stored_view_name", "timestamp_field", "timestamp_nanos", "unix_timestamp_value", "value_tag", "varint",
]
