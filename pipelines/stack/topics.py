"""The Kafka topics the platform needs: the clickstream topic, its dead-letter topic, and the
impressions topic (what /recommend served)."""

from __future__ import annotations

import logging

from recsys.config import Settings

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings) -> None:
    """Create the clickstream topic, its dead-letter topic and the impressions topic if missing
    (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=settings.effective_kafka_bootstrap, client_id="recsys-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(settings.events_topic, settings.events_partitions, 1),
            NewTopic(settings.dlq_topic, 1, 1),
            NewTopic(settings.impressions_topic, settings.impressions_partitions, 1),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        admin.close()
