"""Impression logging of the service: every /recommend answer, cache hits included, is handed to a
bounded in-memory buffer on the request path and sent to ``recommendations.served`` by one
background thread (:class:`ImpressionLogger`).

The contract on the request path: :meth:`ImpressionLogger.log` never waits and never raises. It
puts a reference to the answer in the buffer (no encoding, no I/O, no lock held beyond the
queue's own); a full buffer drops the impression and counts it
(``recsys_impressions_dropped_total{reason="buffer_full"}``). The producer is made by the
background thread at start-up and again after a failure, never by a request; encoding and sending
happen there too. A send Kafka refuses is counted as ``kafka_error``. So a slow or dead Kafka costs
answers nothing but their impressions.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from bentos.answer import Recommendation
from bentos.metrics import METRICS
from pipelines.impressions import impression_message
from recsys.config import Settings

log = logging.getLogger(__name__)

#: the buffer holds (request_id, served_at epoch s, answer, arm)
_Entry = tuple[str, float, Recommendation, "str | None"]
_STOP = object()
#: waits between attempts to make the producer (Kafka down at start-up), capped at the last
_RETRY_S = (1.0, 2.0, 5.0, 10.0)


def kafka_producer(bootstrap: str) -> Any:
    """The producer of impressions: acks from the leader, small batches, bounded waits (it runs off
    the request path, but a dead broker must not hold the thread for long)."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_block_ms=2_000,
                         request_timeout_ms=5_000, bootstrap_timeout_ms=2_000, client_id="recsys-impressions")


class ImpressionLogger:
    """A bounded buffer of answers and the thread that sends them to ``topic``."""

    def __init__(self, topic: str, buffer: int, make_producer: Callable[[], Any], enabled: bool = True) -> None:
        if buffer < 1:
            raise ValueError(f"impression buffer={buffer} must be >= 1 (RECSYS_IMPRESSIONS_BUFFER)")
        self.topic = topic
        self.enabled = enabled
        self._make_producer = make_producer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=buffer)
        self._producer: Any = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="impressions")
        if enabled:
            self._thread.start()

    def log(self, rec: Recommendation, request_id: str, arm: str | None = None) -> None:
        """Queue one answer's impression: O(1), never waits, never raises."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait((request_id, time.time(), rec, arm))
        except queue.Full:
            METRICS.impressions_dropped.labels(reason="buffer_full").inc()

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what the buffer holds (within ``timeout_s``) and stop the thread."""
        if not self._thread.is_alive():
            return
        self._closing.set()
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)

    # ---- the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._connect()
        while True:
            entry = self._queue.get()
            if entry is _STOP:
                break
            if self._producer is None:
                self._connect()
            if self._producer is None:  # closing while Kafka is down
                METRICS.impressions_dropped.labels(reason="kafka_error").inc()
                continue
            self._send(entry)
        if self._producer is not None:
            self._producer.flush(timeout=2.0)

    def _connect(self) -> None:
        """Make the producer, retrying with growing waits until it works or the logger closes;
        meanwhile answers fill the buffer, and those beyond it are dropped (counted)."""
        attempt = 0
        while self._producer is None and not self._closing.is_set():
            try:
                self._producer = self._make_producer()
                log.info("impressions: producing to %s", self.topic)
            except Exception as exc:  # noqa: BLE001 - any failure to reach Kafka: retry, never give up
                wait = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                log.warning("impressions: Kafka unreachable (%s); retrying in %.0f s", exc, wait)
                attempt += 1
                self._closing.wait(wait)

    def _send(self, entry: _Entry) -> None:
        request_id, served_at, rec, arm = entry
        key, value = impression_message(request_id, rec.user_id, served_at, rec.items, rec.model_versions,
                                        rec.cold_start, rec.cached, rec.degraded, arm)
        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except Exception as exc:  # noqa: BLE001 - a full producer buffer or a dead broker: drop, reconnect later
            METRICS.impressions_dropped.labels(reason="kafka_error").inc()
            log.warning("impressions: send failed (%s)", exc)
            return
        future.add_callback(lambda _: METRICS.impressions_sent.inc())
        future.add_errback(lambda _: METRICS.impressions_dropped.labels(reason="kafka_error").inc())


def impression_logger(settings: Settings) -> ImpressionLogger:
    """The service's logger from :class:`recsys.config.Settings`: the impressions topic, the buffer
    (``RECSYS_IMPRESSIONS_BUFFER``), on or off (``RECSYS_IMPRESSIONS``)."""
    bootstrap = settings.effective_kafka_bootstrap
    return ImpressionLogger(settings.impressions_topic, settings.impressions_buffer,
                            lambda: kafka_producer(bootstrap), enabled=settings.impressions == "on")
