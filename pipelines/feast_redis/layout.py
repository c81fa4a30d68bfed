"""Where Feast's Redis store puts a row: entity keys, field hashes, the ``_ts:`` field, its client.

One hash per entity key (``serialize_entity_key(key) + project``) whose fields are
``mmh3("<view>:<feature>")`` -> a serialized ``feast.types.Value`` and ``_ts:<view>`` -> the row's
event time (see :mod:`pipelines.feast_redis.wire` for the bytes), ``<view>`` being the view's
versioned name.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from feast.infra.key_encoding_utils import serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore, RedisType, _versioned_fv_name
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.protos.feast.types.Value_pb2 import ValueType

if TYPE_CHECKING:
    import redis
    from feast import FeatureStore
    from feast.infra.provider import Provider
    from feast.repo_config import RepoConfig

#: An int64 entity id inside the key: 8 little-endian bytes.
INT64_ID = struct.Struct("<q")
#: The same layout as a NumPy dtype, for building many keys at once.
INT64_ID_DTYPE = np.dtype("<i8")
_INT64_HEADER = struct.pack("<II", ValueType.INT64, INT64_ID.size)
_CHECK_IDS = (0, 1, 42, 2**40 + 7, -3)  # zero, small, large and negative ids


def stored_view_name(view: Any, config: RepoConfig) -> str:
    """The name Feast's Redis store hashes for ``view`` (versioned when the registry says so)."""
    return _versioned_fv_name(view, config)


def feature_field(view_name: str, feature: str) -> bytes:
    """The hash field of one feature: ``mmh3("<view>:<feature>")`` as Feast computes it."""
    return _mmh3(f"{view_name}:{feature}")


def timestamp_field(view_name: str) -> bytes:
    """The hash field holding a view's event time."""
    return f"_ts:{view_name}".encode()


def int64_key_prefix(join_key: str, serialization_version: int = 3) -> bytes:
    """Feast's Redis key of an int64 entity up to its id: the key is ``prefix + <q id> + project``."""
    return serialize_entity_key_prefix([join_key], serialization_version) + _INT64_HEADER


def feast_redis_key(project: str, join_key: str, entity_id: int, serialization_version: int = 3) -> bytes:
    """The Redis key Feast itself builds for one int64 entity (the reference for the fast layout)."""
    key = EntityKey(join_keys=[join_key], entity_values=[ValueProto(int64_val=entity_id)])
    return _redis_key(project, key, entity_key_serialization_version=serialization_version)


def int64_key_function(join_key: str, project: str, serialization_version: int = 3) -> Callable[[int], bytes]:
    """entity id -> Feast's Redis key: ``prefix + <q id> + project`` when that layout equals Feast's
    own ``_redis_key`` for a few ids (zero, large, negative), else Feast's function on every call."""
    head = int64_key_prefix(join_key, serialization_version)
    tail = project.encode()
    pack = INT64_ID.pack
    if all(feast_redis_key(project, join_key, i, serialization_version) == head + pack(i) + tail for i in _CHECK_IDS):
        return lambda entity_id: head + pack(entity_id) + tail
    return lambda entity_id: feast_redis_key(project, join_key, entity_id, serialization_version)


def plain_redis_refusal(online_store: Any, config: RepoConfig) -> str | None:
    """Why rows cannot be written in this module's layout on one connection, or None if they can."""
    if not isinstance(online_store, RedisOnlineStore) or config.online_store.redis_type != RedisType.redis:
        return "online store is not a single Redis server"
    if config.entity_key_serialization_version != 3:
        return "entity key serialization other than v3"
    return None


def online_store_client(online_store: RedisOnlineStore, store_config: Any) -> redis.Redis:
    """The Redis client Feast's online store itself writes with (its connection pool)."""
    return online_store._get_client(store_config)


def store_provider(store: FeatureStore) -> Provider:
    """The store's provider: its batch engine and its own ``online_write_batch``."""
    return store._get_provider()
