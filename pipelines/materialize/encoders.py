"""Column encoders: each row's ``feast.types.Value`` bytes as a RESP bulk string, a column at a time.

Fixed-width types are packed with NumPy, varints and strings once per distinct value, lists from
Arrow's flat buffers; the exact bytes Feast's ``type_map`` produces (tests/feature_repo/
test_materialize_engine.py checks them value by value). Any type without a fast path goes through
Feast's own converter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType

from pipelines.feast_redis.wire import (
    NULL_VALUE,
    TAG_DOUBLE,
    TAG_FLOAT_LIST,
    TAG_INT64,
    TAG_INT64_LIST,
    TAG_LIST_VAL,
    TAG_STRING,
    TAG_STRING_LIST,
    TAG_UNIX_TIMESTAMP,
    varint,
)

_MAX_EXACT_FLOAT_INT = 2**53  # Feast turns an int column with nulls into float64 first


def bulk(payload: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


_NULL = bulk(NULL_VALUE)

Encoded = list[bytes]  # one RESP bulk string per row


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
        inner = TAG_LIST_VAL + varint(size) if size else b""
        return tag + varint(len(inner) + size) + inner
    return head


def _string_list_head(size: int) -> bytes:
    """Value head of a StringList: its elements are each ``0a len utf8`` already."""
    return TAG_STRING_LIST + varint(size)


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
        encoded = _per_distinct(values, lambda v: bulk(TAG_INT64 + varint(v)))
        return [e if ok else _NULL for e, ok in zip(encoded, finite.tolist())]
    else:
        return None
    encoded = _per_distinct(values.astype(np.int64), lambda v: bulk(TAG_INT64 + varint(v)))
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
    buf[:, 4] = TAG_DOUBLE[0]
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
            out.append(bulk(TAG_STRING + varint(end - start) + data[start:end]))
    return out


def _encode_timestamp(column: pa.Array) -> Encoded | None:
    if not pa.types.is_timestamp(column.type):
        return None
    values = column.to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.datetime64):
        return None
    # Feast: np.datetime64 -> astype("datetime64[s]").astype(int); NaT gives NULL_TIMESTAMP_INT_VALUE
    seconds = values.astype("datetime64[s]").astype(np.int64)
    return _per_distinct(seconds, lambda v: bulk(TAG_UNIX_TIMESTAMP + varint(v)))


def _encode_int64_list(column: pa.Array) -> Encoded | None:
    parts = _list_parts(column)
    if parts is None or not pa.types.is_integer(parts[1].type) or parts[1].type == pa.uint64():
        return None
    offsets, child, valid = parts
    elements = _per_distinct(child.to_numpy().astype(np.int64), varint)
    return _rows_from_elements(offsets, valid, elements, _packed_list_head(TAG_INT64_LIST))


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
            inner_head = TAG_LIST_VAL + varint(size) if size else b""
            value_head = TAG_FLOAT_LIST + varint(len(inner_head) + size) + inner_head
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
    words = [TAG_LIST_VAL + varint(len(w)) + w for w in (s.encode() for s in encoded.dictionary.to_pylist())]
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
    return [bulk(p.SerializeToString()) for p in protos]


__all__ = ["Encoded", "bulk", "encode_column"]
