"""Live rows appended to a dataset's canonical tables while the platform runs: the events the stream
applied (:func:`append_live_events`), the items added through the service (:func:`append_live_item`),
and what they add up to (:func:`live_summary`, for ``recsys data info``).

The appended files sit beside the writer's parts, flat in the table's folder and with the table's
schema, so every reader of a table (Spark, pyarrow datasets, pandas) reads them without a change.
They are not in Hive partition folders: Spark's partition discovery reads only the files at one
level when a folder holds both files and ``key=value`` folders (tried: the writer's root parts
vanished from ``spark.read.parquet``). A live events file holds one UTC date, named by it::

    events/live-<YYYY-MM-DD>-<key>.parquet     the stream's events of that date (``key``: see below)
    items/live-item-<item_id>.parquet          one item added while serving

Every file is written under a hidden temporary name (readers skip names starting with ``.``) and
renamed into place, so a reader never sees half a file, and the same name written again replaces
the file whole. That makes the appends idempotent: the stream names its files by the outbox
entries they hold (:func:`pipelines.stream.flush.flush_outboxes` says how), an item by its id.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.canonical import validate_events
from recsys import schema as S

log = logging.getLogger(__name__)

#: A Kafka header on a message that replays an event the offline log already holds (``recsys events
#: replay``, the demo's replay of the dataset's tail): the stream folds it but does not log it again.
REPLAY_HEADER = "recsys-replay"
#: the headers a replay's producer sends (``EventProducer(..., headers=REPLAY_HEADERS)``)
REPLAY_HEADERS = ((REPLAY_HEADER, b"1"),)
LIVE_PREFIX = "live-"
ITEM_PREFIX = "live-item-"
_CONTEXT_KEYS = tuple(f.name for f in S.CONTEXT_TYPE)


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a hidden temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # coerce_timestamps keeps microseconds: Spark 4 rejects nanosecond parquet timestamps
        pq.write_table(table, tmp, coerce_timestamps="us", compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _context(value: Any) -> dict[str, str] | None:
    """The canonical context struct of a wire context: its known keys, as text (others dropped)."""
    if not isinstance(value, Mapping):
        return None
    return {k: str(value[k]) for k in _CONTEXT_KEYS if value.get(k) is not None}


def events_frame(messages: Iterable[str | bytes]) -> pd.DataFrame:
    """Wire events (the JSON message values) as raw canonical rows: every EVENTS_SCHEMA column, a
    missing one as null, so nullable columns a newer schema adds flow through."""
    rows = [json.loads(m) for m in messages]
    frame = pd.DataFrame.from_records(rows, columns=list(S.EVENTS_SCHEMA.names))
    # writers may drop the fraction or use an offset: any ISO-8601 form, not only the first row's
    frame[S.COL_TS] = pd.to_datetime(frame[S.COL_TS], utc=True, errors="coerce", format="ISO8601")
    frame[S.COL_CONTEXT] = frame[S.COL_CONTEXT].map(_context).astype(object)
    return frame


def append_live_events(dataset_dir: Path, messages: Sequence[str | bytes], key: str) -> int:
    """Validate wire events with the canonical rules (:func:`validate_events`) and write them to the
    dataset's events table, one file per UTC date named ``live-<date>-<key>.parquet`` (sorted by
    user, then time). Writing the same ``key`` again replaces those files: the caller makes ``key``
    name the events' source, so a retry of the same events never doubles them. Rows that fail
    validation (the stream validated them already, so none should) go to ``rejects/`` under the
    same key. Returns the events written."""
    if not messages:
        return 0
    events_dir = Path(dataset_dir) / "events"
    if not events_dir.is_dir():
        raise FileNotFoundError(f"no events table at {events_dir}: run `recsys data generate` or "
                                "`recsys data load PATH` first")
    events, rejects = validate_events(events_frame(messages))
    if rejects.num_rows:
        log.warning("%d live events failed the canonical rules: kept in %s", rejects.num_rows,
                    Path(dataset_dir) / "rejects")
        _write_atomic(rejects, Path(dataset_dir) / "rejects" / f"{LIVE_PREFIX}{key}.parquet")
    if not events.num_rows:
        return 0
    events = events.sort_by([(S.COL_USER, "ascending"), (S.COL_TS, "ascending")]).replace_schema_metadata(None)
    dates = pc.strftime(events.column(S.COL_TS), format="%Y-%m-%d")
    for date in sorted(set(dates.to_pylist())):
        part = events.filter(pc.equal(dates, date))
        _write_atomic(part, events_dir / f"{LIVE_PREFIX}{date}-{key}.parquet")
    return events.num_rows


# ---- items ------------------------------------------------------------------------------------------


def _writer_item_ids(items_dir: Path) -> pa.Array:
    """Item ids of the dataset writer's parts (not the live ones)."""
    parts = [p for p in sorted(items_dir.glob("*.parquet")) if not p.name.startswith(LIVE_PREFIX)]
    if not parts:
        return pa.array([], pa.int64())
    return pa.concat_arrays([pq.read_table(p, columns=[S.COL_ITEM]).column(0).combine_chunks() for p in parts])


