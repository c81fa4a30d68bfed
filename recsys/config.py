"""Typed configuration: one object, filled from environment variables and an optional YAML file.

Precedence (highest first): explicit keyword arguments (CLI flags), environment variables,
the YAML file (``RECSYS_CONFIG`` or ``<home>/recsys.yaml``), then the defaults below.

Endpoints left unset (``redis_url``, ``kafka_bootstrap_servers``, ``mlflow_tracking_uri``) mean
"use the local stack that ``recsys stack up`` starts on loopback"; set them (``REDIS_URL``,
``KAFKA_BOOTSTRAP_SERVERS``, ``MLFLOW_TRACKING_URI``, ``SPARK_MASTER``) to use real clusters, and
the stack will not start that service locally.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

#: A file that marks the project root (the repository checkout).
_ROOT_MARKER = Path("feature_repo") / "feature_store.yaml"

DEFAULT_REDIS_PORT = 16379
DEFAULT_KAFKA_PORT = 19092
DEFAULT_MLFLOW_PORT = 15000
DEFAULT_SERVICE_PORT = 3000
#: The first managed stream worker's metrics port; worker i serves on this port + i.
DEFAULT_STREAM_PORT = 19108


def find_home(start: Path | None = None) -> Path:
    """The project root: ``RECSYS_HOME``, else the nearest parent of ``start`` (default: the
    current directory) that holds ``feature_repo/feature_store.yaml``, else the current directory.

    Walking up lets plain ``feast`` commands run from ``feature_repo/`` find the same data as the
    ``recsys`` CLI run from the repository root.
    """
    env = os.environ.get("RECSYS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / _ROOT_MARKER).is_file():
            return candidate
    return here


def _config_file() -> Path | None:
    env = os.environ.get("RECSYS_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"RECSYS_CONFIG={env!r} does not exist: point it at a YAML file or unset it."
            )
        return path
    default = find_home() / "recsys.yaml"
    return default if default.is_file() else None


class Settings(BaseSettings):
    """Every knob of the platform. Paths are relative to ``home`` unless absolute."""

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_",
        extra="forbid",
        populate_by_name=True,
        frozen=True,
    )

    home: Path = Field(default_factory=find_home)
    data_dir: Path = Path("data")
    run_dir: Path = Path("run")
    dataset: str = Field("synthetic", description="Name of the canonical dataset under data_dir.")

    # Endpoints. None = the local stack on loopback.
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "RECSYS_REDIS_URL", "redis_url")
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "RECSYS_KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "MLFLOW_TRACKING_URI", "RECSYS_MLFLOW_TRACKING_URI", "mlflow_tracking_uri"
        ),
    )
    spark_master: str | None = Field(
        None, validation_alias=AliasChoices("SPARK_MASTER", "RECSYS_SPARK_MASTER", "spark_master")
    )
    spark_conf: dict[str, str] = Field(default_factory=dict)

    # Local stack ports (loopback).
    redis_port: int = Field(DEFAULT_REDIS_PORT, ge=1, le=65535)
    kafka_port: int = Field(DEFAULT_KAFKA_PORT, ge=1, le=65535)
    mlflow_port: int = Field(DEFAULT_MLFLOW_PORT, ge=1, le=65535)
    service_port: int = Field(DEFAULT_SERVICE_PORT, ge=1, le=65535)
    # BentoML worker processes of the service; each loads the catalogue, the index and the ranker
    service_workers: int = Field(1, ge=1, le=64)
    #: GPUs each service worker declares (BentoML ``resources.gpu``; a fraction shares one); 0 = CPU.
    #: BentoML then sets CUDA_VISIBLE_DEVICES per worker and TensorFlow places the ranker there.
    service_gpus: float = Field(0.0, ge=0.0, le=8.0)
    #: per-request observability of the read endpoints (/recommend, /similar_items), off by
    #: default: BentoML's access-log line and OpenTelemetry span cost a sizeable share of the
    #: worker's Python per request even when no span is sampled (docs/serving.md measures it).
    #: The write endpoints are always logged and traced; requests and latency are always counted.
    access_log_reads: bool = False
    trace_reads: bool = False
    #: candidates from the two-tower model per miss when one is served (0: the strategy is off)
    two_tower_candidates: int = Field(50, ge=0, le=1000)

    # Kafka topics.
    events_topic: str = "clickstream.events"
    dlq_topic: str = "clickstream.events.dlq"
    events_partitions: int = Field(4, ge=1)
    #: what /recommend served (one message per answer), read by `recsys stream impressions`
    impressions_topic: str = "recommendations.served"
    impressions_partitions: int = Field(4, ge=1)

    # Impressions: the service's logging of every answer and the sink to the offline table.
    #: ``off`` stops the service logging answers (a benchmark measures the hit path both ways)
    impressions: Literal["on", "off"] = "on"
    #: answers waiting for the producer in each worker; beyond it an answer's impression is dropped
    impressions_buffer: int = Field(10_000, ge=1)
    impressions_group_id: str = "recsys-impressions"
    impressions_batch_rows: int = Field(10_000, ge=1, description="The sink writes once this many wait.")
    impressions_flush_s: float = Field(10.0, gt=0, description="The sink writes at least this often.")

    # Stream consumer (`recsys stream run`): micro-batches online, larger batches offline.
    stream_group_id: str = "recsys-stream"
    stream_batch_events: int = Field(5_000, ge=1, description="Most events folded per micro-batch.")
    stream_batch_ms: int = Field(100, ge=1, description="Longest wait for a micro-batch to fill.")
    stream_offline_flush_s: float = Field(60.0, gt=0, description="Offline append at least this often.")
    stream_offline_batch_rows: int = Field(100_000, ge=1, description="Offline append once this many rows wait.")
    stream_dedupe_window_s: int = Field(86_400, ge=1, description="Event ids remembered per user, in time.")
    stream_dedupe_max_ids: int = Field(1_000, ge=1, description="Event ids remembered per user, at most.")
    stream_max_future_s: int = Field(300, ge=0, description="Clock skew allowed before 'in the future'.")
    stream_purchased_max: int = Field(100, ge=1, description="Latest purchases kept per user (never recommended).")
    #: Prometheus /metrics port of the stream consumer; None = no endpoint.
    stream_metrics_port: int | None = Field(None, ge=0, le=65535)
    #: Consumers `recsys stack up` runs in the stream's group (each its own process, pid file and
    #: metrics port); more than the topic's partitions leaves the extra ones idle.
    stream_workers: int = Field(1, ge=1, le=64)
    #: Metrics port of the first managed stream worker (`recsys stack up`); worker i uses this + i.
    stream_port: int = Field(DEFAULT_STREAM_PORT, ge=1, le=65535 - 64)
    trending_window_s: int = Field(3_600, ge=60, description="Sliding window of trending, in seconds.")
    trending_top_n: int = Field(100, ge=1)
    trending_ttl_s: int = Field(7_200, ge=1, description="Redis expiry of the trending sets.")

    # Feast.
    feast_project: str = Field("recsys", pattern=r"^[A-Za-z0-9_]+$")
    #: Redis expiry of an entity's whole online row (every view at once); None = never expire.
    online_key_ttl_seconds: int | None = Field(None, ge=1)
    registry_cache_ttl_seconds: int = Field(60, ge=0)

    # Serving.
    #: Required by the write endpoints (/events, /items) in the X-API-Key header. The default is
    #: for the local demo only: set RECSYS_API_KEY in any shared deployment.
    api_key: SecretStr = SecretStr("local-dev-key")
    recs_cache_ttl_seconds: int = Field(600, ge=1)
    #: The ranker's time budget per call; None = measured at start-up (scoring p99 x headroom).
    ranker_timeout_ms: float | None = Field(None, gt=0)
    #: How long the service keeps a candidate's decoded online row (bentos.item_cache): a
    #: materialization reaches answers within this many seconds; 0 reads Redis on every request.
    item_feature_ttl_s: float = Field(5.0, ge=0)
    #: How long the service keeps a trending list (overall, per category) it read from Redis.
    trending_cache_ttl_s: float = Field(1.0, ge=0)
    ranker_timeout_headroom: float = Field(3.0, ge=1.0)
    #: The longest the service's start-up waits for the ranker's warm-up calls (a model whose
    #: first call hangs then serves with the cosine fallback instead of keeping the service down).
    ranker_warmup_timeout_s: float = Field(60.0, gt=0)
    #: Which variant of the exported ranker to serve: ``auto`` (the int8 variant only when the
    #: comparison beside the export shows ndcg@10 within 0.002 and a lower scoring p99),
    #: ``full`` or ``quantized`` (models.ranker.precision).
    ranker_precision: Literal["auto", "full", "quantized"] = "auto"

    # Retraining and its gate (`recsys retrain`), and the service's hot reload of the champion.
    #: The gate's metric: a key of the protocol's report (``ndcg@10``, ``recall@20``, ...).
    gate_metric: str = Field("ndcg@10", pattern=r"^(ndcg|recall)@[0-9]+$")
    #: A challenger is promoted unless its metric is below the champion's by more than this.
    gate_tolerance: float = Field(0.005, ge=0.0)
    #: The gate scores users with an event in this many days before the latest event.
    gate_window_days: float = Field(7.0, gt=0)
    #: At most this many window users are scored (a seeded sample when there are more): the
    #: two-stage rows read each user's candidates' features from Feast. None = every window user.
    gate_max_users: int | None = Field(1000, ge=1)
    #: How often each service worker checks the champion pointer for a promotion.
    model_reload_poll_s: float = Field(10.0, gt=0)

    # A/B experiments (bentos.experiments).
    #: The YAML or JSON file declaring the running experiment (name, salt, arms with shares and
    #: scoring modes); relative to ``home``. None = no experiment: every answer's ``arm`` is null.
    experiment_file: Path | None = None

    #: The platform's "now". None = the latest event of the active dataset.
    as_of: datetime | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("as_of")
    @classmethod
    def _as_of_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # a naive time is read as UTC: the data is all UTC
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in {"redis", "rediss"}:
            raise ValueError(
                f"REDIS_URL={value!r} is not a redis:// or rediss:// URL "
                "(for example redis://10.0.0.5:6379/0)"
            )
        return value

    # ---- derived values -------------------------------------------------------------------

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.home / path)

    @cached_property
    def data_path(self) -> Path:
        return self.resolve(self.data_dir)

    @cached_property
    def run_path(self) -> Path:
        return self.resolve(self.run_dir)

    @property
    def dataset_path(self) -> Path:
        """Where the canonical tables of the active dataset live."""
        return self.data_path / "canonical" / self.dataset

    @property
    def redis_is_local(self) -> bool:
        return self.redis_url is None

    @property
    def kafka_is_local(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def mlflow_is_local(self) -> bool:
        return self.mlflow_tracking_uri is None

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def effective_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def effective_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def effective_spark_master(self) -> str:
        return self.spark_master or "local[*]"

    @property
    def feast_redis_connection_string(self) -> str:
        """Feast's Redis store wants ``host:port,db=N[,password=...,ssl=true]``, not a URL."""
        return redis_url_to_feast(self.effective_redis_url)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced (validated again)."""
        data = self.model_dump(exclude_unset=False)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**data)


def redis_url_to_feast(url: str) -> str:
    """``redis://:pw@host:6379/2`` -> ``host:6379,db=2,password=pw`` (Feast's format)."""
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss"} or not parsed.hostname:
        raise ValueError(f"{url!r} is not a redis:// URL with a host (e.g. redis://127.0.0.1:6379/0)")
    db = (parsed.path or "/0").lstrip("/") or "0"
    parts = [f"{parsed.hostname}:{parsed.port or 6379}", f"db={db}"]
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env + YAML, with explicit overrides (None values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
