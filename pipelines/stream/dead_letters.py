"""The dead-letter topic: rejected messages, kept with their original bytes, the reason and their source."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord


class DeadLetters:
    """Produces rejected messages to the dead-letter topic: value = the original bytes, the reason
    and the source position in headers."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)

    def send(self, record: ConsumerRecord, reason: str) -> None:
        headers = [("reason", reason.encode()), ("source_topic", record.topic.encode()),
                   ("source_partition", str(record.partition).encode()), ("source_offset", str(record.offset).encode())]
        self._producer.send(self.topic, key=record.key, value=record.value, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()
