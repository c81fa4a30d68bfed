"""Impressions: what ``/recommend`` served. Their wire format on ``recommendations.served`` (the
service encodes, the sink decodes), the offline ``impressions`` table's schema, its writer (one
file per Kafka partition and offset range, so a rewrite replaces, never duplicates) and its reader.

A message has key = ``user_id`` (ASCII digits) and value = JSON with a ``schema_version``::

    {"schema_version": 1, "request_id": "…", "user_id": 42, "served_at": "2026-01-04T10:00:00.000000Z",
     "items": [{"item_id": 7, "score": 0.91, "strategy": "als"}, …],   # position p is items[p-1]
     "model_versions": {"index": "item_index:…", …}, "arm": null,
     "cold_start": false, "cached": true, "degraded": false}

The table lives under the dataset, ``<dataset>/impressions/date=YYYY-MM-DD/`` (the UTC date of
``served_at``), one row per answer with the shown items as aligned lists (positions 1-based).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recsys import schema as S

log = logging.getLogger(__name__)

IMPRESSIONS_SCHEMA_VERSION = 1
IMPRESSIONS_TABLE = "impressions"
DATE_COLUMN = "date"  # the hive partition column (UTC date of served_at)

IMPRESSIONS_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field(S.COL_USER, pa.int64(), nullable=False),
    pa.field("served_at", S.TS_TYPE, nullable=False),
    pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("positions", pa.list_(pa.int32()), nullable=False),  # 1-based, aligned with item_ids
    pa.field("scores", pa.list_(pa.float64()), nullable=False),
    pa.field("strategies", pa.list_(pa.string()), nullable=False),
    pa.field("model_versions", pa.map_(pa.string(), pa.string()), nullable=False),
    pa.field("arm", pa.string()),  # null until A/B arms exist
    pa.field("cold_start", pa.bool_(), nullable=False),
    pa.field("cached", pa.bool_(), nullable=False),
    pa.field("degraded", pa.bool_(), nullable=False),
])


# ---- the wire format -------------------------------------------------------------------------------


def new_request_id() -> str:
    """A fresh, unique id for one answer (32 hex characters)."""
    return uuid.uuid4().hex


def impression_message(request_id: str, user_id: int, served_at: float, items: Sequence[Mapping[str, Any]],
                       model_versions: Mapping[str, str], cold_start: bool, cached: bool, degraded: bool,
                       arm: str | None = None) -> tuple[bytes, bytes]:
    """(key, value) bytes of one answer; ``served_at`` in epoch seconds, ``items`` best first, each
    with ``item_id``, ``score`` and ``strategy`` (what the answer returned)."""
    stamp = datetime.fromtimestamp(served_at, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    body = {"schema_version": IMPRESSIONS_SCHEMA_VERSION, "request_id": request_id, S.COL_USER: int(user_id),
            "served_at": stamp,
            "items": [{S.COL_ITEM: int(i[S.COL_ITEM]), "score": float(i["score"]), "strategy": str(i["strategy"])}
                      for i in items],
            "model_versions": dict(model_versions), "arm": arm, "cold_start": bool(cold_start),
            "cached": bool(cached), "degraded": bool(degraded)}
    return str(int(user_id)).encode(), orjson.dumps(body)


def decode_impression(raw: bytes | None) -> dict[str, Any]:
    """One message as a table row (without the date column). Raises ValueError naming what is wrong."""
    try:
        body = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed impression JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("schema_version") != IMPRESSIONS_SCHEMA_VERSION:
        raise ValueError(f"not an impression of schema_version {IMPRESSIONS_SCHEMA_VERSION}: {str(body)[:200]}")
    try:
        items = body["items"]
        return {"request_id": str(body["request_id"]), S.COL_USER: int(body[S.COL_USER]),
                "served_at": datetime.fromisoformat(body["served_at"]),
                "item_ids": [int(i[S.COL_ITEM]) for i in items], "positions": list(range(1, len(items) + 1)),
                "scores": [float(i["score"]) for i in items], "strategies": [str(i["strategy"]) for i in items],
                "model_versions": [(str(k), str(v)) for k, v in (body.get("model_versions") or {}).items()],
                "arm": body.get("arm"), "cold_start": bool(body["cold_start"]), "cached": bool(body["cached"]),
                "degraded": bool(body["degraded"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"impression {body.get('request_id')!r} lacks or mistypes a field: {exc!r}") from exc


# ---- the offline table -----------------------------------------------------------------------------


def impressions_path(dataset_path: Path) -> Path:
    """The table's folder under a dataset (``<dataset>/impressions``)."""
    return Path(dataset_path) / IMPRESSIONS_TABLE


