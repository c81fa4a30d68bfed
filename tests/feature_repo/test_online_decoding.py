"""The fast column decoders of the online reader against the protobuf parser, value by value.

Every case is a serialized ``feast.types.Value`` exactly as Feast writes it to Redis; the fast path
must return what ``decode_value`` (the protobuf parser) returns, including for the layouts it does
not handle itself (negative ints, long strings, mixed embedding sizes), which must fall back.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import FloatList, StringList
from feast.protos.feast.types.Value_pb2 import Value as V
from feast.protos.feast.types.Value_pb2 import ValueType

from pipelines.feast_redis.wire import decode_value
from pipelines.online_decoding import column_decoder, float_matrix
from pipelines.online_features import OnlineRow


def _raw(**kwargs: object) -> bytes:
    return V(**kwargs).SerializeToString()  # type: ignore[arg-type]


CASES: dict[int, list[bytes | None]] = {
    ValueType.INT64: [_raw(int64_val=0), _raw(int64_val=7), _raw(int64_val=127), _raw(int64_val=128),
                      _raw(int64_val=300), _raw(int64_val=-1), _raw(int64_val=2**62), None, b""],
    ValueType.INT32: [_raw(int32_val=3), _raw(int32_val=70000), None],
    ValueType.DOUBLE: [_raw(double_val=1.5), _raw(double_val=-0.1), None, _raw(double_val=0.0)],
    ValueType.FLOAT: [_raw(float_val=0.1), _raw(float_val=-3.25), None],
    ValueType.STRING: [_raw(string_val="Item 7"), _raw(string_val=""), _raw(string_val="é" * 100),
                       _raw(string_val="x" * 300), None],
    ValueType.STRING_LIST: [_raw(string_list_val=StringList(val=["t1", "t22"])),
                            _raw(string_list_val=StringList(val=[])), _raw(string_list_val=StringList(val=["y" * 200])),
                            None],
    ValueType.UNIX_TIMESTAMP: [_raw(unix_timestamp_val=1_767_225_600), _raw(unix_timestamp_val=1_767_225_601),
                               _raw(unix_timestamp_val=-9223372036854775808), None],
    ValueType.FLOAT_LIST: [_raw(float_list_val=FloatList(val=[0.5, -1.0, 2.25])),
                           _raw(float_list_val=FloatList(val=[1.0, 2.0, 3.0])), None],
}


@pytest.mark.parametrize("value_type", sorted(CASES), ids=[ValueType.Enum.Name(t) for t in sorted(CASES)])
def test_column_decoder_equals_the_protobuf_parser(value_type: int) -> None:
    raws = CASES[value_type]
    assert column_decoder(value_type)(raws) == [decode_value(raw) for raw in raws]


@pytest.mark.parametrize("value_type", sorted(CASES), ids=[ValueType.Enum.Name(t) for t in sorted(CASES)])
def test_single_present_value_and_all_absent(value_type: int) -> None:
    decode = column_decoder(value_type)
    present = next(raw for raw in CASES[value_type] if raw)
    assert decode([present]) == [decode_value(present)]
    assert decode([None, b""]) == [None, None]


def test_known_values() -> None:
    # hand-computed: 300 = 0xac 0x02 as a varint; 1767225600 s = 2026-01-01T00:00:00Z
    assert column_decoder(ValueType.INT64)([bytes.fromhex("20ac02")]) == [300]
    assert column_decoder(ValueType.UNIX_TIMESTAMP)([_raw(unix_timestamp_val=1_767_225_600)]) == [
        datetime(2026, 1, 1, tzinfo=timezone.utc)]
    assert column_decoder(ValueType.STRING_LIST)([bytes.fromhex("62070a01610a026263")]) == [["a", "bc"]]


def test_float_matrix_is_the_embeddings_and_a_found_mask() -> None:
    a = _raw(float_list_val=FloatList(val=[0.5, -1.0]))
    b = _raw(float_list_val=FloatList(val=[2.0, 4.0]))
    matrix = float_matrix([a, None, b])
    assert matrix is not None
    vectors, found = matrix
    assert vectors.dtype == np.float32 and vectors.tolist() == [[0.5, -1.0], [0.0, 0.0], [2.0, 4.0]]
    assert found.tolist() == [True, False, True]


def test_float_matrix_refuses_mixed_dimensions_and_the_column_falls_back() -> None:
    short = _raw(float_list_val=FloatList(val=[1.0]))
    long = _raw(float_list_val=FloatList(val=[1.0, 2.0]))
    empty = _raw(float_list_val=FloatList(val=[]))
    assert float_matrix([short, long]) is None
    assert column_decoder(ValueType.FLOAT_LIST)([short, long, empty]) == [[1.0], [1.0, 2.0], []]


def test_a_value_of_another_kind_than_declared_is_still_decoded() -> None:
    # a view whose declared type changed under old rows: the fast path must not misread the bytes
    raws = [_raw(double_val=2.5), _raw(int64_val=4)]
    assert column_decoder(ValueType.INT64)(raws) == [2.5, 4]
    assert column_decoder(ValueType.DOUBLE)(raws) == [2.5, 4]


def test_item_matrix_uses_the_decoded_matrix_or_the_lists() -> None:
    vectors = np.array([[1.0, 2.0], [0.0, 0.0]], dtype=np.float32)
    row = OnlineRow(user={}, item_ids=[1, 2], items={"e": [[1.0, 2.0], None]},
                    matrices={"e": (vectors, np.array([True, False]))})
    matrix, found = row.item_matrix("e")
    assert matrix is vectors and found.tolist() == [True, False]
    listed = OnlineRow(user={}, item_ids=[1, 2], items={"e": [None, [3.0, 4.0]]})
    matrix, found = listed.item_matrix("e", dim=2)
    assert matrix.tolist() == [[0.0, 0.0], [3.0, 4.0]] and found.tolist() == [False, True]
