"""A Feast batch engine that materializes the batch-only views into Redis column-wise.

Named in ``feature_store.yaml`` (``batch_engine: {type: pipelines.materialize_engine.ColumnarRedisEngine}``),
so ``FeatureStore.materialize`` *and* plain ``feast materialize`` / ``materialize-incremental`` use
it; Feast still records the materialization intervals in the registry after the engine returns.

Feast's own LocalComputeEngine spends most of a materialization in Python per value: a proto per
value (``pandas.isna`` and ``_is_array_like`` each time), ``mmh3`` of every field name and
``serialize_entity_key`` per row, then redis-py's pipeline per command. For the views listed in
``fast_views`` this engine reads the same rows through Feast's own source node (the offline
store's ``pull_all/pull_latest_from_table_or_query``, renamed by the field mapping) and keeps the
latest row per entity as Feast's dedup node does, then writes them as Feast's Redis store would:

- field names hashed once per view, entity keys as one fixed prefix + the packed int64 id;
- values serialized column by column into the exact ``feast.types.Value`` wire bytes: fixed-width
  types packed with NumPy, varints and strings once per distinct value, lists from Arrow's flat
  buffers; any column type without a fast path goes through Feast's own converter;
- ``_ts:<view>`` as the protobuf ``Timestamp`` Feast writes, ``EXPIRE key key_ttl_seconds`` after
  each write when the online store sets ``key_ttl_seconds``;
- ``skip_dedup`` honoured exactly as ``RedisOnlineStore.online_write_batch`` does: without it,
  one pipelined ``HMGET _ts:<view>`` per chunk first, and a row whose event time is not newer than
  the stored one is skipped (no HSET, no EXPIRE);
- packed RESP commands sent in chunks on one pooled connection, a progress bar per view.

The Redis content is byte-identical to Feast's (tests/feature_repo/test_materialize_engine.py).
Every other view (``user_realtime``, which the stream also writes), every view shape the fast path
does not cover (transformations, aggregations, several join keys, a non-Redis online store, ...)
goes through Feast's LocalComputeEngine unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from typing import Any, List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
from feast import FeatureView
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.compute_engines.utils import ENTITY_TS_ALIAS
from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import RedisOnlineStore, RedisType, _versioned_fv_name
from feast.infra.registry.base_registry import BaseRegistry
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import FeastConfigBaseModel
from feast.type_map import python_values_to_proto_values
from feast.types import Int64
from feast.utils import _coerce_datetime, _validate_vector_field_lengths, make_tzaware
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import StrictInt, StrictStr

from pipelines.online_features import int64_key_prefix

log = logging.getLogger(__name__)

ENGINE_TYPE = "pipelines.materialize_engine.ColumnarRedisEngine"

_I64 = np.dtype("<i8")
_MAX_EXACT_FLOAT_INT = 2**53  # Feast turns an int column with nulls into float64 first


class ColumnarRedisEngineConfig(FeastConfigBaseModel):
    """``batch_engine:`` block of feature_store.yaml for :class:`ColumnarRedisEngine`."""

    type: StrictStr = ENGINE_TYPE
    backend: Optional[StrictStr] = None
    """As LocalComputeEngine's: the DataFrame backend of the views Feast materializes itself."""
    fast_views: List[StrictStr] = []
    """Views written column-wise; every other view goes through Feast's LocalComputeEngine."""
    chunk_rows: StrictInt = 10_000
    """Rows per pipelined round trip (and per progress-bar step)."""


# ---- protobuf / RESP wire helpers ----------------------------------------------------------------


