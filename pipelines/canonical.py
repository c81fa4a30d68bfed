"""Reading, validating and writing the canonical tables (events, items, users).

A dataset is a folder::

    <data_dir>/canonical/<name>/
        events/part-00000.parquet ...   EVENTS_SCHEMA, sorted by user then time inside a part (the
                                        attribution columns null: only live events carry them)
        items/part-00000.parquet ...    ITEMS_SCHEMA
        users/part-00000.parquet ...    USERS_SCHEMA
        rejects/part-00000.parquet ...  rows that failed validation, with the reason (never dropped)
        manifest.json                   source, counts, time range, tables version (S.TABLES_VERSION)

Every writer goes through :class:`CanonicalWriter`, so every dataset obeys the same contract.
A dataset of an older tables version lacks columns added since (the events' ``request_id`` and
``position``); :func:`read_table` and :func:`events_dataset` read them as null.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recsys import schema as S

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TABLES = ("events", "items", "users", "rejects")


#: the reason an event on an item outside the catalogue is rejected (the stream reloads the
#: catalogue once before it dead-letters one: items are added while serving)
UNKNOWN_ITEM_REASON = "item_id not in catalogue"


class DatasetError(RuntimeError):
    """A dataset is missing or unusable; the message says what to run."""


@dataclass
class Manifest:
    source: str
    schema_version: int = S.TABLES_VERSION  # of the tables (a version-1 manifest: no attribution columns)
    events: int = 0
    items: int = 0
    users: int = 0
    rejects: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    min_event_ts: str | None = None
    max_event_ts: str | None = None
    params: dict[str, object] = field(default_factory=dict)

    @property
    def max_event_time(self) -> datetime | None:
        return datetime.fromisoformat(self.max_event_ts) if self.max_event_ts else None


class CanonicalWriter:
    """Writes a dataset part by part, in bounded memory, and its manifest on close.

    The folder is written under a temporary name and renamed at the end, so a crash never
    leaves a half-written dataset where a reader would take it for a whole one.
    """

    def __init__(self, out_dir: Path, source: str, params: dict[str, object] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self._tmp = self.out_dir.with_name(self.out_dir.name + ".tmp")
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        for table in TABLES:
            (self._tmp / table).mkdir(parents=True)
        self._parts = dict.fromkeys(TABLES, 0)
        self.manifest = Manifest(source=source, params=dict(params or {}))
        self._min_ts: pd.Timestamp | None = None
        self._max_ts: pd.Timestamp | None = None

    def _write(self, table_name: str, table: pa.Table, schema: pa.Schema) -> None:
        if table.num_rows == 0:
            return
        table = conform(table, schema)
        path = self._tmp / table_name / f"part-{self._parts[table_name]:05d}.parquet"
        # coerce_timestamps keeps microseconds: Spark 4 rejects nanosecond parquet timestamps
        pq.write_table(table, path, coerce_timestamps="us", compression="zstd")
        self._parts[table_name] += 1
        count = getattr(self.manifest, table_name)
        setattr(self.manifest, table_name, count + table.num_rows)

    def add_events(self, table: pa.Table) -> None:
        if table.num_rows:
            ts = table.column(S.COL_TS)
            lo, hi = pd.Timestamp(pa.compute.min(ts).as_py()), pd.Timestamp(pa.compute.max(ts).as_py())
            self._min_ts = lo if self._min_ts is None else min(self._min_ts, lo)
            self._max_ts = hi if self._max_ts is None else max(self._max_ts, hi)
        self._write("events", table, S.EVENTS_SCHEMA)

    def add_items(self, table: pa.Table) -> None:
        self._write("items", table, S.ITEMS_SCHEMA)

    def add_users(self, table: pa.Table) -> None:
        self._write("users", table, S.USERS_SCHEMA)

    def add_rejects(self, table: pa.Table) -> None:
        if table.num_rows:
            for reason, n in pd.Series(table.column("reason").to_pylist()).value_counts().items():
                self.manifest.rejects_by_reason[reason] = self.manifest.rejects_by_reason.get(reason, 0) + int(n)
        self._write("rejects", table, S.REJECTS_SCHEMA)

    def close(self) -> Manifest:
        self.manifest.min_event_ts = self._min_ts.isoformat() if self._min_ts is not None else None
        self.manifest.max_event_ts = self._max_ts.isoformat() if self._max_ts is not None else None
        for table, schema in (("events", S.EVENTS_SCHEMA), ("items", S.ITEMS_SCHEMA),
                              ("users", S.USERS_SCHEMA), ("rejects", S.REJECTS_SCHEMA)):
            if self._parts[table] == 0:  # readers (Spark, Feast) need the schema even when empty
                pq.write_table(schema.empty_table(), self._tmp / table / "part-00000.parquet",
                               coerce_timestamps="us")
        (self._tmp / MANIFEST).write_text(json.dumps(asdict(self.manifest), indent=2) + "\n")
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self._tmp.rename(self.out_dir)
        log.info(
            "wrote %s: %d events, %d items, %d users, %d rejects",
            self.out_dir, self.manifest.events, self.manifest.items, self.manifest.users,
            self.manifest.rejects,
        )
        return self.manifest

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CanonicalWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order and types; a nullable column it lacks (one a
    newer tables version added) as nulls. A missing required column fails, naming it."""
    for f in schema:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"table lacks the required column {f.name!r} (expected {schema.names})")
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


