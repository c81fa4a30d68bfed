"""Column decoders of the online reader: Feast's value bytes -> Python values, a column at a time.

Decoded by the view's declared type: fixed-width values (doubles, floats, an embedding's float32
list) as one NumPy view over the joined bytes, short varints and strings by hand, anything
unexpected through the protobuf parser (:func:`pipelines.feast_redis.wire.decode_value`), since a
proto parse per value dominates a read of many entities. Every decoder returns what the parser
returns (tests/feature_repo/test_online_decoding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from feast.protos.feast.types.Value_pb2 import ValueType

from pipelines.feast_redis.wire import (
    TAG_DOUBLE,
    TAG_FLOAT,
    TAG_FLOAT_LIST,
    TAG_INT32,
    TAG_INT64,
    TAG_LIST_VAL,
    TAG_STRING,
    TAG_STRING_LIST,
    TAG_UNIX_TIMESTAMP,
    decode_value,
)

Raw = bytes | None
ColumnDecoder = Callable[[Sequence[Raw]], list[Any]]
Matrix = tuple[np.ndarray, np.ndarray]  # (n, dim) float32 vectors, found-mask

# The one-byte wire tags the hand decoders compare with a value's first byte.
_STRING, _INT32, _INT64, _DOUBLE, _FLOAT, _TS, _STRING_LIST, _LIST_VAL = (
    tag[0] for tag in (TAG_STRING, TAG_INT32, TAG_INT64, TAG_DOUBLE, TAG_FLOAT, TAG_UNIX_TIMESTAMP, TAG_STRING_LIST,
                       TAG_LIST_VAL))


def _tagged_varint(raw: bytes, tag: int) -> int | None:
    """A non-negative varint after a one-byte tag; None when the bytes are anything else.

    Negative int64s take ten bytes; those (and Feast's null timestamp) go to the proto parser.
    """
    n = len(raw)
    if n < 2 or n > 10 or raw[0] != tag:
        return None
    value, shift = 0, 0
    for i in range(1, n):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value if i == n - 1 else None
    return None


def _same_length_varints(raws: Sequence[Raw], tag: int) -> list[Any] | None:
    """Varints of one byte length (timestamps of one era, small counters) as one NumPy pass.

    None when the present values differ in length or are not ``tag + non-negative varint``.
    """
    present = [raw for raw in raws if raw]
    if not present:
        return [None] * len(raws)
    size = len(present[0])
    if not 2 <= size <= 10 or any(len(raw) != size for raw in present):
        return None
    block = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), size)
    if not (block[:, 0] == tag).all() or not (block[:, 1:-1] & 0x80).all() or (block[:, -1] & 0x80).any():
        return None
    values = np.zeros(len(present), dtype=np.int64)
    for i in range(1, size):  # at most 9 groups of 7 bits: fits a non-negative int64
        values |= (block[:, i].astype(np.int64) & 0x7F) << (7 * (i - 1))
    return _scatter(raws, values.tolist())


def _ints(tag: int) -> ColumnDecoder:
    def column(raws: Sequence[Raw]) -> list[Any]:
        fast = _same_length_varints(raws, tag)
        if fast is not None:
            return fast
        out: list[Any] = []
        for raw in raws:
            value = _tagged_varint(raw, tag) if raw else None
            out.append(decode_value(raw) if value is None else value)
        return out

    return column


def _timestamps(raws: Sequence[Raw]) -> list[Any]:
    seconds = _ints(_TS)(raws)
    return [datetime.fromtimestamp(v, tz=timezone.utc) if isinstance(v, int) else v for v in seconds]


def _string_list(raw: bytes) -> list[str] | None:
    """``<string_list_val tag> <len> (<val tag> <len> <utf-8>)*`` with every length under 128, else None."""
    size = len(raw)
    if size < 2 or raw[0] != _STRING_LIST or raw[1] != size - 2:
        return None
    values, pos = [], 2
    while pos < size:
        if raw[pos] != _LIST_VAL or pos + 1 >= size or raw[pos + 1] & 0x80:
            return None
        end = pos + 2 + raw[pos + 1]
        values.append(raw[pos + 2:end].decode())
        pos = end
    return values if pos == size else None


def _string_lists(raws: Sequence[Raw]) -> list[Any]:
    out: list[Any] = []
    for raw in raws:
        values = _string_list(raw) if raw else None
        out.append(decode_value(raw) if values is None else values)
    return out


def _strings(raws: Sequence[Raw]) -> list[Any]:
    out: list[Any] = []
    for raw in raws:
        if raw and len(raw) >= 2 and raw[0] == _STRING and raw[1] == len(raw) - 2:  # length < 128
            out.append(raw[2:].decode())
        else:
            out.append(decode_value(raw))
    return out


def _fixed_width(tag: int, dtype: str) -> ColumnDecoder:
    """Doubles or floats: when every present value is ``tag + 8|4 bytes``, one NumPy view."""
    width = 1 + np.dtype(dtype).itemsize

    def column(raws: Sequence[Raw]) -> list[Any]:
        present = [raw for raw in raws if raw]
        if not present:
            return [None] * len(raws)
        block = np.frombuffer(b"".join(present), dtype=np.uint8)
        if block.size != width * len(present) or not (block[::width] == tag).all():
            return [decode_value(raw) for raw in raws]  # another layout: never guess
        values = block.reshape(-1, width)[:, 1:].copy().view(dtype).ravel().tolist()
        return _scatter(raws, values)

    return column


def _scatter(raws: Sequence[Raw], values: list[Any]) -> list[Any]:
    """Values decoded from the present entries, back in place, None for absent ones."""
    if len(values) == len(raws):
        return values
    it = iter(values)
    return [next(it) if raw else None for raw in raws]


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``; (-1, pos) if it runs off the end."""
    value, shift = 0, 0
    while pos < len(raw):
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        shift += 7
        pos += 1
        if not byte & 0x80:
            return value, pos
    return -1, pos


def _float_list_header(raw: bytes) -> int | None:
    """Length of the wire header before the packed floats of a float_list_val, or None.

    ``<float_list_val tag> <outer length> <val tag> <packed length> <floats>``; both lengths must cover the rest.
    """
    if not raw.startswith(TAG_FLOAT_LIST):
        return None
    outer, pos = _read_varint(raw, len(TAG_FLOAT_LIST))
    if outer != len(raw) - pos or pos >= len(raw) or raw[pos] != _LIST_VAL:
        return None
    packed, pos = _read_varint(raw, pos + 1)
    return pos if packed == len(raw) - pos and packed % 4 == 0 else None


def float_matrix(raws: Sequence[Raw]) -> tuple[np.ndarray, np.ndarray] | None:
    """Equal-length float lists (embeddings) as an (n, dim) float32 matrix and a found-mask.

    One ``frombuffer`` over the joined bytes when every present value has the same header (the same
    dimension); None when they differ, so the caller decodes value by value.
    """
    present = [raw for raw in raws if raw]
    found = np.fromiter((bool(raw) for raw in raws), dtype=bool, count=len(raws))
    if not present:
        return np.zeros((len(raws), 0), dtype=np.float32), found
    head = _float_list_header(present[0])
    size = len(present[0])
    if head is None or any(len(raw) != size or raw[:head] != present[0][:head] for raw in present):
        return None
    dense = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), size)[:, head:]
    vectors = dense.copy().view("<f4")
    if len(present) == len(raws):
        return vectors, found
    out = np.zeros((len(raws), vectors.shape[1]), dtype=np.float32)
    out[found] = vectors
    return out, found