def _varint(value: int) -> bytes:
    """Protobuf varint of an int64 (negative numbers as their 64-bit two's complement)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: str) -> bytes:
    number = ValueProto.DESCRIPTOR.fields_by_name[field].number
    wire = 1 if field == "double_val" else 5 if field == "float_val" else \
        0 if field in ("int64_val", "int32_val", "unix_timestamp_val", "bool_val") else 2
    return _varint(number << 3 | wire)


def _bulk(payload: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


_NULL = _bulk(b"")  # ValueProto() serializes to b""
_TAG_INT64, _TAG_DOUBLE, _TAG_STRING, _TAG_TS = (_tag(f) for f in ("int64_val", "double_val", "string_val",
                                                                    "unix_timestamp_val"))
_TAG_INT64_LIST, _TAG_FLOAT_LIST, _TAG_STRING_LIST = (_tag(f) for f in ("int64_list_val", "float_list_val",
                                                                         "string_list_val"))
_TAG_REPEATED = b"\x0a"  # the `val` field (1, length-delimited) inside Int64List/FloatList/StringList

Encoded = List[bytes]  # one RESP bulk string per row


def _per_distinct(values: np.ndarray, encode: Callable[[Any], bytes]) -> list[bytes]:
    """``encode`` once per distinct value, then spread back over the rows."""
    if len(values) == 0:
        return []
    uniques, inverse = np.unique(values, return_inverse=True)
    table = np.empty(len(uniques), dtype=object)
    table[:] = [encode(v) for v in uniques.tolist()]
    return table[inverse.reshape(-1)].tolist()


def _flat_list(column: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets from 0 and the child values of exactly this (possibly sliced) list array."""
    offsets = column.offsets.to_numpy().astype(np.int64)  # absolute positions in column.values
    child = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], child


def _list_parts(column: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray] | None:
    """(offsets, flat child values, validity) of a list column whose child has no nulls."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return None
    offsets, child = _flat_list(column)
    if child.null_count:
        return None
    valid = ~np.asarray(column.is_null(), dtype=bool) if column.null_count else np.ones(len(column), dtype=bool)
    return offsets, child, valid


def _rows_from_elements(offsets: np.ndarray, valid: np.ndarray, elements: Sequence[bytes],
                        head: Callable[[int], bytes]) -> Encoded:
    """Per row: ``head(n_bytes) + the row's encoded elements + CRLF`` (RESP), null rows as nulls.

    The elements are joined once into one buffer; each row is then one slice of it.
    """
    flat = b"".join(elements)
    ends = np.zeros(len(elements) + 1, dtype=np.int64)
    if len(elements):
        np.cumsum(np.fromiter(map(len, elements), dtype=np.int64, count=len(elements)), out=ends[1:])
    starts, stops = ends[offsets[:-1]].tolist(), ends[offsets[1:]].tolist()
    heads: dict[int, bytes] = {}
    out: Encoded = []
    for ok, start, stop in zip(valid.tolist(), starts, stops):
        if not ok:
            out.append(_NULL)
            continue
        size = stop - start
        prefix = heads.get(size)
        if prefix is None:
            value_head = head(size)
            prefix = heads[size] = b"$%d\r\n%s" % (len(value_head) + size, value_head)
        out.append(prefix + flat[start:stop] + b"\r\n")
    return out


def _packed_list_head(tag: bytes) -> Callable[[int], bytes]:
    """Value head of a packed numeric list: ``tag len(inner)`` + inner's ``0a len(packed)`` (none if empty)."""
    def head(size: int) -> bytes:
        inner = _TAG_REPEATED + _varint(size) if size else b""
        return tag + _varint(len(inner) + size) + inner
    return head


def _string_list_head(size: int) -> bytes:
    """Value head of a StringList: its elements are each ``0a len utf8`` already."""
    return _TAG_STRING_LIST + _varint(size)


# ---- column encoders: the exact bytes Feast's type_map would produce, or None -----------------


