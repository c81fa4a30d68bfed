"""The clickstream wire format and the producer that every writer of the topic uses.

A message on ``clickstream.events`` has key = ``user_id`` (as ASCII digits, so one user's events
stay in one partition and in order) and value = the canonical event as JSON with a
``schema_version``; timestamps are ISO-8601 UTC with microseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from recsys import schema as S

log = logging.getLogger(__name__)


def event_to_message(event: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) bytes for one canonical event (a dict with the EVENTS_SCHEMA columns)."""
    ts = event[S.COL_TS]
    if isinstance(ts, pd.Timestamp):
        ts = ts.to_pydatetime()
    if isinstance(ts, datetime):
        ts = (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        ts = ts.isoformat(timespec="microseconds").replace("+00:00", "Z")
    value = event.get(S.COL_VALUE)
    body = {
        "schema_version": S.SCHEMA_VERSION,
        S.COL_EVENT_ID: event[S.COL_EVENT_ID],
        S.COL_USER: int(event[S.COL_USER]),
        S.COL_ITEM: int(event[S.COL_ITEM]),
        S.COL_EVENT_TYPE: event[S.COL_EVENT_TYPE],
        S.COL_VALUE: None if value is None or pd.isna(value) else float(value),
        S.COL_TS: ts,
        S.COL_SESSION: event.get(S.COL_SESSION),
        S.COL_CONTEXT: event.get(S.COL_CONTEXT) or {},
    }
    return str(int(event[S.COL_USER])).encode(), json.dumps(body, separators=(",", ":")).encode()


class EventProducer:
    """A thin kafka-python producer for canonical events (keyed by user, acks from the leader)."""

    def __init__(self, bootstrap: str, topic: str, **kafka_options: Any) -> None:
        from kafka import KafkaProducer

        options: dict[str, Any] = {"acks": 1, "linger_ms": 5, "batch_size": 256 * 1024}
        options.update(kafka_options)
        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, **options)

    def send(self, event: Mapping[str, Any]) -> Any:
        key, value = event_to_message(event)
        return self._producer.send(self.topic, key=key, value=value)

    def send_many(self, events: Iterable[Mapping[str, Any]]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
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
