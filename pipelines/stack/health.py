"""Health checks of the local services: Redis answers PING, Kafka lists topics, HTTP answers 2xx."""

from __future__ import annotations

import socket
import urllib.request


def redis_healthy(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def kafka_healthy(bootstrap: str, timeout_s: float = 2.0) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    if not tcp_open(bootstrap):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="recsys-health",
        )
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()
    except (KafkaError, OSError, ValueError):
        return False


def http_healthy(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback/config URL
            return 200 <= resp.status < 300
    except OSError:
        return False


def tcp_open(bootstrap: str, timeout_s: float = 0.5) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False
