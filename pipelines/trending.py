"""Trending items: views and clicks in a sliding window, top N globally and per category, in Redis.

Layout (what serving reads, with :func:`read_trending`):

- ``trending:global`` and ``trending:category:{category_id}``: sorted sets, member = item id,
  score = views + clicks in the window ending at the reference time; at most ``top_n`` members;
  they expire ``ttl_s`` after the last refresh, so a stopped pipeline never serves stale trends.

How the window slides: counts are kept per event-time minute in bucket sets
(``trending:bucket:{minute}:global`` / ``...:category:{c}``). Publishing sums the buckets of the
window's minutes (the minute of the window's end and the ``window_s / 60 - 1`` before it) into the
published sets and trims them to ``top_n``, in one transaction. The stream adds its applied
VIEW/CLICK events to the buckets and republishes every few seconds with the window ending at the
latest event time it has seen; ``recsys trending`` (:func:`refresh_trending`) recounts the whole
window from the offline event log with Spark, replaces those buckets and publishes with the
window ending at the reference time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import redis

from pipelines.realtime_rules import to_us
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

GLOBAL_KEY = "trending:global"
CATEGORIES_KEY = "trending:categories"  # category ids that have buckets
TRENDING_TYPES = (S.EventType.VIEW.value, S.EventType.CLICK.value)
_US_PER_MINUTE = 60_000_000

#: counts[(minute, category or None for global)] = {item_id: count}
BucketCounts = Mapping[tuple[int, int | None], Mapping[int, int]]


def category_key(category_id: int) -> str:
    return f"trending:category:{int(category_id)}"


def bucket_key(minute: int, category_id: int | None = None) -> str:
    scope = "global" if category_id is None else f"category:{int(category_id)}"
    return f"trending:bucket:{minute}:{scope}"


def minute_of(ts_us: int) -> int:
    return ts_us // _US_PER_MINUTE


@dataclass(frozen=True)
class TrendingConfig:
    window_s: int = 3600
    top_n: int = 100
    ttl_s: int = 7200

    def __post_init__(self) -> None:
        if self.window_s < 60 or self.top_n < 1 or self.ttl_s < 1:
            raise ValueError(
                f"trending window {self.window_s}s (>= 60), top_n {self.top_n} (>= 1) and ttl {self.ttl_s}s (>= 1) "
                "are out of range: fix trending_window_s / trending_top_n / trending_ttl_s"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> TrendingConfig:
        return cls(settings.trending_window_s, settings.trending_top_n, settings.trending_ttl_s)

    @property
    def window_minutes(self) -> int:
        return -(-self.window_s // 60)

    def minutes(self, end_us: int) -> range:
        last = minute_of(end_us)
        return range(last - self.window_minutes + 1, last + 1)

    @property
    def bucket_ttl_s(self) -> int:
        return self.window_s + self.ttl_s


def queue_increments(pipe: redis.client.Pipeline, counts: BucketCounts, cfg: TrendingConfig) -> None:
    """Queue adding ``counts`` to the minute buckets on ``pipe`` (a few commands per bucket, not per
    item: the batch's counts go into a scratch set that is summed into the bucket)."""
    for (minute, category), items in counts.items():
        if not items:
            continue
        key = bucket_key(minute, category)
        scratch = f"{key}:incr"
        pipe.zadd(scratch, {str(item): n for item, n in items.items()})
        pipe.zunionstore(key, [key, scratch])
        pipe.delete(scratch)
        pipe.expire(key, cfg.bucket_ttl_s)
        if category is not None:
            pipe.sadd(CATEGORIES_KEY, category)
    if counts:
        pipe.expire(CATEGORIES_KEY, cfg.bucket_ttl_s)


def publish(client: redis.Redis, end_us: int, cfg: TrendingConfig, categories: Iterable[int] | None = None) -> int:
    """Sum the window's buckets into the published sets (global and per category), trimmed to
    ``top_n``, with the TTL; one transaction. Returns how many sets were published."""
    cats = sorted(int(c) for c in (categories if categories is not None else client.smembers(CATEGORIES_KEY)))
    minutes = cfg.minutes(end_us)
    targets = [(GLOBAL_KEY, [bucket_key(m) for m in minutes])]
    targets += [(category_key(c), [bucket_key(m, c) for m in minutes]) for c in cats]
    pipe = client.pipeline(transaction=True)
    for dest, sources in targets:
        pipe.zunionstore(dest, sources)
        pipe.zremrangebyrank(dest, 0, -(cfg.top_n + 1))
        pipe.expire(dest, cfg.ttl_s)
    pipe.execute()
    return len(targets)


def replace_window(client: redis.Redis, counts: BucketCounts, end_us: int, cfg: TrendingConfig) -> None:
    """Make the window's buckets exactly ``counts`` (dropping what the stream had counted there)."""
    minutes = cfg.minutes(end_us)
    known = {int(c) for c in client.smembers(CATEGORIES_KEY)} | {c for _, c in counts if c is not None}
    pipe = client.pipeline(transaction=True)
    for m in minutes:
        pipe.delete(bucket_key(m), *[bucket_key(m, c) for c in known])
    for (minute, category), items in counts.items():
        if items:
            pipe.zadd(bucket_key(minute, category), {str(i): n for i, n in items.items()})
            pipe.expire(bucket_key(minute, category), cfg.bucket_ttl_s)
    if known:
        pipe.sadd(CATEGORIES_KEY, *known)
        pipe.expire(CATEGORIES_KEY, cfg.bucket_ttl_s)
    pipe.execute()


def read_trending(client: redis.Redis, category_id: int | None = None, k: int = 100) -> list[tuple[int, float]]:
    """The top ``k`` trending items (id, views + clicks), best first; [] when none or expired."""
    key = GLOBAL_KEY if category_id is None else category_key(category_id)
    return [(int(item), score) for item, score in client.zrevrange(key, 0, k - 1, withscores=True)]


# ---- the Spark refresh (recsys trending) -------------------------------------------------------------


def window_counts(spark: SparkSession, settings: Settings, end: datetime, cfg: TrendingConfig) -> dict:
    """Views and clicks per (minute, category, item) over the window's minutes, from the offline
    event log (the canonical events) joined to the items' categories."""
    from pyspark.sql import functions as F

    minutes = cfg.minutes(to_us(end))
    start = datetime.fromtimestamp(minutes.start * 60, tz=timezone.utc)
    events = (spark.read.parquet(str(settings.dataset_path / "events"))
              .where((F.col(S.COL_TS) >= F.lit(start)) & (F.col(S.COL_TS) <= F.lit(end))
                     & F.col(S.COL_EVENT_TYPE).isin(*TRENDING_TYPES)))
    items = spark.read.parquet(str(settings.dataset_path / "items")).select(S.COL_ITEM, S.COL_CATEGORY)
    grouped = (events.join(items, S.COL_ITEM, "left")
               .groupBy(F.floor(F.unix_micros(S.COL_TS) / _US_PER_MINUTE).alias("minute"), S.COL_CATEGORY, S.COL_ITEM)
               .count())
    counts: dict[tuple[int, int | None], dict[int, int]] = {}
    for row in grouped.toLocalIterator():
        minute, category, item, n = int(row["minute"]), row[S.COL_CATEGORY], int(row[S.COL_ITEM]), int(row["count"])
        glob = counts.setdefault((minute, None), {})
        glob[item] = glob.get(item, 0) + n
        if category is not None:
            counts.setdefault((minute, int(category)), {})[item] = n
    return counts


@dataclass(frozen=True)
class TrendingRefresh:
    end: datetime
    events: int
    items: int
    categories: int


def refresh_trending(settings: Settings, spark: SparkSession, end: datetime) -> TrendingRefresh:
    """Recount the window ending at ``end`` from the offline log and publish it (``recsys trending``)."""
    cfg = TrendingConfig.from_settings(settings)
    counts = window_counts(spark, settings, end, cfg)
    client = redis.Redis.from_url(settings.effective_redis_url)
    try:
        replace_window(client, counts, to_us(end), cfg)
        publish(client, to_us(end), cfg)
    finally:
        client.close()
    glob = [items for (_, c), items in counts.items() if c is None]
    n_events = sum(sum(items.values()) for items in glob)
    n_items = len({i for items in glob for i in items})
    n_cats = len({c for _, c in counts if c is not None})
    log.info("trending window=%s..%s events=%d items=%d categories=%d",
             end - timedelta(seconds=cfg.window_s), end.isoformat(), n_events, n_items, n_cats)
    return TrendingRefresh(end, n_events, n_items, n_cats)
