"""Experiments for tests: a dataset with an events table and an impressions table written by the
real writers (the canonical writer; the impressions wire format and table writer), and an
experiment file whose salt puts given users in given arms."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from bentos.experiments import Experiment
from pipelines.canonical import CanonicalWriter
from pipelines.impressions import decode_impression, impression_message, impressions_path, write_batch
from recsys import schema as S

#: 2026-01-04 10:00:00 UTC, the time of the hand-built answers
T0 = datetime(2026, 1, 4, 10, 0, tzinfo=timezone.utc).timestamp()


def answer(request_id: str, user: int, served_at: float, items: Sequence[int], arm: str | None,
           experiment: str | None) -> dict[str, Any]:
    """One impression row as the sink writes it: encoded and decoded by the wire format."""
    shown = [{"item_id": i, "score": 0.5, "strategy": "als"} for i in items]
    versions = {"index": "item_index:t", **({"experiment": experiment} if experiment else {})}
    _, value = impression_message(request_id, user, served_at, shown, versions, cold_start=False, cached=False,
                                  degraded=False, arm=arm)
    return decode_impression(value)


def event(user: int, item: int, kind: str, at: float, **extra: Any) -> dict[str, Any]:
    return {S.COL_EVENT_ID: uuid.uuid4().hex, S.COL_USER: user, S.COL_ITEM: item, S.COL_EVENT_TYPE: kind,
            S.COL_VALUE: None, S.COL_TS: datetime.fromtimestamp(at, timezone.utc), S.COL_SESSION: None,
            S.COL_CONTEXT: None, **extra}


def write_dataset(dataset: Path, events: Sequence[Mapping[str, Any]],
                  batches: Sequence[Sequence[dict[str, Any]]]) -> None:
    """The events through the canonical writer, then each batch of impressions as one sink write
    (partition 0, consecutive offsets), so a row repeated in two batches is a duplicate message."""
    with CanonicalWriter(dataset, source="test") as writer:
        writer.add_events(pa.Table.from_pylist(list(events), schema=S.EVENTS_SCHEMA))
    offset = 0
    for rows in batches:
        write_batch(impressions_path(dataset), "t", 0, offset, offset + len(rows) - 1, rows)
        offset += len(rows)


def experiment_file(path: Path, arms: Sequence[tuple[str, float, str]], wanted: Mapping[int, str],
                    name: str = "test-exp", models: Mapping[str, Mapping[str, str]] | None = None) -> Experiment:
    """Write an experiment with ``arms`` ((name, share, mode)), the arms named in ``models``
    pinning those models (``{"item_index": tag}``), whose salt (the first of ``salt-0``,
    ``salt-1``, ... that fits) puts each user of ``wanted`` in its arm; returns it."""
    pins = dict(models or {})
    declared = [{"name": a, "share": s, "mode": m, **({"models": dict(pins[a])} if a in pins else {})}
                for a, s, m in arms]
    for n in range(100_000):
        exp = Experiment.model_validate({"name": name, "salt": f"salt-{n}", "arms": declared})
        if all(exp.assign(u).name == arm for u, arm in wanted.items()):
            path.write_text(json.dumps(exp.model_dump(mode="json")))
            return exp
    raise RuntimeError(f"no salt puts {dict(wanted)} in those arms: ask for fewer users")


def served_impression(bootstrap: str, topic: str, request_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """The impression of answer ``request_id`` on ``topic``, decoded: read from the start of every
    partition (no consumer group to join), until found or ``timeout_s`` passes (then AssertionError)."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=1_000, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
                consumer.seek_to_beginning()
                for message in consumer:
                    row = decode_impression(message.value)
                    if row["request_id"] == request_id:
                        return row
            time.sleep(0.2)
    finally:
        consumer.close()
    raise AssertionError(f"no impression of {request_id} on {topic} within {timeout_s} s")