def _encode_int64(column: pa.Array) -> Encoded | None:
    t = column.type
    if pa.types.is_integer(t) and t != pa.uint64():
        values = column.to_numpy(zero_copy_only=False)
        if column.null_count:  # Feast sees float64 with NaN: exact only below 2**53
            values = np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)
            if np.abs(values).max(initial=0) > _MAX_EXACT_FLOAT_INT:
                return None
    elif pa.types.is_float64(t):  # int(x) of a float: truncation; NaN is null
        raw = column.to_numpy(zero_copy_only=False)
        finite = np.isfinite(raw)
        if (~finite & ~np.isnan(raw)).any() or np.abs(raw[finite]).max(initial=0) > _MAX_EXACT_FLOAT_INT:
            return None
        values = np.where(finite, raw, 0).astype(np.int64)
        encoded = _per_distinct(values, lambda v: _bulk(_TAG_INT64 + _varint(v)))
        return [e if ok else _NULL for e, ok in zip(encoded, finite.tolist())]
    else:
        return None
    encoded = _per_distinct(values.astype(np.int64), lambda v: _bulk(_TAG_INT64 + _varint(v)))
    if column.null_count:
        nulls = np.asarray(column.is_null(), dtype=bool).tolist()
        encoded = [_NULL if null else e for e, null in zip(encoded, nulls)]
    return encoded


def _encode_double(column: pa.Array) -> Encoded | None:
    if not pa.types.is_float64(column.type):
        return None
    values = column.to_numpy(zero_copy_only=False)  # nulls -> NaN; Feast drops both (pd.isnull)
    n = len(values)
    buf = np.empty((n, 15), dtype=np.uint8)
    buf[:, :4] = np.frombuffer(b"$9\r\n", dtype=np.uint8)
    buf[:, 4] = _TAG_DOUBLE[0]
    buf[:, 5:13] = values.astype("<f8").view(np.uint8).reshape(n, 8)
    buf[:, 13:] = np.frombuffer(b"\r\n", dtype=np.uint8)
    encoded = buf.view("S15").reshape(n).tolist()  # ends in \n: no trailing NUL is stripped
    missing = np.isnan(values)
    if missing.any():
        encoded = [_NULL if m else e for e, m in zip(encoded, missing.tolist())]
    return encoded


def _binary_parts(column: pa.Array) -> tuple[np.ndarray, bytes] | None:
    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    else:
        return None
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(column.type) else np.int32)
    offsets = offsets[column.offset:column.offset + len(column) + 1].astype(np.int64)
    data = column.buffers()[2]
    if data is None or len(offsets) < 2:
        return offsets - offsets[0], b""
    return offsets - offsets[0], data.slice(offsets[0], offsets[-1] - offsets[0]).to_pybytes()


def _encode_string(column: pa.Array) -> Encoded | None:
    parts = _binary_parts(column)
    if parts is None:
        return None
    offsets, data = parts
    nulls = np.asarray(column.is_null(), dtype=bool).tolist() if column.null_count else repeat(False)
    out: Encoded = []
    for null, start, end in zip(nulls, offsets[:-1].tolist(), offsets[1:].tolist()):
        if null:
            out.append(_NULL)
        else:
            out.append(_bulk(_TAG_STRING + _varint(end - start) + data[start:end]))
    return out


def _encode_timestamp(column: pa.Array) -> Encoded | None:
    if not pa.types.is_timestamp(column.type):
        return None
    values = column.to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.datetime64):
        return None
    # Feast: np.datetime64 -> astype("datetime64[s]").astype(int); NaT gives NULL_TIMESTAMP_INT_VALUE
    seconds = values.astype("datetime64[s]").astype(np.int64)
    return _per_distinct(seconds, lambda v: _bulk(_TAG_TS + _varint(v)))


def _encode_int64_list(column: pa.Array) -> Encoded | None:
    parts = _list_parts(column)
    if parts is None or not pa.types.is_integer(parts[1].type) or parts[1].type == pa.uint64():
        return None
    offsets, child, valid = parts
    elements = _per_distinct(child.to_numpy().astype(np.int64), _varint)
    return _rows_from_elements(offsets, valid, elements, _packed_list_head(_TAG_INT64_LIST))


