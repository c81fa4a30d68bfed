"""The service's impression logger on its own: a full buffer drops and counts instead of waiting,
the switch turns it off, and with a real Kafka every logged answer reaches the topic."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Producer
from kafka import KafkaConsumer
from prometheus_client import REGISTRY

from bentos.answer import Recommendation
from bentos.impressions import ImpressionLogger, impression_logger, kafka_producer
from pipelines.impressions import decode_impression
from pipelines.stack import free_port
from recsys.config import Settings

DROPPED = "recsys_impressions_dropped_total"


def _answer(user: int) -> Recommendation:
    items = [{"item_id": 10 + n, "score": 1.0 - n / 10, "strategy": "als", "title": None, "price": None,
              "image_url": None} for n in range(3)]
    return Recommendation(user, items, cold_start=False, degraded=False, cached=True, model_versions={"index": "i:1"})


def _dropped() -> float:
    return REGISTRY.get_sample_value(DROPPED, {"reason": "buffer_full"}) or 0.0


def test_a_full_buffer_drops_and_counts_without_waiting() -> None:
    kafka_answers = threading.Event()

    def unreachable() -> None:  # a broker that hangs until the test lets it fail
        kafka_answers.wait(30)
        raise ConnectionError("no broker")

    logger = ImpressionLogger("t", buffer=2, make_producer=unreachable)
    before = _dropped()
    try:
        started = time.perf_counter()
        for n in range(1_000):
            logger.log(_answer(n), f"r{n}")
        # the property is that log() never waits on Kafka; a waiting call would take seconds each
        # (the producer's retry), so one second for all 1,000 is a bound no loaded machine reaches
        assert time.perf_counter() - started < 1.0
        # the thread is stuck making a producer, so the buffer keeps its first 2: 998 dropped
        assert _dropped() - before == 998
    finally:
        kafka_answers.set()
        logger.close(timeout_s=1.0)


def test_the_switch_turns_logging_off(stack_settings: Settings) -> None:
    logger = impression_logger(stack_settings.with_overrides(impressions="off"))
    before = _dropped()
    for n in range(5):
        logger.log(_answer(n), f"r{n}")
    assert logger.enabled is False and not logger._thread.is_alive() and _dropped() == before


def test_logged_answers_reach_the_topic(stack_settings: Settings) -> None:
    topic = f"served-{uuid.uuid4().hex[:8]}"
    logger = ImpressionLogger(topic, 100, lambda: kafka_producer(stack_settings.effective_kafka_bootstrap))
    ids = [f"req-{n}" for n in range(3)]
    for n, rid in enumerate(ids):
        logger.log(_answer(n), rid)
    logger.close(timeout_s=10.0)  # sends what the buffer holds
    consumer = KafkaConsumer(topic, bootstrap_servers=stack_settings.effective_kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    rows = {}
    for message in consumer:
        row = decode_impression(message.value)
        rows[row["request_id"]] = row
        if len(rows) == len(ids):
            break
    consumer.close()
    assert sorted(rows) == ids
    assert rows["req-1"]["user_id"] == 1 and rows["req-1"]["item_ids"] == [10, 11, 12]
    assert rows["req-1"]["positions"] == [1, 2, 3] and rows["req-1"]["cached"] is True


def test_impressions_kafka_never_took_are_counted_as_dropped() -> None:
    def dead_broker() -> Producer:  # nothing listens there; undelivered after 500 ms; a queue of 2
        return Producer({"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.timeout.ms": 500,
                         "queue.buffering.max.messages": 2, "error_cb": lambda _err: None})

    def dropped(reason: str) -> float:
        return REGISTRY.get_sample_value(DROPPED, {"reason": reason}) or 0.0

    logger = ImpressionLogger("t", 10, dead_broker)
    before = {reason: dropped(reason) for reason in ("buffer_full", "kafka_error")}
    for n in range(5):
        logger.log(_answer(n), f"r{n}")
    logger.close(timeout_s=5.0)  # the flush serves the failed delivery reports
    # 5 answers logged: the producer's queue takes 2 (undelivered: kafka_error), 3 find it full
    assert dropped("buffer_full") - before["buffer_full"] == 3
    assert dropped("kafka_error") - before["kafka_error"] == 2
