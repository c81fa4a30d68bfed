"""Online feature reads for serving: Feast's own Redis layout, one round trip, column-wise decode.

The layout (keys, field hashes, value bytes) is :mod:`pipelines.feast_redis`'s. Where
``FeatureStore.get_online_features`` resolves the registry, builds protos and converts per call,
this reader resolves views, field hashes and key prefixes once, then:

- sends one HMGET per entity as a single pre-packed RESP buffer on one pooled connection (redis-py's
  pipeline builds each command through several Python layers, a cost paid per entity);
- decodes column by column, by the view's declared type (:mod:`pipelines.online_decoding`).

The tests prove it returns exactly what ``get_online_features`` returns for the same rows.

Like Feast, online reads do not apply a view's TTL (Feast issue #6821): a value is served until it
is overwritten or its Redis key expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from feast.protos.feast.types.Value_pb2 import ValueType

from pipelines.feast_redis.layout import INT64_ID, feature_field, int64_key_prefix, stored_view_name
from pipelines.online_decoding import Matrix, Raw, column_decoder, decode_value, float_matrix
from recsys.config import Settings

if TYPE_CHECKING:
    from feast import FeatureStore


@dataclass(frozen=True)
class _ViewPlan:
    """Precomputed hash fields and declared value types of one view for one entity kind."""

    name: str
    features: tuple[str, ...]
    fields: tuple[bytes, ...]
    value_types: tuple[int, ...]


@dataclass(frozen=True)
class _EntityPlan:
    """One entity kind's views, their fields in reply order, and its HMGET packed around an id."""

    join_key: str
    prefix: bytes  # serialized entity key up to the value bytes
    project: bytes
    views: tuple[_ViewPlan, ...]
    fields: tuple[bytes, ...] = field(init=False)
    names: tuple[str, ...] = field(init=False)
    value_types: tuple[int, ...] = field(init=False)
    _head: bytes = field(init=False, repr=False)
    _tail: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        fields = tuple(f for v in self.views for f in v.fields)
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "names", tuple(n for v in self.views for n in v.features))
        object.__setattr__(self, "value_types", tuple(t for v in self.views for t in v.value_types))
        # HMGET <key> <fields...> in RESP, split around the 8 bytes of the entity id
        key_len = len(self.prefix) + INT64_ID.size + len(self.project)
        object.__setattr__(self, "_head", b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%s" % (len(fields) + 2, key_len, self.prefix))
        object.__setattr__(self, "_tail", self.project + b"\r\n"
                           + b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields))

    def key(self, entity_id: int, project: bytes | None = None) -> bytes:
        return self.prefix + INT64_ID.pack(entity_id) + (self.project if project is None else project)

    def command(self, entity_id: int) -> bytes:
        """The packed ``HMGET key field...`` of one entity, ready for the socket."""
        return self._head + INT64_ID.pack(entity_id) + self._tail

    def decode_one(self, reply: Sequence[Raw]) -> dict[str, Any]:
        # one entity: the protobuf parser beats setting up NumPy per value
        return {name: decode_value(raw) for name, raw in zip(self.names, reply)}

    def decode_many(self, replies: Sequence[Sequence[Raw]]) -> tuple[dict[str, list[Any]], dict[str, Matrix]]:
        """Column-wise decode of many HMGET replies (one per entity), plus embedding matrices."""
        if not replies:
            return {name: [] for name in self.names}, {}
        columns: dict[str, list[Any]] = {}
        matrices: dict[str, Matrix] = {}
        for name, value_type, raws in zip(self.names, self.value_types, zip(*replies)):
            matrix = float_matrix(raws) if value_type == ValueType.FLOAT_LIST else None
            if matrix is not None:
                matrices[name] = matrix
                vectors, found = matrix
                columns[name] = [row if ok else None for row, ok in zip(vectors.tolist(), found.tolist())]
            else:
                columns[name] = column_decoder(value_type)(raws)
        return columns, matrices


