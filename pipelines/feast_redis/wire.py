"""The bytes of Feast's Redis values: ``feast.types.Value`` wire tags, value encode/decode, event times.

The one definition the column encoders (materialization), the column decoders (online reads) and
the stream's writer share; every byte layout here is checked against Feast's own writer and reader
by the byte-parity tests in tests/feature_repo/.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from feast.protos.feast.types.Value_pb2 import Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import NULL_TIMESTAMP_INT_VALUE, feast_value_type_to_python_type
from feast.utils import _coerce_datetime, make_tzaware
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

#: The int Feast stores in ``unix_timestamp_val`` for a missing timestamp (NaT).
NULL_TIMESTAMP = int(NULL_TIMESTAMP_INT_VALUE)
#: An unset ``Value`` (a null feature) serializes to no bytes at all.
NULL_VALUE = b""

_LENGTH_DELIMITED = 2
_WIRE_TYPES = {
    **dict.fromkeys((FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64), 1),
    **dict.fromkeys((FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32), 5),
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                     FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
                     FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM), 0),
    **dict.fromkeys((FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE),
                    _LENGTH_DELIMITED),
}


def varint(value: int) -> bytes:
    """Protobuf varint of an int64 (negative numbers as their 64-bit two's complement)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def value_tag(field: str) -> bytes:
    """The wire tag (``field number << 3 | wire type``) of one of ``Value``'s oneof fields."""
    descriptor = ValueProto.DESCRIPTOR.fields_by_name[field]
    return varint(descriptor.number << 3 | _WIRE_TYPES[descriptor.type])


# Wire tags of feast.types.Value's oneof fields, read from the proto's own descriptor.
TAG_STRING = value_tag("string_val")
TAG_INT32 = value_tag("int32_val")
TAG_INT64 = value_tag("int64_val")
TAG_DOUBLE = value_tag("double_val")
TAG_FLOAT = value_tag("float_val")
TAG_UNIX_TIMESTAMP = value_tag("unix_timestamp_val")
TAG_INT64_LIST = value_tag("int64_list_val")
TAG_FLOAT_LIST = value_tag("float_list_val")
TAG_STRING_LIST = value_tag("string_list_val")
#: The ``val`` field inside Int64List/FloatList/StringList: packed numbers or one string each.
TAG_LIST_VAL = varint(Int64List.DESCRIPTOR.fields_by_name["val"].number << 3 | _LENGTH_DELIMITED)


# ---- values ------------------------------------------------------------------------------------


def int64_value(value: int) -> bytes:
    """A serialized ``Value(int64_val=...)``, as Feast writes it."""
    return ValueProto(int64_val=value).SerializeToString()


def int64_list_value(values: Sequence[int]) -> bytes:
    """A serialized ``Value(int64_list_val=...)``, as Feast writes it."""
    return ValueProto(int64_list_val=Int64List(val=values)).SerializeToString()


def unix_timestamp_value(seconds: int) -> bytes:
    """A serialized ``Value(unix_timestamp_val=...)``: Feast keeps whole seconds."""
    return ValueProto(unix_timestamp_val=seconds).SerializeToString()


_FROM_BYTES = ValueProto.FromString
_SCALARS = frozenset(("int64_val", "double_val", "string_val", "float_val", "int32_val", "bool_val"))
_LISTS = frozenset(("int64_list_val", "float_list_val", "double_list_val", "string_list_val", "int32_list_val"))


def decode_value(raw: bytes | None) -> Any:
    """A serialized feast Value -> the Python value get_online_features returns (None if absent)."""
    if not raw:
        return None
    proto = _FROM_BYTES(raw)
    kind = proto.WhichOneof("val")
    if kind is None:
        return None
    if kind in _SCALARS:
        return getattr(proto, kind)
    if kind in _LISTS:
        return list(getattr(proto, kind).val)
    if kind == "unix_timestamp_val":
        value = proto.unix_timestamp_val
        return None if value == NULL_TIMESTAMP else datetime.fromtimestamp(value, tz=timezone.utc)
    return feast_value_type_to_python_type(proto)


# ---- the `_ts:<view>` event time ----------------------------------------------------------------


def feast_timestamp(value: Any) -> Timestamp:
    """The protobuf Timestamp Feast's Redis store writes for one event-time value."""
    ts = Timestamp()
    ts.FromDatetime(make_tzaware(_coerce_datetime(pd.to_datetime(value))))
    return ts


def event_time_us(us: int) -> bytes:
    """The serialized ``_ts`` Timestamp of an event time given in microseconds since the epoch."""
    seconds, micros = divmod(us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000).SerializeToString()


def timestamp_nanos(ts: Timestamp) -> int:
    """Nanoseconds since the epoch: what Feast compares before overwriting a row."""
    return ts.seconds * 1_000_000_000 + ts.nanos


def stored_event_nanos(raw: bytes) -> int:
    """The stored ``_ts`` bytes as nanoseconds since the epoch (0 when unset, as Feast reads it)."""
    return timestamp_nanos(Timestamp.FromString(raw))
