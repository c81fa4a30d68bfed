"""The view writer: one view's rows packed as the HSET/EXPIRE commands Feast's Redis store sends.

Keys, field hashes, ``_ts`` and values come from :mod:`pipelines.feast_redis`; this module packs
them as RESP in chunks and sends each chunk on one pooled connection. ``skip_dedup`` is honoured
exactly as ``RedisOnlineStore.online_write_batch`` does: without it, one pipelined
``HMGET _ts:<view>`` per chunk first, and a row whose event time is not newer than the stored one
is skipped (no HSET, no EXPIRE).
"""

from __future__ import annotations

from itertools import chain, repeat
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from feast import FeatureView

from pipelines.feast_redis.layout import (
    INT64_ID_DTYPE,
    feature_field,
    int64_key_prefix,
    online_store_client,
    stored_view_name,
    timestamp_field,
)
from pipelines.feast_redis.wire import feast_timestamp, stored_event_nanos, timestamp_nanos
from pipelines.materialize.encoders import bulk, encode_column

if TYPE_CHECKING:
    from feast.infra.online_stores.redis import RedisOnlineStore


class ViewWriter:
    """Packs and sends one view's rows as RedisOnlineStore.online_write_batch would write them."""

    def __init__(self, config: Any, view: FeatureView, online_store: RedisOnlineStore) -> None:
        store_config = config.online_store
        self.client = online_store_client(online_store, store_config)
        self.skip_dedup = bool(store_config.skip_dedup)
        self.ttl = store_config.key_ttl_seconds
        name = stored_view_name(view, config)
        entity = view.entity_columns[0]
        self.join_key = entity.name
        self.timestamp_field = view.batch_source.timestamp_field
        self.features = [(f.name, f.dtype.to_value_type()) for f in view.features]
        prefix = int64_key_prefix(entity.name, config.entity_key_serialization_version)
        self.prefix = np.frombuffer(prefix, dtype=np.uint8)
        self.project = np.frombuffer(config.project.encode(), dtype=np.uint8)
        self.ts_field = bulk(timestamp_field(name))
        self.fields = [bulk(feature_field(name, feature)) for feature, _ in self.features]
        self.hset_head = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (1 + len(self.features)))
        self.expire_tail = (b"*3\r\n$6\r\nEXPIRE\r\n", bulk(str(self.ttl).encode())) if self.ttl else None
        self.hmget_head = b"*3\r\n$5\r\nHMGET\r\n"

    def _keys(self, ids: np.ndarray) -> list[bytes]:
        """RESP bulk strings of ``prefix + <q id> + project``, built as one fixed-width block."""
        id_size = INT64_ID_DTYPE.itemsize
        n, width = len(ids), len(self.prefix) + id_size + len(self.project)
        head = b"$%d\r\n" % width
        total = len(head) + width + 2
        block = np.empty((n, total), dtype=np.uint8)
        pos = 0
        for part in (np.frombuffer(head, dtype=np.uint8), self.prefix):
            block[:, pos:pos + len(part)] = part
            pos += len(part)
        block[:, pos:pos + id_size] = ids.astype(INT64_ID_DTYPE).view(np.uint8).reshape(n, id_size)
        pos += id_size
        block[:, pos:pos + len(self.project)] = self.project
        block[:, -2:] = np.frombuffer(b"\r\n", dtype=np.uint8)
        return block.view(f"S{total}").reshape(n).tolist()  # ends in \n: no NUL stripping

    def _timestamps(self, column: pa.ChunkedArray) -> tuple[list[bytes], np.ndarray]:
        """Per row: the ``_ts`` bulk string and the event time in nanoseconds (Feast's comparison)."""
        values = column.to_numpy()
        if column.null_count:
            raise ValueError(f"null {self.timestamp_field} values cannot be materialized")
        uniques, inverse = np.unique(values, return_inverse=True)
        stamps = [feast_timestamp(v) for v in uniques]
        encoded = np.empty(len(stamps), dtype=object)
        encoded[:] = [bulk(ts.SerializeToString()) for ts in stamps]
        nanos = np.array([timestamp_nanos(ts) for ts in stamps], dtype=object)
        inverse = inverse.reshape(-1)
        return encoded[inverse].tolist(), nanos[inverse]

    def pack(self, chunk: pa.Table) -> tuple[bytes, int, int]:
        """(packed HSET [+ EXPIRE] commands, number of commands, rows written) for one chunk."""
        ids_col = chunk.column(self.join_key)
        if ids_col.null_count or not pa.types.is_integer(ids_col.type):
            raise ValueError(f"{self.join_key} must be non-null integers to build entity keys")
        keys = self._keys(ids_col.to_numpy())
        stamps, nanos = self._timestamps(chunk.column(self.timestamp_field))
        if not self.skip_dedup:
            rows = self._newer_rows(keys, nanos)
            if len(rows) == 0:
                return b"", 0, 0
            if len(rows) < chunk.num_rows:
                chunk = chunk.take(pa.array(rows))
                keys = [keys[i] for i in rows]
                stamps = [stamps[i] for i in rows]
        columns = [encode_column(chunk.column(name).combine_chunks(), value_type)
                   for name, value_type in self.features]
        n = chunk.num_rows
        parts: list[Any] = [repeat(self.hset_head, n), keys, repeat(self.ts_field, n), stamps]
        for field, values in zip(self.fields, columns):
            parts += [repeat(field, n), values]
        commands = n
        if self.expire_tail:
            head, ttl = self.expire_tail
            parts += [repeat(head, n), keys, repeat(ttl, n)]
            commands += n
        return b"".join(chain.from_iterable(zip(*parts))), commands, n

    def start(self, packed: bytes, n_replies: int) -> InFlight:
        """Send ``packed`` on a pooled connection; the replies are read by ``finish``."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        in_flight = InFlight(pool, conn, n_replies)
        try:
            conn.send_packed_command([packed], check_health=False)
        except BaseException:
            in_flight.abort()
            raise
        return in_flight

    def _newer_rows(self, keys: list[bytes], nanos: np.ndarray) -> np.ndarray:
        """Feast's check: skip a row whose event time is not newer than the stored ``_ts``."""
        replies = self._send(b"".join(chain.from_iterable(
            zip(repeat(self.hmget_head), keys, repeat(self.ts_field)))), len(keys))
        keep = []
        for i, (reply, new) in enumerate(zip(replies, nanos.tolist())):
            stored = reply[0]
            if stored:
                prev_nanos = stored_event_nanos(stored)
                if prev_nanos and new <= prev_nanos:
                    continue
            keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def _send(self, packed: bytes, n_replies: int) -> list[Any]:
        """One pipelined round trip."""
        return self.start(packed, n_replies).finish_with_replies()


class InFlight:
    """Commands sent on a connection whose replies are still unread."""

    def __init__(self, pool: Any, conn: Any, n_replies: int) -> None:
        self.pool, self.conn, self.n_replies = pool, conn, n_replies

    def finish_with_replies(self) -> list[Any]:
        try:
            replies = [self.conn.read_response() for _ in range(self.n_replies)]
        except BaseException:
            self.abort()  # unread replies must not reach the next user of this connection
            raise
        conn, self.conn = self.conn, None
        self.pool.release(conn)
        return replies

    def finish(self) -> None:
        self.finish_with_replies()
        return None

    def abort(self) -> None:
        """Drop the connection (its unread replies with it); safe to call more than once."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.disconnect()
            self.pool.release(conn)


__all__ = ["InFlight", "ViewWriter"]
