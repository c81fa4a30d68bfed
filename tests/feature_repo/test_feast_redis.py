"""The Feast adapter (pipelines.feast_redis): the only user of Feast's internals, for one Feast version.

Its byte helpers are checked here against Feast's own protos and key function; the end-to-end
parity (Feast's writer and reader against ours, through Redis) is in test_materialize_engine.py,
test_feature_store.py and tests/pipelines/test_stream.py.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import feast
import pytest
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as V
from google.protobuf.timestamp_pb2 import Timestamp

from pipelines import feast_redis as fr
from tests.support.settings import REPO

ADAPTER = REPO / "pipelines" / "feast_redis"
PRODUCT = ("recsys", "pipelines", "models", "bentos", "benchmarks", "feature_repo")
#: Feast internals the platform needs: flagged anywhere outside the adapter, even as a name of ours.
NAMED = frozenset(("_mmh3", "_redis_key", "_versioned_fv_name", "_get_provider", "_materialize_one", "_get_client",
                   "_get_backend", "_should_dedupe", "_coerce_datetime", "_validate_vector_field_lengths"))


# ---- the version check ---------------------------------------------------------------------------


def test_the_installed_feast_is_the_supported_one() -> None:
    fr.check_feast_version()  # what the import did
    fr.check_feast_version(fr.SUPPORTED_FEAST_VERSION)


@pytest.mark.parametrize("other", ["0.68.0", "0.66.1", "0.67.0rc1"])
def test_another_feast_version_fails_with_what_to_do(other: str) -> None:
    with pytest.raises(fr.UnsupportedFeastVersion) as caught:
        fr.check_feast_version(other)
    message = str(caught.value)
    assert f"feast {other} is installed" in message
    assert f"pin feast=={fr.SUPPORTED_FEAST_VERSION}" in message.lower()
    assert "tests/feature_repo/test_materialize_engine.py" in message and "pipelines/feast_redis/" in message
    assert isinstance(caught.value, ImportError)  # raised by the import itself


def test_parity_tests_named_in_the_message_exist() -> None:
    assert all((REPO / path).is_file() for path in fr.PARITY_TESTS)


# ---- nothing else touches Feast's internals -----------------------------------------------------


def _feast_private_names() -> frozenset[str]:
    """Private names Feast defines (functions, methods, module and instance attributes)."""
    pattern = re.compile(r"^\s*(?:async\s+)?def\s+(_\w+)|self\.(_\w+)\s*[:=]|^(_\w+)\s*[:=]", re.M)
    names: set[str] = set()
    for path in Path(feast.__file__).parent.rglob("*.py"):
        for groups in pattern.findall(path.read_text(errors="replace")):
            names.update(g for g in groups if g)
    return frozenset(n for n in names if not (n.startswith("__") and n.endswith("__")))


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module defines itself: functions, classes, arguments, assignment targets."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return out


def private_feast_uses(source: str, feast_privates: frozenset[str], ours: set[str]) -> list[str]:
    """Each import of a private Feast name, access to a Feast-private attribute that is not one of
    ours (any of :data:`NAMED`), and override of a Feast-private method in a subclass of a Feast
    class, in ``source``."""
    tree = ast.parse(source)
    flagged = NAMED | (feast_privates - ours)
    found: list[str] = []
    from_feast: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "feast":
            from_feast.update(a.asname or a.name for a in node.names)
            if any(part.startswith("_") for part in node.module.split(".")):  # type: ignore[union-attr]
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [f"line {node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "feast" and any(p.startswith("_") for p in a.name.split("."))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in flagged:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in from_feast for b in node.bases):
            found += [f"line {item.lineno}: overrides {node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and item.name in feast_privates | NAMED]
    return found


def _product_files() -> Iterator[Path]:
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            if ADAPTER not in path.parents:
                yield path


@pytest.fixture(scope="module")
def feast_privates() -> frozenset[str]:
    names = _feast_private_names()
    assert {"_mmh3", "_redis_key", "_get_provider", "_materialize_one", "_get_client"} <= names
    return names


def test_the_checker_finds_private_feast_uses(feast_privates: frozenset[str]) -> None:
    source = '''
from feast.infra.online_stores.helpers import _mmh3, serialize_entity_key
from feast.infra.compute_engines.local.compute import LocalComputeEngine
import feast._private.thing

class Engine(LocalComputeEngine):
    def _materialize_one(self, registry, task):
        return super()._materialize_one(registry, task)

def provider(store):
    return store._get_provider()
'''
    found = private_feast_uses(source, feast_privates, _defined_names(ast.parse(source)))
    assert any("import _mmh3" in f for f in found) and any("feast._private" in f for f in found)
    assert any("._get_provider" in f for f in found) and any("._materialize_one" in f for f in found)
    assert any("overrides Engine._materialize_one" in f for f in found)
    assert private_feast_uses("from feast import FeatureStore\nx = store.get_online_features\n",
                              feast_privates, set()) == []


def test_only_the_adapter_uses_feast_internals(feast_privates: frozenset[str]) -> None:
    files = list(_product_files())
    assert len(files) > 20
    trees = {path: ast.parse(path.read_text()) for path in files}
    ours: set[str] = set().union(*(_defined_names(t) for t in trees.values()))
    offenders = {str(path.relative_to(REPO)): found for path in files
                 if (found := private_feast_uses(path.read_text(), feast_privates, ours))}
    assert offenders == {}, f"use pipelines.feast_redis instead: {offenders}"


# ---- the byte helpers against Feast's own protos and key function --------------------------------


def test_wire_tags_are_those_protobuf_writes() -> None:
    cases = {
        fr.TAG_STRING: V(string_val="a"), fr.TAG_INT32: V(int32_val=1), fr.TAG_INT64: V(int64_val=1),
        fr.TAG_DOUBLE: V(double_val=1.0), fr.TAG_FLOAT: V(float_val=1.0), fr.TAG_UNIX_TIMESTAMP: V(unix_timestamp_val=1),
        fr.TAG_INT64_LIST: V(int64_list_val=Int64List(val=[1])), fr.TAG_FLOAT_LIST: V(float_list_val=FloatList(val=[1.0])),
        fr.TAG_STRING_LIST: V(string_list_val=StringList(val=["a"])),
    }
    for tag, proto in cases.items():
        assert proto.SerializeToString().startswith(tag), proto
    assert Int64List(val=[1]).SerializeToString().startswith(fr.TAG_LIST_VAL)
    assert StringList(val=["a"]).SerializeToString().startswith(fr.TAG_LIST_VAL)
    assert V().SerializeToString() == fr.NULL_VALUE


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**40, 2**63 - 1, -1, -2**63])
def test_values_are_the_protos_feast_writes(n: int) -> None:
    assert fr.int64_value(n) == V(int64_val=n).SerializeToString() == fr.TAG_INT64 + fr.varint(n)
    assert fr.int64_list_value([n, 3]) == V(int64_list_val=Int64List(val=[n, 3])).SerializeToString()
    assert fr.int64_list_value([]) == V(int64_list_val=Int64List(val=[])).SerializeToString()
    assert fr.unix_timestamp_value(n) == V(unix_timestamp_val=n).SerializeToString()
    assert fr.decode_value(fr.int64_value(n)) == n


@pytest.mark.parametrize("us", [0, 1, 1_767_225_600_000_001, -1_000_001])
def test_event_times_are_feasts_timestamps(us: int) -> None:
    from datetime import datetime, timedelta, timezone

    when = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)
    feast_ts = fr.feast_timestamp(when)
    assert fr.event_time_us(us) == feast_ts.SerializeToString()
    assert fr.stored_event_nanos(fr.event_time_us(us)) == fr.timestamp_nanos(feast_ts) == us * 1000
    assert fr.stored_event_nanos(Timestamp().SerializeToString()) == 0


def test_int64_keys_are_feasts_keys() -> None:
    key = fr.int64_key_function("user_id", "proj")
    for entity_id in (0, 7, 2**40 + 7, -3, 2**63 - 1):
        assert key(entity_id) == fr.feast_redis_key("proj", "user_id", entity_id)
        assert key(entity_id) == fr.int64_key_prefix("user_id") + fr.INT64_ID.pack(entity_id) + b"proj"
    assert fr.timestamp_field("user_realtime") == b"_ts:user_realtime"
    assert len(fr.feature_field("user_realtime", "interaction_count")) == 4
