"""The user_realtime rows of the stream and their writer into Feast's online store (Redis)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import redis

from pipelines.realtime_rules import UserState
from recsys import feature_tables as T
from recsys import schema as S

if TYPE_CHECKING:
    from feast import FeatureStore

#: A row of user_realtime as it travels through the outbox:
#: (user_id, last_us, last_5_items, interaction_count, total_purchases, preferred_categories, created_us)
Row = tuple[int, int, list[int], int, int, list[int], int]


def state_row(user_id: int, state: UserState, created_us: int) -> Row:
    return (user_id, state.last_us, state.last_5_items, state.count, state.purchases,
            state.preferred_categories, created_us)


def rows_frame(rows: Sequence[Row]) -> pd.DataFrame:
    """Outbox rows as the user_realtime push frame (event_timestamp = last_action_ts)."""
    cols: list[Sequence[Any]] = list(zip(*rows)) if rows else [() for _ in range(7)]
    last = pd.to_datetime(np.asarray(cols[1], dtype=np.int64), unit="us", utc=True)
    return pd.DataFrame({
        S.COL_USER: np.asarray(cols[0], dtype=np.int64),
        S.COL_TS: last,
        T.CREATED: pd.to_datetime(np.asarray(cols[6], dtype=np.int64), unit="us", utc=True),
        "last_5_items": list(cols[2]),
        "last_action_ts": last,
        "interaction_count": np.asarray(cols[3], dtype=np.int64),
        "total_purchases": np.asarray(cols[4], dtype=np.int64),
        "preferred_categories": list(cols[5]),
    })


class OnlineRowWriter:
    """Writes user_realtime rows into the online store exactly as Feast's Redis store does, on the
    stream's own Redis transaction.

    Feast's Redis layout for a row (``RedisOnlineStore.online_write_batch``; keys, fields and value
    bytes from :mod:`pipelines.feast_redis`): one hash per entity key, one field per feature -> the
    serialized ``Value`` and ``_ts:{view}`` -> the event time, then ``EXPIRE`` when the store has a
    key TTL. :meth:`queue` puts those commands on the consumer's state transaction, so the online
    rows, the fold states, the outbox and the applied offsets change together, in one round trip.
    The key layout is checked against Feast's own key function for a few ids at start; the values
    are the protos ``push`` builds for these types (the tests read them back with
    ``get_online_features``). ``FeatureStore.push`` converts a DataFrame through Arrow and re-reads
    the registry on every call, and Feast's writer builds its keys and protos through slower generic
    paths: at micro-batch sizes those dominated the consumer's time.

    Where the online store is not a plain Redis (a cluster or sentinel), :meth:`write` falls back to
    Feast's own ``online_write_batch`` (``get_store(skip_dedup=True)``: one round trip, no dropped
    same-instant write) before the state transaction.
    """

    def __init__(self, store: FeatureStore) -> None:
        from pipelines.feast_redis.layout import (
            feature_field,
            int64_key_function,
            store_provider,
            stored_view_name,
            timestamp_field,
        )
        from pipelines.realtime_rules import FEATURES

        self.store = store
        self.view = store.get_feature_view(T.USER_REALTIME)
        self.provider = store_provider(store)  # the store's own online writer (fallback)
        config = store.config
        online = config.online_store
        # the stream's Redis is the online store's (both come from REDIS_URL), unless Feast is told
        # to use a cluster or sentinel: then Feast writes, in its own round trip
        self.in_transaction = online.type == "redis" and online.redis_type == "redis"
        self.ttl_s = getattr(online, "key_ttl_seconds", None)
        name = stored_view_name(self.view, config)
        self.ts_field = timestamp_field(name)
        self.fields = [feature_field(name, feature) for feature in FEATURES]
        # Feast's key layout when it matches Feast's own key function, else Feast's function per call
        self.key: Callable[[int], bytes] = int64_key_function(
            S.COL_USER, config.project, config.entity_key_serialization_version)

    def mappings(self, rows: Sequence[Row]) -> list[tuple[bytes, list[bytes]]]:
        """Each row's Redis key and its hash fields and values (flat), as Feast's Redis store writes them."""
        from pipelines.feast_redis.wire import event_time_us, int64_list_value, int64_value, unix_timestamp_value

        f_items, f_last, f_count, f_purchases, f_cats = self.fields
        ts_field, key = self.ts_field, self.key
        out = []
        for user, last_us, items, count, purchases, cats, _ in rows:
            out.append((key(user), [
                ts_field, event_time_us(last_us),
                f_items, int64_list_value(items),
                f_last, unix_timestamp_value(last_us // 1_000_000),  # Feast keeps whole seconds
                f_count, int64_value(count),
                f_purchases, int64_value(purchases),
                f_cats, int64_list_value(cats),
            ]))
        return out

    def queue(self, pipe: redis.client.Pipeline, mappings: list[tuple[bytes, list[bytes]]]) -> None:
        """Queue the rows' online writes (from :meth:`mappings`) on ``pipe``, the state transaction."""
        ttl = self.ttl_s
        queue = pipe.execute_command
        for key, fields in mappings:
            queue("HSET", key, *fields)
            if ttl:
                queue("EXPIRE", key, ttl)

    def write(self, rows: Sequence[Row]) -> None:
        """Write the rows with Feast's own online writer (its own round trip)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Int64List, Value

        from pipelines.realtime_rules import from_us

        data: list[tuple[EntityKey, dict[str, Value], datetime, datetime | None]] = []
        for user, last_us, items, count, purchases, cats, created_us in rows:
            key = EntityKey(join_keys=[S.COL_USER], entity_values=[Value(int64_val=user)])
            values = {
                "last_5_items": Value(int64_list_val=Int64List(val=items)),
                "last_action_ts": Value(unix_timestamp_val=last_us // 1_000_000),  # Feast keeps whole seconds
                "interaction_count": Value(int64_val=count),
                "total_purchases": Value(int64_val=purchases),
                "preferred_categories": Value(int64_list_val=Int64List(val=cats)),
            }
            data.append((key, values, from_us(last_us), from_us(created_us)))
        self.provider.online_write_batch(self.store.config, self.view, data, None)
