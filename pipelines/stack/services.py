"""The local services: what each one is (port, endpoint, command, health check) and how it reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.stack.binaries import kafka_broker_binary, redis_server_binary
from pipelines.stack.health import http_healthy, kafka_healthy, redis_healthy
from pipelines.stack.service_types import Service, ServiceStatus
from pipelines.stack.stream_service import STREAM, stream_services
from pipelines.stack.topics import ensure_topics
from recsys.config import Settings

SERVICES: tuple[str, ...] = ("redis", "kafka", "mlflow")
#: Started once data and models exist: the service on request (`stack up --only service`,
#: `make demo`); the stream by `stack up` once the dataset and the Feast registry exist (or on
#: request). `down` stops them first, before the brokers they use. ``stream`` names every worker.
APP_SERVICES: tuple[str, ...] = ("service", STREAM)

__all__ = ["APP_SERVICES", "SERVICES", "Service", "ServiceStatus", "service_command", "service_definitions",
           "service_env"]


def service_definitions(settings: Settings, run_dir: Path, stream_workers: int | None = None) -> dict[str, Service]:
    """Every service of the stack described by ``settings``, its state under ``run_dir``; stream
    workers ``stream-0`` .. (``stream_workers``, default ``settings.stream_workers``) last."""
    s = settings
    redis_dir = run_dir / "redis"
    mlflow_dir = run_dir / "mlflow"
    return {
        "redis": Service(
            name="redis",
            port=s.redis_port,
            endpoint=s.effective_redis_url,
            is_local=s.redis_is_local,
            command=lambda: [
                str(redis_server_binary()),
                "--port", str(s.redis_port),
                "--bind", "127.0.0.1",
                "--dir", str(redis_dir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ],
            healthy=lambda: redis_healthy(s.effective_redis_url),
        ),
        "kafka": Service(
            name="kafka",
            port=s.kafka_port,
            endpoint=s.effective_kafka_bootstrap,
            is_local=s.kafka_is_local,
            command=lambda: [
                str(kafka_broker_binary()),
                "broker",
                "--listener-url", f"tcp://127.0.0.1:{s.kafka_port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{s.kafka_port}",
                "--storage-engine", "memory://tansu/",
            ],
            healthy=lambda: kafka_healthy(s.effective_kafka_bootstrap),
            after_start=lambda: ensure_topics(s),
        ),
        "mlflow": Service(
            name="mlflow",
            port=s.mlflow_port,
            endpoint=s.effective_mlflow_uri,
            is_local=s.mlflow_is_local,
            command=lambda: [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination", str(mlflow_dir / "artifacts"),
                "--serve-artifacts",
                "--host", "127.0.0.1",
                "--port", str(s.mlflow_port),
                "--workers", "1",
            ],
            # MLflow's job execution (a job runner and seven huey consumer processes per server,
            # about 2 GB in all) serves features this platform does not use: off
            env=lambda: {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            healthy=lambda: http_healthy(f"{s.effective_mlflow_uri.rstrip('/')}/health"),
            start_timeout_s=90.0,  # first start migrates the SQLite schema
        ),
        "service": Service(
            name="service",
            port=s.service_port,
            endpoint=f"http://127.0.0.1:{s.service_port}",
            is_local=True,
            command=lambda: service_command(s),
            env=lambda: service_env(s),
            healthy=lambda: http_healthy(f"http://127.0.0.1:{s.service_port}/readyz"),
            start_timeout_s=240.0,  # loads the catalogue, the index and TensorFlow
        ),
        **stream_services(s, settings.stream_workers if stream_workers is None else stream_workers),
    }


def service_command(settings: Settings, port: int | None = None) -> list[str]:
    """``bentoml serve`` of the recommendation service, on loopback."""
    return [sys.executable, "-m", "bentoml", "serve", "bentos.service:Recommender", "--host", "127.0.0.1",
            "--port", str(port or settings.service_port), "--working-dir", str(settings.home)]


def service_env(settings: Settings) -> dict[str, str]:
    """BentoML reads per-service overrides from BENTOML_CONFIG_OPTIONS (space-separated); the
    experiment the settings declare (``RECSYS_EXPERIMENT_FILE``, as an absolute path) reaches the
    service even when the caller set it in code (``recsys demo`` does) rather than in the
    environment the service inherits."""
    workers = f"services.recsys.workers={settings.service_workers}"
    existing = os.environ.get("BENTOML_CONFIG_OPTIONS", "").strip()
    env = {"BENTOML_CONFIG_OPTIONS": f"{existing} {workers}".strip()}
    if settings.experiment_file is not None:
        env["RECSYS_EXPERIMENT_FILE"] = str(settings.resolve(settings.experiment_file))
    return env
