"""Small Kafka admin reads shared by the stream and the impression sink (kafka-python's admin
client only, so neither pays the other's imports)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def topic_id(bootstrap: str, topic: str, client_id: str = "recsys-admin") -> str:
    """The broker's id of this incarnation of ``topic`` ("" when the broker does not say): a topic
    deleted and created again under the same name gets a new id, and its offsets start over."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
    try:
        described = admin.describe_topics([topic])
        return str(described[0].get("topic_id") or "") if described else ""
    except Exception:  # noqa: BLE001 - an old broker without topic ids: callers fall back to a generic tag
        log.warning("could not read the topic id of %s", topic, exc_info=True)
        return ""
    finally:
        admin.close()
