"""Benchmark: the clickstream consumer's throughput and event-to-online freshness.

Run: ``python -m benchmarks.stream`` -> ``benchmarks/results/stream.json`` and ``.md`` with

- ``events_per_s``: one consumer process folding a pre-filled topic (synthetic events) into the
  online store (one Redis transaction per micro-batch: online rows, states, outbox, trending), from
  its first batch to its last;
- ``freshness_p50_ms`` / ``freshness_p99_ms``: while a producer process sends a steady
  ``--rate`` (5,000) events/s, the time from each event's Kafka create time (stamped by the
  producer when it sends the event, which it builds with event time = now) to the moment the
  transaction that writes its batch's online rows has returned, i.e. when a Feast online read
  sees the event. ``producer_rate`` is the rate the producer really sent at (its own clock).

It starts its own Redis and Kafka on free ports and its own synthetic dataset and Feast registry
in a temporary folder, so it never touches the demo's stack. The offline appends run with the
default settings (in the background, every 60 s or 100,000 rows), as in production.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import write_results
from recsys.config import Settings
from recsys.logs import configure_logging

log = logging.getLogger(__name__)


def _workspace(tmp: Path) -> Settings:
    from pipelines import feature_store as fs
    from pipelines.generator import GeneratorConfig, generate
    from pipelines.stack import LocalStack, free_port

    settings = Settings(data_dir=tmp / "data", run_dir=tmp / "run", dataset="bench", feast_project="bench",
                        redis_port=free_port(), kafka_port=free_port(), mlflow_port=free_port())
    LocalStack(settings).up(["redis", "kafka"])
    generate(GeneratorConfig(n_users=10_000, n_items=5_000), settings.dataset_path, progress=False)
    fs.apply(settings)
    return settings


def _topic(settings: Settings, name: str) -> Settings:
    from pipelines.stack import ensure_topics

    scoped = settings.with_overrides(events_topic=name, dlq_topic=f"{name}.dlq", stream_group_id=f"g-{name}")
    ensure_topics(scoped)
    return scoped


def bench_throughput(settings: Settings, n_events: int) -> dict[str, float]:
    """Pre-fill a topic with the latest ``n_events`` synthetic events, then consume it to the end."""
    from pipelines.events import EventProducer, select_events
    from pipelines.stream import StreamOptions, StreamProcessor

    scoped = _topic(settings, f"through-{uuid.uuid4().hex[:6]}")
    table = select_events(settings.dataset_path, limit=n_events)
    started = time.perf_counter()
    with EventProducer(scoped.effective_kafka_bootstrap, scoped.events_topic) as producer:
        for chunk in table.to_batches(max_chunksize=20_000):
            producer.send_many(chunk.to_pylist())
    log.info("pre-filled %d events in %.1fs", table.num_rows, time.perf_counter() - started)
    stats = StreamProcessor(scoped, StreamOptions.from_settings(scoped, stop_when_caught_up=True)).run()
    seconds = (stats.last_batch_at or 0.0) - (stats.first_batch_at or 0.0)
    log.info("consumed %d events in %.1fs (%d batches, %d online rows)", stats.events, seconds, stats.batches,
             stats.rows_online)
    return {"events": stats.events, "seconds": round(seconds, 2), "events_per_s": round(stats.events / seconds),
            "batches": stats.batches, "online_rows": stats.rows_online,
            "users_per_batch": round(stats.rows_online / max(stats.batches, 1))}


def _steady_producer(bootstrap: str, topic: str, rate: float, seconds: float, n_users: int, n_items: int,
                     sent: Any = None) -> None:
    """Send ``rate`` events/s for ``seconds``, stamped now (a separate process, like a real site);
    puts the seconds from the first send to the last acknowledged one on ``sent``."""
    from pipelines.events import EventProducer, new_event

    rng = np.random.default_rng(0)
    total = int(rate * seconds)
    users = rng.integers(1, n_users + 1, total).tolist()
    items = rng.integers(1, n_items + 1, total).tolist()
    with EventProducer(bootstrap, topic) as producer:
        events = (new_event(u, i, "VIEW", ts=datetime.now(timezone.utc)) for u, i in zip(users, items))
        started = time.perf_counter()
        producer.send_many(events, rate=rate)
        producer.flush()
        if sent is not None:
            sent.put(time.perf_counter() - started)


def bench_freshness(settings: Settings, rate: float, seconds: float) -> dict[str, float]:
    from pipelines.stream import StreamOptions, StreamProcessor

    scoped = _topic(settings, f"fresh-{uuid.uuid4().hex[:6]}")
    processor = StreamProcessor(scoped, StreamOptions.from_settings(scoped, record_freshness=True))
    thread = threading.Thread(target=processor.run, name="consumer")
    thread.start()
    if not processor.assigned.wait(120):
        raise RuntimeError("the consumer got no partitions within 120 s")
    context = multiprocessing.get_context("spawn")
    sent = context.Queue()
    producer = context.Process(target=_steady_producer, args=(
        scoped.effective_kafka_bootstrap, scoped.events_topic, rate, seconds, 10_000, 5_000, sent))
    producer.start()
    sent_for = sent.get(timeout=seconds * 10 + 120)  # the producer's own sending time, not its start-up
    producer.join()
    deadline = time.monotonic() + 60
    while processor.stats.events < int(rate * seconds) and time.monotonic() < deadline:
        time.sleep(0.1)
    processor.request_stop()
    thread.join()
    p50, p99, p999 = processor.stats.freshness_percentiles(50, 99, 99.9)
    log.info("freshness at %.0f events/s for %.0fs: p50 %.0f ms, p99 %.0f ms", rate, sent_for, p50, p99)
    # the percentiles cover every event sent unless the consumer was still more than 60 s behind at
    # the end: those are counted in freshness_unconsumed (their freshness would be worse)
    total = int(rate * seconds)
    return {"freshness_events": processor.stats.events, "freshness_unconsumed": max(total - processor.stats.events, 0),
            "producer_rate": round(total / sent_for),
            "freshness_p50_ms": round(p50, 1), "freshness_p99_ms": round(p99, 1), "freshness_p999_ms": round(p999, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="Pre-filled events for the throughput run.")
    parser.add_argument("--rate", type=float, default=5_000, help="Producer rate for the freshness run (events/s).")
    parser.add_argument("--seconds", type=float, default=30, help="Length of the freshness run.")
    args = parser.parse_args()
    configure_logging()
    from pipelines.stack import LocalStack

    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        settings = _workspace(Path(tmp))
        try:
            numbers: dict[str, float] = {**bench_throughput(settings, args.events),
                                         **bench_freshness(settings, args.rate, args.seconds)}
        finally:
            LocalStack(settings).down()
    numbers["load_average_1m_at_start"] = load_at_start
    numbers["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    rows = [(k, f"{v:,}" if isinstance(v, int) else str(v)) for k, v in numbers.items()]
    notes = (f"Throughput: the latest {args.events:,} events of the synthetic default (10,000 users, 5,000 items) "
             "pre-filled into a 4-partition topic, one consumer process with the default settings "
             "(micro-batches of up to 5,000 events, one Redis transaction per batch for the online rows and the "
             "states, offline appends in the background). "
             f"Freshness: a producer process sends VIEW events stamped now at {args.rate:,.0f}/s "
             f"for {args.seconds:.0f}s "
             "(each to a random one of 10,000 users); freshness = end of the transaction that writes the event's "
             "online row minus the Kafka create time (stamped at send). "
             "The machine is shared: see load_average_1m_at_start / _at_end.")
    path = write_results("stream", numbers, rows, notes)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