def append_live_item(dataset_dir: Path, item: Mapping[str, Any]) -> Path | None:
    """Write one item added while serving to the dataset's items table, as
    ``items/live-item-<item_id>.parquet``; returns the file, or None when the dataset's own parts
    already hold the id (the table keeps that row). Idempotent per item id, and safe with several
    writers: each writes the whole file under a temporary name and renames it into place, so the
    id's latest row replaces its file and no reader sees two rows for it."""
    items_dir = Path(dataset_dir) / "items"
    if not items_dir.is_dir():
        raise FileNotFoundError(f"no items table at {items_dir}: run `recsys data generate` or "
                                "`recsys data load PATH` first")
    row = {name: item.get(name) for name in S.ITEMS_SCHEMA.names}
    item_id = int(row[S.COL_ITEM])
    if pc.any(pc.equal(_writer_item_ids(items_dir), item_id)).as_py():
        return None
    created = row[S.COL_CREATED_AT]
    row[S.COL_CREATED_AT] = datetime.fromisoformat(created) if isinstance(created, str) else created
    row["tags"] = list(row.get("tags") or [])
    path = items_dir / f"{ITEM_PREFIX}{item_id}.parquet"
    _write_atomic(pa.Table.from_pylist([row], schema=S.ITEMS_SCHEMA), path)
    return path


# ---- what the live files add up to ------------------------------------------------------------------


@dataclass(frozen=True)
class LiveSummary:
    """The live rows of a dataset: the stream's events (files, rows, time range) and added items."""

    event_files: int
    events: int
    min_event_ts: str | None
    max_event_ts: str | None
    items: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_summary(dataset_dir: Path) -> LiveSummary:
    """Count the live files from their parquet footers (no data read): the events the stream
    appended (rows of ``events/live-*.parquet``), their time range, and the items added."""
    files = sorted((Path(dataset_dir) / "events").glob(f"{LIVE_PREFIX}*.parquet"))
    rows, lo, hi = 0, None, None
    for path in files:
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        column = meta.schema.names.index(S.COL_TS)
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            if stats is not None and stats.has_min_max:
                lo = stats.min if lo is None else min(lo, stats.min)
                hi = stats.max if hi is None else max(hi, stats.max)
    items = len(list((Path(dataset_dir) / "items").glob(f"{ITEM_PREFIX}*.parquet")))

    return LiveSummary(len(files), rows, _iso(lo), _iso(hi), items)


def _iso(ts: Any) -> str | None:
    """A footer statistic (a datetime, naive for UTC) as ISO-8601 UTC."""
    if ts is None:
        return None
    stamp = pd.Timestamp(ts)
    return (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")).isoformat()
