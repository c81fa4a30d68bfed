"""The clickstream wire format, the producer every writer of the topic uses, and its decoder.

A message on ``clickstream.events`` has key = ``user_id`` (as ASCII digits, so one user's events
stay in one partition and in order) and value = the canonical event as JSON with a
``schema_version``; timestamps are ISO-8601 UTC with microseconds. Two optional fields carry
attribution, only when the client sent them: ``request_id`` (the /recommend answer that showed the
item) and ``position`` (1-based, where it showed it). The stream's fold ignores them; the offline
log keeps them in the events table's nullable columns of the same names (``recsys.schema``), and a
message without them (every older one) decodes as before and is logged with nulls there.

Public API for writers (``recsys events replay``, the service's ``POST /events``):

- :func:`new_event` builds a canonical event (fresh ``event_id``, ``now`` by default);
- :func:`check_event` raises :class:`InvalidEvent` with the same reason the stream would give;
- :class:`EventProducer` sends events keyed by user, one at a time or many at a chosen rate.

For readers (the stream consumer): :func:`decode_batch` turns raw message values into validated
columns and a reason for every message it rejects.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.canonical import event_reject_reasons, events_dataset
from recsys import schema as S

log = logging.getLogger(__name__)

#: Wire-format versions this code reads.
SUPPORTED_SCHEMA_VERSIONS = frozenset({S.SCHEMA_VERSION})

#: optional attribution fields of a message, the events table's nullable columns: the answer and the position
ATTR_REQUEST_ID = S.COL_REQUEST_ID
ATTR_POSITION = S.COL_POSITION
ATTRIBUTION_FIELDS = S.ATTRIBUTION_COLUMNS


class InvalidEvent(ValueError):
    """An event the platform refuses; ``reason`` is the dead-letter reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _iso(ts: Any) -> Any:
    if isinstance(ts, pd.Timestamp):
        ts = ts.to_pydatetime()
    if isinstance(ts, datetime):
        ts = (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")
    return ts


def event_to_message(event: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) bytes for one canonical event (a dict with the EVENTS_SCHEMA columns)."""
    value = event.get(S.COL_VALUE)
    body = {
        "schema_version": S.SCHEMA_VERSION,
        S.COL_EVENT_ID: event[S.COL_EVENT_ID],
        S.COL_USER: int(event[S.COL_USER]),
        S.COL_ITEM: int(event[S.COL_ITEM]),
        S.COL_EVENT_TYPE: event[S.COL_EVENT_TYPE],
        S.COL_VALUE: None if value is None or pd.isna(value) else float(value),
        S.COL_TS: _iso(event[S.COL_TS]),
        S.COL_SESSION: event.get(S.COL_SESSION),
        S.COL_CONTEXT: event.get(S.COL_CONTEXT) or {},
    }
    for name in ATTRIBUTION_FIELDS:  # optional: absent rather than null when the client sent none
        attr = event.get(name)
        if attr is not None and not (isinstance(attr, float) and math.isnan(attr)) and attr is not pd.NA:
            body[name] = int(attr) if name == ATTR_POSITION else attr
    return str(int(event[S.COL_USER])).encode(), json.dumps(body, separators=(",", ":")).encode()


def new_event(
    user_id: int,
    item_id: int,
    event_type: str,
    value: float | None = None,
    ts: datetime | None = None,
    session_id: str | None = None,
    context: Mapping[str, str] | None = None,
    event_id: str | None = None,
    request_id: str | None = None,
    position: int | None = None,
) -> dict[str, Any]:
    """A canonical event dict with a fresh unique ``event_id`` and ``ts`` = now (UTC) by default;
    ``request_id`` and ``position`` (attribution) are added only when given."""
    event: dict[str, Any] = {
        S.COL_EVENT_ID: event_id or uuid.uuid4().hex,
        S.COL_USER: user_id,
        S.COL_ITEM: item_id,
        S.COL_EVENT_TYPE: event_type,
        S.COL_VALUE: value,
        S.COL_TS: ts or datetime.now(timezone.utc),
        S.COL_SESSION: session_id,
        S.COL_CONTEXT: dict(context) if context else None,
    }
    if request_id is not None:
        event[ATTR_REQUEST_ID] = request_id
    if position is not None:
        event[ATTR_POSITION] = int(position)
    return event


# ---- decoding and validation (the stream's side) ---------------------------------------------------


@dataclass
class DecodedBatch:
    """Valid events as columns (``index`` = their positions in the input) and the rejected ones.

    Timestamps are epoch microseconds; ``value`` is NaN where the event has none.
    """

    index: np.ndarray
    event_id: list[str]
    user_id: np.ndarray
    item_id: np.ndarray
    event_type: list[str]
    value: np.ndarray
    ts_us: np.ndarray
    rejected: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.index)


def _parse(raw: bytes | None) -> dict[str, Any] | str:
    """The message as a dict, or why it cannot be one."""
    if not raw:
        return "empty message"
    try:
        body = orjson.loads(raw)  # strict RFC 8259, and faster than json.loads on the per-message path
    except orjson.JSONDecodeError:
        # what orjson refuses but Python's json reads (NaN, Infinity, integers beyond 64 bits,
        # lone surrogates) keeps the verdict it always had, and the rest their json reason
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad bytes, bad JSON, absurd nesting: never stop the stream
            return f"malformed JSON: {exc}"
    if not isinstance(body, dict):
        return f"malformed event: a JSON {type(body).__name__}, not an object"
    version = body.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        return f"unsupported schema_version {version!r} (this consumer reads {sorted(SUPPORTED_SCHEMA_VERSIONS)})"
    return body


_COLUMNS = (S.COL_EVENT_ID, S.COL_USER, S.COL_ITEM, S.COL_EVENT_TYPE, S.COL_VALUE, S.COL_TS)


def _validate_frame(rows: list[dict[str, Any]], known_items: np.ndarray | None,
                    max_ts: pd.Timestamp | None) -> tuple[pd.Series, pd.DataFrame]:
    frame = pd.DataFrame.from_records(rows, columns=list(_COLUMNS))
    # writers may drop the fraction or use an offset: parse any ISO-8601 form, not just the first row's
    frame[S.COL_TS] = pd.to_datetime(frame[S.COL_TS], utc=True, errors="coerce", format="ISO8601")
    for col in (S.COL_USER, S.COL_ITEM):  # ids must be JSON integers, not 1.5, "7" or true
        whole = [type(row.get(col)) is int for row in rows]
        frame[col] = frame[col].where(pd.Series(whole, index=frame.index), None)
    reason, user, item, value, ts = event_reject_reasons(frame, known_items, max_ts)
    parsed = pd.DataFrame({S.COL_USER: user, S.COL_ITEM: item, S.COL_VALUE: value, S.COL_TS: ts})
    return reason, parsed


_EVENT_TYPES = frozenset(S.EVENT_TYPES)
_RATING = S.EventType.RATING.value
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_Fields = tuple[int, str, int, int, str, float, int]  # position, event_id, user, item, type, value, ts_us


def _certainly_valid(i: int, body: dict[str, Any], max_us: int | None) -> _Fields | None:
    """The event's fields when every canonical rule surely passes (the usual case, without pandas);
    None when in any doubt: then :func:`event_reject_reasons` decides, and gives the reason."""
    eid, user, item = body.get(S.COL_EVENT_ID), body.get(S.COL_USER), body.get(S.COL_ITEM)
    etype, value, ts = body.get(S.COL_EVENT_TYPE), body.get(S.COL_VALUE), body.get(S.COL_TS)
    if type(eid) is not str or not eid or type(user) is not int or type(item) is not int or user < 0 or item < 0:
        return None
    if etype not in _EVENT_TYPES or type(ts) is not str:
        return None
    if value is None:
        if etype == _RATING:
            return None
        value = math.nan
    elif type(value) not in (int, float) or not (0 <= value < math.inf) or (etype == _RATING and not 0.5 <= value <= 5):
        return None
    try:
        parsed = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    delta = parsed - _EPOCH
    ts_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if max_us is not None and ts_us > max_us:
        return None
    return (i, eid, user, item, etype, float(value), ts_us)


def decode_batch(
    values: Sequence[bytes | None], known_items: np.ndarray | None = None, max_ts: pd.Timestamp | None = None
) -> DecodedBatch:
    """Decode and validate raw message values with the canonical rules (``validate_events``'s
    reasons), plus the wire's own: malformed JSON, not an object, unsupported schema_version."""
    rejected: list[tuple[int, str]] = []
    doubtful: list[tuple[int, dict[str, Any]]] = []
    fields: list[_Fields] = []
    bodies: list[dict[str, Any]] = []  # of the fields, for a second look
    max_us = None if max_ts is None else int(max_ts.value // 1000)
    for i, raw in enumerate(values):
        body = _parse(raw)
        if isinstance(body, str):
            rejected.append((i, body))
            continue
        sure = _certainly_valid(i, body, max_us)
        if sure is None:
            doubtful.append((i, body))
        else:
            fields.append(sure)
            bodies.append(body)
    if fields and known_items is not None:
        items = np.fromiter((f[3] for f in fields), dtype=np.int64, count=len(fields))
        pos = np.clip(np.searchsorted(known_items, items), 0, max(len(known_items) - 1, 0))
        known = (known_items[pos] == items) if len(known_items) else np.zeros(len(items), dtype=bool)
        if not known.all():
            doubtful.extend((fields[k][0], bodies[k]) for k in np.flatnonzero(~known).tolist())
            fields = [f for f, ok in zip(fields, known.tolist()) if ok]
    if doubtful:
        fields.extend(_judge(doubtful, known_items, max_ts, rejected))
        fields.sort()
    return DecodedBatch(
        index=np.fromiter((f[0] for f in fields), dtype=np.int64, count=len(fields)),
        event_id=[f[1] for f in fields],
        user_id=np.fromiter((f[2] for f in fields), dtype=np.int64, count=len(fields)),
        item_id=np.fromiter((f[3] for f in fields), dtype=np.int64, count=len(fields)),
        event_type=[f[4] for f in fields],
        value=np.fromiter((f[5] for f in fields), dtype=np.float64, count=len(fields)),
        ts_us=np.fromiter((f[6] for f in fields), dtype=np.int64, count=len(fields)),
        rejected=sorted(rejected),
    )


def _judge(doubtful: list[tuple[int, dict[str, Any]]], known_items: np.ndarray | None,
           max_ts: pd.Timestamp | None, rejected: list[tuple[int, str]]) -> list[_Fields]:
    """The canonical rules on the doubtful events: reasons into ``rejected``, the valid ones back."""
    rows = [body for _, body in doubtful]
    reason, parsed = _validate_frame(rows, known_items, max_ts)
    bad = reason.notna().to_numpy()
    good: list[_Fields] = []
    for k, ((i, body), is_bad) in enumerate(zip(doubtful, bad.tolist())):
        if is_bad:
            rejected.append((i, str(reason.iat[k])))
        else:
            value = parsed[S.COL_VALUE].iat[k]
            good.append((i, str(body[S.COL_EVENT_ID]), int(parsed[S.COL_USER].iat[k]), int(parsed[S.COL_ITEM].iat[k]),
                         str(body[S.COL_EVENT_TYPE]), math.nan if pd.isna(value) else float(value),
                         int(parsed[S.COL_TS].iat[k].value // 1000)))
    return good


def check_event(event: Mapping[str, Any], known_items: np.ndarray | None = None,
                max_ts: pd.Timestamp | None = None) -> None:
    """Raise :class:`InvalidEvent` if the stream would dead-letter this event (the same reasons)."""
    raw = json.dumps({"schema_version": S.SCHEMA_VERSION, **event}, default=_iso).encode()
    decoded = decode_batch([raw], known_items, max_ts)
    if decoded.rejected:
        raise InvalidEvent(decoded.rejected[0][1])


# ---- producing -------------------------------------------------------------------------------------


class EventProducer:
    """A kafka-python producer for canonical events, keyed by user (acks from the leader).

    ``send`` returns kafka-python's future; ``send_many`` sends an iterable in order, optionally
    at ``rate`` events per second. Use it as a context manager to flush and close.
    """

    def __init__(self, bootstrap: str, topic: str, headers: Sequence[tuple[str, bytes]] | None = None,
                 **kafka_options: Any) -> None:
        from kafka import KafkaProducer

        options: dict[str, Any] = {"acks": 1, "linger_ms": 5, "batch_size": 256 * 1024}
        options.update(kafka_options)
        self.topic = topic
        #: Kafka headers on every message (a replay of the offline log says so: pipelines.live_log)
        self.headers = list(headers) if headers else None
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, **options)

    def send(self, event: Mapping[str, Any]) -> Any:
        key, value = event_to_message(event)
        return self._producer.send(self.topic, key=key, value=value, headers=self.headers)

    def send_many(
        self,
        events: Iterable[Mapping[str, Any]],
        rate: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send ``events`` in order; ``rate`` (events/s) paces them, None or 0 = as fast as possible."""
        if rate is not None and rate < 0:
            raise ValueError(f"rate {rate} must be positive (events per second) or 0 for as fast as possible")
        pacer = _Pacer(rate) if rate else None
        n = 0
        for event in events:
            if pacer is not None:
                pacer.wait(n)
            self.send(event)
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(1000)
        if progress is not None and n % 1000:
            progress(n % 1000)
        return n

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *_: object) -> None:
        self.flush()
        self.close()


class _Pacer:
    """Keeps a sender on schedule: event ``n`` goes out no earlier than ``start + n / rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, n: int) -> None:
        delay = self.start + n / self.rate - time.monotonic()
        if delay > 0.001:  # sleep in slices of at least a millisecond, not per event
            time.sleep(delay)


def select_events(
    dataset_path: Path,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Canonical events in ``[start, end]``, the latest ``limit`` of them, oldest first (with every
    EVENTS_SCHEMA column: null attribution where a part predates it)."""
    dataset = events_dataset(Path(dataset_path))
    condition = None
    if start is not None:
        condition = pads.field(S.COL_TS) >= pa.scalar(start, S.TS_TYPE)
    if end is not None:
        upper = pads.field(S.COL_TS) <= pa.scalar(end, S.TS_TYPE)
        condition = upper if condition is None else condition & upper
    table = dataset.to_table(filter=condition)
    order = [(S.COL_TS, "ascending"), (S.COL_EVENT_ID, "ascending")]
    if limit is not None and table.num_rows > limit:
        table = table.sort_by([(S.COL_TS, "descending"), (S.COL_EVENT_ID, "descending")]).slice(0, limit)
    return table.sort_by(order)