# ---- validation -------------------------------------------------------------------------------


def rejects_table(table_name: str, reasons: list[str], raw: list[str]) -> pa.Table:
    """Rows that failed validation, each with its reason and the original row as text."""
    return pa.table(
        {
            "table": pa.array([table_name] * len(reasons), pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "raw": pa.array(raw, pa.string()),
        },
        schema=S.REJECTS_SCHEMA,
    )


def event_reject_reasons(
    df: pd.DataFrame,
    known_items: np.ndarray | None = None,
    max_ts: pd.Timestamp | None = None,
) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series, pd.Series]:
    """The first failing reason of each raw event row (NA when valid), and the parsed
    user, item, value and timestamp columns. The stream's dead-letter reasons come from here too.
    """
    reason = pd.Series(pd.NA, index=df.index, dtype="string")

    def flag(mask: pd.Series | np.ndarray, why: str) -> None:
        m = pd.Series(np.asarray(mask, dtype=bool), index=df.index) & reason.isna()
        reason[m] = why

    user = pd.to_numeric(df[S.COL_USER], errors="coerce")
    item = pd.to_numeric(df[S.COL_ITEM], errors="coerce")
    value = pd.to_numeric(df[S.COL_VALUE], errors="coerce")
    ts = pd.to_datetime(df[S.COL_TS], utc=True, errors="coerce")
    etype = df[S.COL_EVENT_TYPE]

    flag(df[S.COL_EVENT_ID].isna(), "missing event_id")
    flag(user.isna(), "missing or non-numeric user_id")
    flag(user < 0, "negative user_id")
    flag(item.isna(), "missing or non-numeric item_id")
    flag(item < 0, "negative item_id")
    flag(~etype.isin(S.EVENT_TYPES), "unknown event_type")
    flag(ts.isna(), "missing or unparseable event_timestamp")
    if max_ts is not None:
        flag(ts > max_ts, "event_timestamp in the future")
    flag(value < 0, "negative value")
    is_rating = etype == S.EventType.RATING.value
    flag(is_rating & ~value.between(0.5, 5.0), "rating outside 0.5..5")
    if known_items is not None:
        ok_item = item.notna() & (item >= 0)
        unknown = np.zeros(len(df), dtype=bool)
        idx = np.flatnonzero(ok_item.to_numpy())
        unknown[idx] = ~np.isin(item.to_numpy()[idx].astype(np.int64), known_items, assume_unique=False)
        flag(unknown, UNKNOWN_ITEM_REASON)
    return reason, user, item, value, ts