def incarnation_tag(topic_id: str) -> str:
    """A short tag of the topic's incarnation for file names: offsets restart when a topic is
    re-created (the local broker keeps topics in memory), and must not overwrite older files."""
    return hashlib.sha1(topic_id.encode()).hexdigest()[:8] if topic_id else "0"


_PART = re.compile(r"^part-(?P<tag>[0-9a-f]+)-p(?P<p>\d+)-(?P<start>\d+)-(?P<end>\d+)\.parquet$")


def _name(tag: str, partition: int, start: int, end: int) -> str:
    return f"part-{tag}-p{partition:04d}-{start:015d}-{end:015d}.parquet"


def write_batch(root: Path, tag: str, partition: int, start: int, end: int, rows: Sequence[dict[str, Any]]) -> int:
    """Write the rows of Kafka offsets ``start..end`` of one partition, one file per date.

    Files take a fixed name from (incarnation, partition, start, end): writing the same range again
    replaces them. All files are written under hidden temporary names first (readers skip names
    starting with a dot) and renamed after: the first rename is the commit point, and
    :func:`recover` finishes or discards a batch that a crash interrupted. Returns the rows written."""
    by_date: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_date.setdefault(row["served_at"].astimezone(timezone.utc).date().isoformat(), []).append(row)
    name = _name(tag, partition, start, end)
    staged: list[tuple[Path, Path]] = []
    for date, part in sorted(by_date.items()):
        folder = root / f"{DATE_COLUMN}={date}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(part, schema=IMPRESSIONS_SCHEMA), tmp, coerce_timestamps="us")
        staged.append((tmp, folder / name))
    for tmp, final in staged:
        os.replace(tmp, final)
    return len(rows)


def recover(root: Path) -> None:
    """Finish or discard the batch a crash interrupted: its staged files are all complete once any
    of them was renamed (renames start after every write), so rename the rest; with none renamed
    the batch was never committed: delete them (the sink reads those offsets again)."""
    if not root.is_dir():
        return
    finals = {p.name for p in root.glob("date=*/part-*.parquet")}
    for tmp in root.glob("date=*/.part-*.parquet.tmp"):
        name = tmp.name[1:-len(".tmp")]
        if name in finals:
            os.replace(tmp, tmp.with_name(name))
            log.info("impressions: finished the interrupted write of %s", tmp.with_name(name))
        else:
            tmp.unlink()


def written_offsets(root: Path, tag: str) -> dict[int, int]:
    """Per partition, the last Kafka offset of this incarnation already in the table."""
    ends: dict[int, int] = {}
    if root.is_dir():
        for path in root.glob("date=*/part-*.parquet"):
            m = _PART.match(path.name)
            if m and m["tag"] == tag:
                p, end = int(m["p"]), int(m["end"])
                ends[p] = max(ends.get(p, -1), end)
    return ends


def read_impressions(root: Path, dedupe: bool = True) -> pa.Table:
    """The table (with its ``date`` column), oldest first; ``dedupe`` keeps one row per request_id
    (a producer's retry can put an answer on the topic twice: the table holds each message once)."""
    if not root.is_dir() or not any(root.glob("date=*/part-*.parquet")):
        return IMPRESSIONS_SCHEMA.append(pa.field(DATE_COLUMN, pa.string())).empty_table()
    partitioning = pads.partitioning(pa.schema([(DATE_COLUMN, pa.string())]), flavor="hive")
    table = pads.dataset(root, format="parquet", partitioning=partitioning).to_table()
    table = table.sort_by([("served_at", "ascending"), ("request_id", "ascending")])
    if dedupe and table.num_rows:
        ids = table["request_id"].to_pylist()
        seen: set[str] = set()
        keep = [not (i in seen or seen.add(i)) for i in ids]  # type: ignore[func-returns-value]
        table = table.filter(pa.array(keep))
    return table