def _encode_float_list(column: pa.Array) -> Encoded | None:
    parts = _list_parts(column)
    if parts is None or not pa.types.is_float32(parts[1].type):
        return None
    offsets, child, valid = parts
    floats = child.to_numpy()
    if np.isnan(floats).any():  # a NaN's payload may not survive Feast's float round trip
        return None
    data = floats.astype("<f4").tobytes()
    out: Encoded = []
    headers: dict[int, bytes] = {}
    for ok, start, end in zip(valid.tolist(), offsets[:-1].tolist(), offsets[1:].tolist()):
        if not ok:
            out.append(_NULL)
            continue
        size = 4 * (end - start)
        head = headers.get(size)
        if head is None:
            inner_head = _TAG_REPEATED + _varint(size) if size else b""
            value_head = _TAG_FLOAT_LIST + _varint(len(inner_head) + size) + inner_head
            head = headers[size] = b"$%d\r\n%s" % (len(value_head) + size, value_head)
        out.append(head + data[4 * start:4 * end] + b"\r\n")
    return out


def _encode_string_list(column: pa.Array) -> Encoded | None:
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return None
    offsets, child = _flat_list(column)
    if not (pa.types.is_string(child.type) or pa.types.is_large_string(child.type)):
        return None
    valid = ~np.asarray(column.is_null(), dtype=bool) if column.null_count else np.ones(len(column), dtype=bool)
    # Feast replaces a null element by "" (type_map._LIST_NONE_DEFAULTS)
    encoded = child.fill_null("").dictionary_encode()
    words = [_TAG_REPEATED + _varint(len(w)) + w for w in (s.encode() for s in encoded.dictionary.to_pylist())]
    table = np.empty(len(words), dtype=object)
    table[:] = words
    elements = table[encoded.indices.to_numpy(zero_copy_only=False)].tolist() if len(child) else []
    return _rows_from_elements(offsets, valid, elements, _string_list_head)


_ENCODERS: dict[ValueType, Callable[[pa.Array], Encoded | None]] = {
    ValueType.INT64: _encode_int64,
    ValueType.DOUBLE: _encode_double,
    ValueType.STRING: _encode_string,
    ValueType.UNIX_TIMESTAMP: _encode_timestamp,
    ValueType.INT64_LIST: _encode_int64_list,
    ValueType.FLOAT_LIST: _encode_float_list,
    ValueType.STRING_LIST: _encode_string_list,
}


def encode_column(column: pa.Array, value_type: ValueType) -> Encoded:
    """Each row's serialized ``feast.types.Value`` as a RESP bulk string, as Feast would write it.

    A fast path per declared type; any other type (or an Arrow type the fast path does not
    cover) goes through Feast's own converter, value by value.
    """
    encoder = _ENCODERS.get(value_type)
    encoded = encoder(column) if encoder else None
    if encoded is not None:
        return encoded
    protos = python_values_to_proto_values(column.to_numpy(zero_copy_only=False), value_type)
    return [_bulk(p.SerializeToString()) for p in protos]


def feast_timestamp(value: Any) -> Timestamp:
    """The protobuf Timestamp Feast's Redis store writes for one event-time value."""
    ts = Timestamp()
    ts.FromDatetime(make_tzaware(_coerce_datetime(pd.to_datetime(value))))
    return ts


# ---- the engine ----------------------------------------------------------------------------------


class ColumnarRedisEngine(LocalComputeEngine):
    """LocalComputeEngine with a column-wise Redis writer for the views in ``fast_views``."""

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
        if not isinstance(self.online_store, RedisOnlineStore) or config.online_store.redis_type != RedisType.redis:
            return "online store is not a single Redis server"
        if config.entity_key_serialization_version != 3:
            return "entity key serialization other than v3"
        if len(feature_view.entity_columns) != 1 or feature_view.entity_columns[0].dtype != Int64:
            return "not a single Int64 join key"
        return None

    def _materialize_one(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
                         ) -> LocalMaterializationJob:
        reason = self.fast_path_refusal(task.feature_view)
        if reason is not None:
            log.debug("materializing %s with Feast's engine: %s", task.feature_view.name, reason)
            return super()._materialize_one(registry, task, **kwargs)
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        try:
            self._materialize_fast(registry, task)
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
        except Exception as e:  # noqa: BLE001 - Feast's contract: the job carries the error
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)

    # -- reading: the rows Feast's own plan would hand its output node

    def _read_rows(self, registry: BaseRegistry, task: MaterializationTask) -> pa.Table:
        context = self.get_execution_context(registry, task)
        builder = LocalFeatureBuilder(registry, task, backend=self._get_backend(context))
        view = task.feature_view
        table = builder.build_source_node(view).execute(context).data
        if ENTITY_TS_ALIAS in table.column_names:  # never for materialization; Feast's filter would apply
            raise RuntimeError(f"unexpected {ENTITY_TS_ALIAS} column materializing {view.name}")
        if builder._should_dedupe(view):
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
        _validate_vector_field_lengths(table, view)
        writer = _ViewWriter(self.repo_config, view, self.online_store)
        bar = task.tqdm_builder(n) if task.tqdm_builder else None
        written = 0
        in_flight: _InFlight | None = None  # chunk i is on the wire while chunk i+1 is packed
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