def validate_events(
    df: pd.DataFrame,
    known_items: np.ndarray | None = None,
    max_ts: pd.Timestamp | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split raw event rows into canonical events and rejects (with the first failing reason).

    ``df`` has the EVENTS_SCHEMA columns, possibly with bad values: ids may be missing or
    negative, the type unknown, the timestamp missing or later than ``max_ts``.
    ``known_items`` (sorted) rejects events on items outside the catalogue. The attribution columns
    may be absent (generated and loaded events: null) and never reject an event (:func:`attribution`).
    """
    reason, user, item, value, ts = event_reject_reasons(df, known_items, max_ts)
    bad = reason.notna().to_numpy()
    good = df.loc[~bad].copy()
    good[S.COL_USER] = user[~bad].astype("int64")
    good[S.COL_ITEM] = item[~bad].astype("int64")
    good[S.COL_VALUE] = value[~bad].astype("float64")
    good[S.COL_TS] = ts[~bad].dt.as_unit("us")
    good[S.COL_REQUEST_ID], good[S.COL_POSITION] = attribution(good)
    events = pa.Table.from_pandas(good[list(S.EVENTS_SCHEMA.names)], schema=S.EVENTS_SCHEMA, preserve_index=False)

    if bad.any():
        raw = df.loc[bad].astype(object).where(df.loc[bad].notna(), None)
        raw_json = [json.dumps(r, default=str, sort_keys=True) for r in raw.to_dict(orient="records")]
        rejects = rejects_table("events", reason[bad].astype(str).tolist(), raw_json)
    else:
        rejects = S.REJECTS_SCHEMA.empty_table()
    return events, rejects


def attribution(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The ``request_id`` and ``position`` columns of raw event rows, as the events table keeps them:
    a non-empty text id, and a whole position >= 1 only beside an id; anything else (absent, a bad
    type, a position alone: ``POST /events`` refuses those, a direct producer may not) is null, and
    the event itself is kept: attribution is optional, the event is not."""
    no_position = pd.Series(pd.NA, index=df.index, dtype="Int64")
    if S.COL_REQUEST_ID not in df:  # generated and loaded events: no per-row work
        return pd.Series([None] * len(df), index=df.index, dtype=object), no_position
    raw_id = df[S.COL_REQUEST_ID]
    ids = raw_id.where(raw_id.map(lambda v: isinstance(v, str) and v != ""), None).astype(object)
    if S.COL_POSITION not in df:
        return ids, no_position
    raw_pos = df[S.COL_POSITION]
    numeric = raw_pos.where(raw_pos.map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)))
    pos = pd.to_numeric(numeric, errors="coerce")
    ok = pos.notna() & (pos >= 1) & (pos % 1 == 0) & (pos < 2**53) & ids.notna()
    return ids, pos.where(ok).astype("Int64")


# ---- reading ----------------------------------------------------------------------------------


def read_manifest(dataset_dir: Path) -> Manifest:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"no canonical dataset at {dataset_dir}: run `recsys data generate` (synthetic) or "
            "`recsys data load PATH` (MovieLens) first"
        )
    return Manifest(**json.loads(path.read_text()))


def table_path(dataset_dir: Path, table: str) -> Path:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}: choose from {TABLES}")
    return Path(dataset_dir) / table


def read_table(dataset_dir: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a whole canonical table into pandas (small data, tests, notebooks); the events with
    :data:`EVENTS_SCHEMA`, so an attribution column an older part lacks reads as null."""
    read_manifest(dataset_dir)
    schema = S.EVENTS_SCHEMA if table == "events" else None
    return pq.read_table(table_path(dataset_dir, table), columns=columns, schema=schema).to_pandas()


def events_dataset(dataset_dir: Path) -> pads.Dataset:
    """The events table as a pyarrow dataset with :data:`EVENTS_SCHEMA`, whatever its parts' tables
    version (pyarrow otherwise takes the schema of the first file it lists)."""
    return pads.dataset(table_path(dataset_dir, "events"), format="parquet", schema=S.EVENTS_SCHEMA)


def reference_time(dataset_dir: Path, as_of: datetime | None = None) -> datetime:
    """The platform's "now": ``as_of`` if given, else the dataset's latest event time (UTC)."""
    if as_of is not None:
        return as_of if as_of.tzinfo else as_of.replace(tzinfo=timezone.utc)
    latest = read_manifest(dataset_dir).max_event_time
    if latest is None:
        raise DatasetError(f"dataset {dataset_dir} has no events: pass --as-of to set the reference time")
    return latest
