"""Impression logging of the service: every /recommend answer, cache hits included, is handed to a
bounded in-memory buffer on the request path and sent to ``recommendations.served`` by one
background thread (:class:`ImpressionLogger`).

The contract on the request path: :meth:`ImpressionLogger.log` never waits and never raises. It
puts a reference to the answer in the buffer (no encoding, no I/O, no lock held beyond the
queue's own); a full buffer drops the impression and counts it
(``recsys_impressions_dropped_total{reason="buffer_full"}``), as does a full producer queue (Kafka
away: see :func:`kafka_producer`). The producer is made by the
background thread at start-up and again after a failure, never by a request; encoding and sending
happen there too. A send Kafka refuses, or one not delivered within the producer's message timeout,
is counted as ``kafka_error``. So a slow or dead Kafka costs answers nothing but their impressions.

The producer is librdkafka's (``confluent-kafka``), not kafka-python's: a worker serves the hit
path in about a millisecond of Python, and kafka-python's sender does its batching, framing and
response handling in Python under the same interpreter lock (several hundred microseconds of CPU
per message when answers arrive one at a time), which showed up in the hit path's p99.
librdkafka's ``produce`` only copies the message into its C queue; its own threads batch and send
without the lock.
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


#: librdkafka's settings: acks from the leader, batches of up to 50 ms, and a message timeout after
#: which an undelivered impression is dropped and counted (its local queue: see kafka_producer)
PRODUCER_CONFIG: dict[str, Any] = {"acks": 1, "linger.ms": 50, "message.timeout.ms": 30_000,
                                   "socket.timeout.ms": 5_000, "client.id": "recsys-impressions"}
#: the thread's longest wait for an answer before it serves the producer's delivery callbacks
_POLL_S = 0.5


def _kafka_error(err: Any) -> None:
    """librdkafka's client-level errors (a broker down, a failed connection): it retries by itself."""
    log.warning("impressions: Kafka: %s", err)


def kafka_producer(bootstrap: str, buffer: int = 10_000) -> Any:
    """The producer of impressions (see the module's docstring for why librdkafka). Its local queue
    holds at most ``buffer`` impressions not yet acknowledged (``RECSYS_IMPRESSIONS_BUFFER``, the
    same bound as the logger's own buffer): with Kafka away, that many wait and the rest are
    dropped as ``buffer_full``."""
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "error_cb": _kafka_error,
                     "queue.buffering.max.messages": buffer, **PRODUCER_CONFIG})


def _delivered(err: Any, _msg: Any) -> None:
    """Delivery report, called from the logger's thread by ``poll``/``flush``."""
    if err is None:
        METRICS.impressions_sent.inc()
    else:
        METRICS.impressions_dropped.labels(reason="kafka_error").inc()


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
            # what is still undelivered after the wait is lost with the process: count it
            left = self._producer.flush(timeout_s)
            if left:
                METRICS.impressions_dropped.labels(reason="kafka_error").inc(left)

    # ---- the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._connect()
        while True:
            try:
                entry = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                break
            if self._producer is None:
                self._connect()
            if self._producer is None:  # closing while the producer cannot be made
                if entry is not None:
                    METRICS.impressions_dropped.labels(reason="kafka_error").inc()
                continue
            if entry is not None:
                self._send(entry)
            self._producer.poll(0)  # delivery reports of earlier sends; never waits

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
            self._producer.produce(self.topic, key=key, value=value, on_delivery=_delivered)
        except BufferError:  # librdkafka's queue is full: Kafka is away or slow, as when ours fills
            METRICS.impressions_dropped.labels(reason="buffer_full").inc()
        except Exception as exc:  # noqa: BLE001 - any refusal drops this impression, never the thread
            METRICS.impressions_dropped.labels(reason="kafka_error").inc()
            log.warning("impressions: send failed (%s)", exc)


def impression_logger(settings: Settings) -> ImpressionLogger:
    """The service's logger from :class:`recsys.config.Settings`: the impressions topic, the buffer
    (``RECSYS_IMPRESSIONS_BUFFER``), on or off (``RECSYS_IMPRESSIONS``)."""
    bootstrap, buffer = settings.effective_kafka_bootstrap, settings.impressions_buffer
    return ImpressionLogger(settings.impressions_topic, buffer,
                            lambda: kafka_producer(bootstrap, buffer), enabled=settings.impressions == "on")