class _ViewWriter:
    """Packs and sends one view's rows as RedisOnlineStore.online_write_batch would write them."""

    def __init__(self, config: Any, view: FeatureView, online_store: RedisOnlineStore) -> None:
        store_config = config.online_store
        self.client = online_store._get_client(store_config)
        self.skip_dedup = bool(store_config.skip_dedup)
        self.ttl = store_config.key_ttl_seconds
        name = _versioned_fv_name(view, config)
        entity = view.entity_columns[0]
        self.join_key = entity.name
        self.timestamp_field = view.batch_source.timestamp_field
        self.features = [(f.name, f.dtype.to_value_type()) for f in view.features]
        prefix = int64_key_prefix(entity.name, config.entity_key_serialization_version)
        self.prefix = np.frombuffer(prefix, dtype=np.uint8)
        self.project = np.frombuffer(config.project.encode(), dtype=np.uint8)
        self.ts_field = _bulk(f"_ts:{name}".encode())
        self.fields = [_bulk(_mmh3(f"{name}:{feature}")) for feature, _ in self.features]
        self.hset_head = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (1 + len(self.features)))
        self.expire_tail = (b"*3\r\n$6\r\nEXPIRE\r\n", _bulk(str(self.ttl).encode())) if self.ttl else None
        self.hmget_head = b"*3\r\n$5\r\nHMGET\r\n"

    def _keys(self, ids: np.ndarray) -> list[bytes]:
        """RESP bulk strings of ``prefix + <q id> + project``, built as one fixed-width block."""
        n, width = len(ids), len(self.prefix) + 8 + len(self.project)
        head = b"$%d\r\n" % width
        total = len(head) + width + 2
        block = np.empty((n, total), dtype=np.uint8)
        pos = 0
        for part in (np.frombuffer(head, dtype=np.uint8), self.prefix):
            block[:, pos:pos + len(part)] = part
            pos += len(part)
        block[:, pos:pos + 8] = ids.astype(_I64).view(np.uint8).reshape(n, 8)
        pos += 8
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
        encoded[:] = [_bulk(ts.SerializeToString()) for ts in stamps]
        nanos = np.array([ts.seconds * 1_000_000_000 + ts.nanos for ts in stamps], dtype=object)
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

    def start(self, packed: bytes, n_replies: int) -> _InFlight:
        """Send ``packed`` on a pooled connection; the replies are read by ``finish``."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        in_flight = _InFlight(pool, conn, n_replies)
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
        parse = Timestamp.FromString
        for i, (reply, new) in enumerate(zip(replies, nanos.tolist())):
            stored = reply[0]
            if stored:
                prev = parse(stored)
                prev_nanos = prev.seconds * 1_000_000_000 + prev.nanos
                if prev_nanos and new <= prev_nanos:
                    continue
            keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def _send(self, packed: bytes, n_replies: int) -> list[Any]:
        """One pipelined round trip."""
        return self.start(packed, n_replies).finish_with_replies()


class _InFlight:
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


__all__ = ["ColumnarRedisEngine", "ColumnarRedisEngineConfig", "ENGINE_TYPE", "encode_column", "feast_timestamp"]
