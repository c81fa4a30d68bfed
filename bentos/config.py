"""The serving configuration every stage of /recommend reads: candidate quotas, cold start,
exploration, cache size and TTL, the ranker's time budget and its executor, the Redis retry
window. Invalid values fail at construction with the field named."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServingConfig:
    n_candidates: int = 150
    n_als: int = 50
    n_similar: int = 10
    n_content: int = 30
    n_trending: int = 20
    #: the two-tower model's nearest items (placed after ALS; 0: the strategy is off)
    n_two_tower: int = 50
    cold_start_threshold: int = 10
    exploration_every: int = 5  # cold start: every 5th slot is an exploration item
    new_item_share: float = 0.1  # share of personalised answers that show one new item (exploration)
    new_item_days: int = 7
    #: the 1-based position of that new item, the same for every k (the last slot of the default
    #: k=10), so a cached top list sliced to k shows what a fresh answer for k would show
    new_item_slot: int = 10
    cache_size: int = 100
    cache_ttl_s: int = 600
    #: the ranker's budget per call: a fixed value, or None to measure it at start-up as
    #: max(ranker_timeout_floor_ms, scoring p99 x ranker_timeout_headroom) (bentos.ranker_call)
    ranker_timeout_ms: float | None = None
    ranker_timeout_floor_ms: float = 25.0
    ranker_timeout_headroom: float = 3.0
    ranker_warmup_calls: int = 50  # timed calls at start-up, after one untimed (graph building) call
    #: the longest the start-up may wait for those calls: a model whose first call hangs must not
    #: keep the service from becoming ready (it serves with the cosine fallback, counted)
    ranker_warmup_timeout_s: float = 60.0
    #: the ranker's own executor: threads, and calls allowed to wait for one; beyond that a
    #: request skips the ranker at once (cosine fallback, reason "ranker busy")
    ranker_workers: int = 2
    ranker_queue: int = 8
    redis_retry_s: float = 1.0
    #: the candidates' online rows are kept this long in the worker (bentos.item_cache; 0: off),
    #: at most this many items
    item_feature_ttl_s: float = 5.0
    item_feature_cache_items: int = 200_000
    #: the trending lists (overall, per category) are kept this long in the worker (0: off)
    trending_cache_ttl_s: float = 1.0
    blend_weights: Mapping[str, float] = field(
        default_factory=lambda: {"als": 1.0, "two_tower": 0.9, "similar": 0.8, "content": 0.5, "trending": 0.6})

    def __post_init__(self) -> None:
        if self.ranker_timeout_ms is not None and not self.ranker_timeout_ms > 0:
            raise ValueError(f"ranker_timeout_ms={self.ranker_timeout_ms} must be > 0 "
                             "(or None to measure the budget at start-up)")
        if not self.ranker_warmup_timeout_s > 0:
            raise ValueError(f"ranker_warmup_timeout_s={self.ranker_warmup_timeout_s} must be > 0")
        if not self.ranker_timeout_floor_ms > 0:
            raise ValueError(f"ranker_timeout_floor_ms={self.ranker_timeout_floor_ms} must be > 0")
        if not self.ranker_timeout_headroom >= 1.0:
            raise ValueError(f"ranker_timeout_headroom={self.ranker_timeout_headroom} must be >= 1 "
                             "(a budget under the measured p99 times out on purpose)")
        for name in ("item_feature_ttl_s", "trending_cache_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: no near cache)")
        for name in ("ranker_warmup_calls", "ranker_workers", "cache_size", "n_candidates", "new_item_slot",
                     "item_feature_cache_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_two_tower < 0:
            raise ValueError(f"n_two_tower={self.n_two_tower} must be >= 0 (0: no two-tower candidates)")
        if self.ranker_queue < 0:
            raise ValueError(f"ranker_queue={self.ranker_queue} must be >= 0 (0: no call waits for a thread)")


#: the read endpoints: the hot path, whose per-request access log and tracing are opt-in
READ_ROUTES = ("/recommend", "/similar_items")
#: BentoML's own access-log skip list (its default), kept when the read routes are added to it
_DEFAULT_SKIPPED = ("/metrics", "/healthz", "/livez", "/readyz")


def service_observability() -> dict[str, Any]:
    """The BentoML ``logging`` and ``tracing`` service config: the read routes leave the access
    log unless ``RECSYS_ACCESS_LOG_READS`` and OpenTelemetry unless ``RECSYS_TRACE_READS``
    (:class:`recsys.config.Settings`): the two middlewares cost a sizeable share of a request's
    Python even when no span is sampled (docs/serving.md, "Observability off the hot path")."""
    from recsys.config import load_settings

    settings = load_settings()
    skipped = [*_DEFAULT_SKIPPED, *([] if settings.access_log_reads else READ_ROUTES)]
    # OpenTelemetry matches these as regular expressions against the full URL
    excluded = [] if settings.trace_reads else [f"{route}$" for route in READ_ROUTES]
    return {"logging": {"access": {"skip_paths": skipped}}, "tracing": {"excluded_urls": excluded}}


def service_resources() -> dict[str, float]:
    """The BentoML ``resources`` the service declares: ``{"gpu": n}`` when ``RECSYS_SERVICE_GPUS``
    (:attr:`recsys.config.Settings.service_gpus`) is above 0, else none. BentoML's allocator then
    gives each worker its GPU through CUDA_VISIBLE_DEVICES, and TensorFlow places the ranker's
    SavedModel there; with none declared the same code runs on the CPU (or on whatever GPU
    TensorFlow sees)."""
    from recsys.config import load_settings

    gpus = load_settings().service_gpus
    return {"gpu": gpus} if gpus else {}