def _float_lists(raws: Sequence[Raw]) -> list[Any]:
    matrix = float_matrix(raws)
    if matrix is None:
        return [decode_value(raw) for raw in raws]
    vectors, found = matrix
    rows = vectors.tolist()
    return [row if ok else None for row, ok in zip(rows, found.tolist())]


def _per_value(raws: Sequence[Raw]) -> list[Any]:
    return [decode_value(raw) for raw in raws]


_COLUMN_DECODERS: dict[int, ColumnDecoder] = {
    ValueType.INT64: _ints(_INT64),
    ValueType.INT32: _ints(_INT32),
    ValueType.UNIX_TIMESTAMP: _timestamps,
    ValueType.STRING: _strings,
    ValueType.DOUBLE: _fixed_width(_DOUBLE, "<f8"),
    ValueType.FLOAT: _fixed_width(_FLOAT, "<f4"),
    ValueType.FLOAT_LIST: _float_lists,
    ValueType.STRING_LIST: _string_lists,
}


def column_decoder(value_type: int) -> ColumnDecoder:
    """The column decoder of a declared Feast value type (its protobuf enum number)."""
    return _COLUMN_DECODERS.get(int(value_type), _per_value)


__all__ = ["ColumnDecoder", "Matrix", "Raw", "column_decoder", "decode_value", "float_matrix"]
