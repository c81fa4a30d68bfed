"""The precompute job (``recsys precompute``): the users active lately -> their answers, computed by
the service's own engine and models -> the Redis cache.

*Who.* Users active in the window (24 h by default) ending at the reference time, from two
sources merged (:func:`active_users`): the offline event log, and the stream's activity set
(:mod:`pipelines.stream.activity`), which also holds users only seen live (events that reached
the stream but not yet the offline log). A user's activity is the sum of both counts. The most
active ``hot_share`` (10%) are the *hot* tier: their answers are kept longer (``hot_ttl_s``) and a
cheaper run with ``tier="hot"`` refreshes only them, so it can be scheduled more often.

*How.* :func:`precompute_engine` builds the engine exactly as the service does (the BentoML
store's champion index and ranker, else its latest: :func:`bentos.factory.served_models`), so a
cached answer is the answer ``/recommend`` would compute, and it carries the model versions that
computed it.
:func:`precompute` runs batches of users on ``workers`` threads sharing that engine (it is
thread-safe: the service calls it from many threads), with one progress bar; a degraded answer is
never cached (the live path retries it).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import redis
from tqdm.auto import tqdm

from bentos.cache import cache_key, cache_payload
from bentos.engine import RecommendationEngine
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Two threads per core, at most 8: a miss spends much of its time waiting on Redis or in
    FAISS and TensorFlow, which release the GIL, so one thread per core leaves cores idle."""
    return max(1, min(8, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class PrecomputeConfig:
    window_hours: int = 24
    hot_share: float = 0.10
    ttl_s: int = 1_800
    hot_ttl_s: int = 7_200
    batch: int = 200
    workers: int = field(default_factory=default_workers)
    #: The ranker's budget per call in this job. A batch job keeps no user waiting: the budget
    #: only guards against a stuck model, so it is generous (the service's is the measured p99
    #: with headroom), and concurrent workers queueing for the ranker do not time out into
    #: cosine answers, which would not be cached.
    ranker_timeout_ms: float = 2_000.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hot_share <= 1.0:
            raise ValueError(f"hot_share={self.hot_share} must be within [0, 1]")
        for name in ("window_hours", "ttl_s", "hot_ttl_s", "batch", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.ranker_timeout_ms > 0:
            raise ValueError(f"ranker_timeout_ms={self.ranker_timeout_ms} must be > 0")


@dataclass(frozen=True)
class PrecomputeStats:
    active_users: int
    hot_users: int
    written: int
    degraded: int
    #: users whose answer was computed but could not be written (Redis failed the batch's write)
    failed: int = 0
    workers: int = 1
    seconds: float = 0.0
    #: why the degraded answers were degraded (reason -> answers)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def users_per_s(self) -> float:
        done = self.written + self.degraded + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


# ---- who: the active users ------------------------------------------------------------------------


def offline_activity(settings: Settings, now: datetime, hours: int) -> pd.Series:
    """Events per user in (now - hours, now] in the offline event log (unordered)."""
    dataset = pads.dataset(settings.dataset_path / "events", format="parquet")
    start = pd.Timestamp(now) - timedelta(hours=hours)
    table = dataset.to_table(columns=[S.COL_USER],
                             filter=(pads.field(S.COL_TS) > start) & (pads.field(S.COL_TS) <= pd.Timestamp(now)))
    return table.column(S.COL_USER).to_pandas().value_counts().astype(np.int64)


def active_users(settings: Settings, now: datetime, hours: int, client: redis.Redis | None = None) -> pd.Series:
    """Events per user in the window ending at ``now``: the offline log's (exact window) plus the
    stream's activity set (whole hours), most active first, ties by user id. An event that both
    sources hold (the demo replays the log's tail through the stream) counts twice: that weighs
    recent live activity higher, never adds or drops a user. Redis unreachable: the offline log
    only (logged)."""
    from pipelines.stream.activity import live_activity

    offline = offline_activity(settings, now, hours)
    own = client is None
    client = client or redis.Redis.from_url(settings.effective_redis_url, socket_timeout=30, socket_connect_timeout=5)
    try:
        live = live_activity(client, settings.feast_project, now, hours)
    except (redis.RedisError, OSError) as exc:
        log.warning("the stream's activity set is unreadable (%s): active users from the offline log only", exc)
        live = offline.iloc[:0]
    finally:
        if own:
            client.close()
    merged = offline.add(live, fill_value=0).astype(np.int64)
    merged.index = merged.index.astype(np.int64)
    merged.index.name = S.COL_USER
    only_live = len(merged) - len(offline)
    log.info("active users in the %d h before %s: %d (offline log %d, stream %d, only seen live %d)",
             hours, now.isoformat(), len(merged), len(offline), len(live), only_live)
    return merged.sort_index().sort_values(ascending=False, kind="stable")


# ---- how: the engine and the parallel batches -------------------------------------------------------


def precompute_engine(settings: Settings, config: PrecomputeConfig | None = None,
                      bentoml_home: Path | None = None) -> RecommendationEngine:
    """The service's engine on the service's models (the champion's index and ranker, else the latest),
    with this job's ranker budget and a ranker queue that holds every worker's call. In an
    experiment whose arms pin model versions, it routes those arms' users to engines of their
    models, as the service does (:mod:`bentos.arm_engines`); a pin the store lacks stops the job."""
    from bentos.arm_engines import build_engines
    from bentos.experiments import check_pins, experiment_of
    from bentos.factory import served_models, serving_config

    cfg = config or PrecomputeConfig()
    models = served_models(bentoml_home)
    base = serving_config(settings)
    serving = serving_config(settings, ranker_timeout_ms=cfg.ranker_timeout_ms,
                             ranker_queue=max(base.ranker_queue, cfg.workers))
    log.info("precompute models: %s", ", ".join(f"{k}={v}" for k, v in sorted(models.versions.items())))
    experiment = check_pins(experiment_of(settings), bentoml_home)
    return build_engines(settings, models, experiment, bentoml_home, config=serving).default


@dataclass
class _BatchResult:
    written: int = 0
    degraded: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def _run_batch(engine: RecommendationEngine, first_pos: int, users: list[int], n_hot: int,
               cfg: PrecomputeConfig) -> _BatchResult:
    """Compute one batch and write its answers in one pipeline (positions < n_hot: the hot TTL)."""
    out = _BatchResult()
    pipe = engine.client.pipeline(transaction=False)
    for pos, user in enumerate(users, start=first_pos):
        rec = engine.recommend(user, k=engine.config.cache_size, use_cache=False)
        if rec.degraded:  # never cache a degraded answer: the live path will retry
            out.degraded += 1
            out.reasons.update(rec.degraded_reasons or ["degraded"])
            continue
        pipe.set(cache_key(user), cache_payload(rec), ex=cfg.hot_ttl_s if pos < n_hot else cfg.ttl_s)
        out.written += 1
    try:
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.warning("precompute could not write %d answers (users %d..%d): %s", out.written, users[0],
                    users[-1], exc)
        out.failed, out.written = out.written, 0
    return out


def precompute(engine: RecommendationEngine, users: pd.Series, config: PrecomputeConfig | None = None,
               tier: Literal["all", "hot"] = "all", progress: bool = True) -> PrecomputeStats:
    """Compute and cache the answers of ``users`` (a Series user_id -> activity, most active
    first), in batches of at most ``batch`` users on ``workers`` threads sharing ``engine``; the
    batches are made smaller when there are fewer than one per worker. Which users get which TTL
    and what is written does not depend on the number of workers."""
    cfg = config or PrecomputeConfig()
    if tier not in ("all", "hot"):
        raise ValueError(f"tier={tier!r}: choose 'all' or 'hot'")
    n_hot = int(np.ceil(len(users) * cfg.hot_share))
    ids = users.index.to_numpy(dtype=np.int64)
    chosen = (ids[:n_hot] if tier == "hot" else ids).tolist()
    size = max(1, min(cfg.batch, -(-len(chosen) // cfg.workers)))
    total = _BatchResult()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="precompute") as pool, \
            tqdm(total=len(chosen), desc=f"precompute ({tier})", unit="user", disable=not progress) as bar:
        futures = [pool.submit(_run_batch, engine, lo, chosen[lo:lo + size], n_hot, cfg)
                   for lo in range(0, len(chosen), size)]
        for future in as_completed(futures):
            done = future.result()
            total.written += done.written
            total.degraded += done.degraded
            total.failed += done.failed
            total.reasons.update(done.reasons)
            bar.update(done.written + done.degraded + done.failed)
    stats = PrecomputeStats(len(users), n_hot, total.written, total.degraded, total.failed, cfg.workers,
                            time.perf_counter() - started, dict(total.reasons))
    log.info("precompute %s: %s", tier, stats)
    return stats