@dataclass
class OnlineRow:
    """Features of one user and a batch of items: ``user[name]``, ``items[name][i]``."""

    user: dict[str, Any]
    item_ids: list[int]
    items: dict[str, list[Any]]
    matrices: dict[str, Matrix] = field(default_factory=dict, compare=False, repr=False)  # derived from items

    def item_matrix(self, name: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A list-valued item feature (an embedding) as a float32 matrix and a found-mask."""
        if name in self.matrices and (dim is None or self.matrices[name][0].shape[1] in (dim, 0)):
            vectors, found = self.matrices[name]
            if dim is not None and vectors.shape[1] == 0:
                vectors = np.zeros((len(found), dim), dtype=np.float32)
            return vectors, found
        values = self.items[name]
        found = np.array([v is not None and len(v) > 0 for v in values], dtype=bool)
        width = dim or next((len(v) for v, ok in zip(values, found) if ok), 0)
        out = np.zeros((len(values), width), dtype=np.float32)
        for i in np.flatnonzero(found):
            out[i] = values[i]
        return out, found


class OnlineFeatureReader:
    """Reads user and item features from the Feast online store (Redis) in one round trip."""

    def __init__(
        self,
        settings: Settings,
        user_features: Sequence[str],
        item_features: Sequence[str],
        store: FeatureStore | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        from pipelines.feature_store import get_store

        store = store or get_store(settings)
        self.project = settings.feast_project.encode()
        self.client = client or redis.Redis.from_url(
            settings.effective_redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self.user = self._plan(store, "user_id", user_features, self.project)
        self.item = self._plan(store, "item_id", item_features, self.project)

    @staticmethod
    def _plan(store: FeatureStore, join_key: str, refs: Sequence[str], project: bytes) -> _EntityPlan:
        by_view: dict[str, list[str]] = {}
        for ref in refs:
            view_name, _, feature = ref.partition(":")
            if not feature:
                raise ValueError(f"feature reference {ref!r} must look like 'view:feature'")
            by_view.setdefault(view_name, []).append(feature)
        plans = []
        for view_name, features in by_view.items():
            view = store.get_feature_view(view_name)
            keys = list(view.join_keys)
            if keys != [join_key]:
                raise ValueError(f"view {view_name!r} is keyed by {keys}, not [{join_key!r}]")
            # feast.ValueType mirrors the protobuf enum's numbers
            known = {f.name: int(f.dtype.to_value_type().value) for f in view.features}
            unknown = [f for f in features if f not in known]
            if unknown:
                raise ValueError(f"view {view_name!r} has no features {unknown}: it has {sorted(known)}")
            stored_as = stored_view_name(view, store.config)  # the name Feast's Redis writer hashes
            plans.append(_ViewPlan(view_name, tuple(features), tuple(feature_field(stored_as, f) for f in features),
                                   tuple(known[f] for f in features)))
        prefix = int64_key_prefix(join_key, store.config.entity_key_serialization_version)
        return _EntityPlan(join_key, prefix, project, tuple(plans))

    def _round_trip(self, commands: list[bytes]) -> list[list[Raw]]:
        """Send all commands in one write on one pooled connection and read every reply.

        Any failure part-way (timeout, a server error) leaves unread replies on the socket, so the
        connection is closed rather than returned to the pool dirty.
        """
        if not commands:
            return []
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(commands)], check_health=False)
            return [conn.read_response() for _ in commands]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def read(self, user_id: int | None, item_ids: Sequence[int]) -> OnlineRow:
        """One round trip: HMGET of the user's fields (if any) and of every item's fields."""
        item_ids = [int(i) for i in item_ids]
        with_user = user_id is not None and bool(self.user.fields)
        commands = [self.user.command(int(user_id))] if with_user else []  # type: ignore[arg-type]
        if self.item.fields:
            commands.extend(map(self.item.command, item_ids))
        replies = self._round_trip(commands)
        user = self.user.decode_one(replies[0]) if with_user else {}
        items, matrices = self.item.decode_many(replies[1:] if with_user else replies)
        if not self.item.fields:
            items = {}
        return OnlineRow(user=user, item_ids=item_ids, items=items, matrices=matrices)

    def read_users(self, user_ids: Sequence[int]) -> dict[str, list[Any]]:
        """The user features of many users (batch jobs such as precompute), column-wise."""
        if not self.user.fields:
            return {}
        columns, _ = self.user.decode_many(self._round_trip([self.user.command(int(u)) for u in user_ids]))
        return columns


__all__ = ["OnlineFeatureReader", "OnlineRow"]
