"""The local stack against real servers: lifecycle, errors, and client round trips."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from pipelines.stack import (
    LocalStack,
    StackError,
    free_port,
    redis_healthy,
    redis_server_binary,
    service_command,
    service_env,
)
from recsys.config import Settings
from tests.support.settings import isolated_settings


def test_redis_round_trip(stack_settings: Settings) -> None:
    client = redis.Redis.from_url(stack_settings.effective_redis_url)
    client.set("recsys:test:key", "v1")
    assert client.get("recsys:test:key") == b"v1"
    assert client.config_get("appendonly")["appendonly"] == "yes"


def test_topics_created_with_partitions(stack_settings: Settings) -> None:
    admin = KafkaAdminClient(bootstrap_servers=stack_settings.effective_kafka_bootstrap)
    try:
        topics = {t["name"]: t for t in admin.describe_topics([stack_settings.events_topic, stack_settings.dlq_topic])}
    finally:
        admin.close()
    assert len(topics[stack_settings.events_topic]["partitions"]) == stack_settings.events_partitions
    assert len(topics[stack_settings.dlq_topic]["partitions"]) == 1


def test_kafka_round_trip_with_consumer_group(stack_settings: Settings) -> None:
    bootstrap = stack_settings.effective_kafka_bootstrap
    topic = stack_settings.dlq_topic  # one partition: order is total
    marker = uuid.uuid4().hex
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(3):
        producer.send(topic, key=b"k", value=f"{marker}-{i}".encode())
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-{marker}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        consumer_timeout_ms=20000,
    )
    got = []
    for message in consumer:
        if message.value.decode().startswith(marker):
            got.append(message.value.decode())
        if len(got) == 3:
            break
    consumer.commit()
    committed = consumer.committed(next(iter(consumer.assignment())))
    consumer.close()
    assert got == [f"{marker}-0", f"{marker}-1", f"{marker}-2"]
    assert committed is not None and committed >= 3


def test_up_is_idempotent_and_status_reports_running(stack_settings: Settings) -> None:
    stack = LocalStack(stack_settings)
    before = {s.name: s.pid for s in stack.status()}
    again = stack.up()
    assert {s.name: s.pid for s in again} == before  # nothing restarted
    assert all(s.state == "running" and s.healthy for s in again)


def test_lifecycle_down_stops_only_what_up_started(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    stack = LocalStack(settings)
    assert [s.state for s in stack.status(["redis"])] == ["stopped"]
    [started] = stack.up(["redis"])
    assert started.state == "running" and started.healthy
    assert stack.pid_file("redis").is_file() and stack.log_file("redis").is_file()
    assert stack.down() == ["redis"]
    assert [s.state for s in stack.status(["redis"])] == ["stopped"]
    assert not stack.pid_file("redis").exists()
    assert stack.down() == []


def test_redis_restart_keeps_data(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    stack = LocalStack(settings)
    stack.up(["redis"])
    try:
        client = redis.Redis.from_url(settings.effective_redis_url)
        client.hset("feature:1", mapping={"a": "1"})
        client.close()
        time.sleep(1.2)  # appendfsync everysec
        stack.down(["redis"])
        stack.up(["redis"])
        client = redis.Redis.from_url(settings.effective_redis_url)
        assert client.hgetall("feature:1") == {b"a": b"1"}
        client.close()
    finally:
        stack.down()


def test_busy_port_gives_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    settings = isolated_settings(tmp_path, redis_port=port)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(StackError, match=rf"port {port} for redis is busy.*RECSYS_REDIS_PORT"):
            LocalStack(settings).up(["redis"])


def test_missing_binary_gives_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-redis-server"
    monkeypatch.setenv("RECSYS_REDIS_SERVER_BIN", str(missing))
    with pytest.raises(StackError, match=rf"RECSYS_REDIS_SERVER_BIN={missing} is not an executable file"):
        LocalStack(isolated_settings(tmp_path)).up(["redis"])


def test_down_leaves_a_server_it_did_not_start(tmp_path: Path) -> None:
    port = free_port()
    foreign = subprocess.Popen(
        [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        settings = isolated_settings(tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
        stack = LocalStack(settings)
        deadline = time.monotonic() + 10
        while not redis_healthy(settings.effective_redis_url) and time.monotonic() < deadline:
            time.sleep(0.1)
        [row] = stack.up(["redis"])
        assert row.state == "external" and row.healthy
        assert stack.down() == []
        assert foreign.poll() is None and redis_healthy(settings.effective_redis_url)
    finally:
        foreign.terminate()
        foreign.wait(10)


def test_external_endpoint_is_not_started(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stack = LocalStack(settings)
    [row] = stack.up(["redis"])
    assert row.state == "external" and not row.healthy  # nothing listens there, nothing started
    assert not stack.pid_file("redis").exists()
    assert stack.down(["redis"]) == []


def test_unknown_service_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"unknown service\(s\) \['postgres'\]"):
        LocalStack(isolated_settings(tmp_path)).up(["postgres"])


def test_service_workers_reach_bentoml_through_its_override_variable(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = isolated_settings(tmp_path, service_workers=2, service_port=3999)
    monkeypatch.delenv("BENTOML_CONFIG_OPTIONS", raising=False)
    assert service_env(settings) == {"BENTOML_CONFIG_OPTIONS": "services.recsys.workers=2"}
    monkeypatch.setenv("BENTOML_CONFIG_OPTIONS", "services.recsys.traffic.timeout=5")  # the user's own kept
    assert service_env(settings)["BENTOML_CONFIG_OPTIONS"] == "services.recsys.traffic.timeout=5 services.recsys.workers=2"
    command = service_command(settings)
    assert command[-6:] == ["--host", "127.0.0.1", "--port", "3999", "--working-dir", str(settings.home)]
    # an experiment set in code reaches the service as an absolute path
    declared = settings.with_overrides(experiment_file=Path("deploy/experiments/demo.yaml"))
    assert service_env(declared)["RECSYS_EXPERIMENT_FILE"] == str(settings.home / "deploy/experiments/demo.yaml")
