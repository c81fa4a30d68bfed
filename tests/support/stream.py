"""The stream tests' data and helpers: a hand-made catalogue and clickstream, a scoped Redis
database, topics and consumer group per test, the reference fold, and the `recsys stream run` CLI
in a subprocess.

The catalogue is items 1..12, category = (item - 1) // 3; the clickstream is deterministic for
users 1..4 plus a hand-computed user 9 (:func:`hand_events`, :data:`HAND_EXPECTED`).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from kafka import KafkaConsumer, TopicPartition

from pipelines import feature_store as fs
from pipelines.canonical import CanonicalWriter
from pipelines.events import EventProducer
from pipelines.live_log import LIVE_PREFIX, REPLAY_HEADERS
from pipelines.realtime_rules import FEATURES, DedupeWindow, Event, UserState, fold_user, to_us
from pipelines.stack import ensure_topics
from pipelines.stream import StateStore, StreamOptions, StreamProcessor
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from tests.support.settings import REPO

END = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
N_ITEMS = 12
STREAM_USERS = (1, 2, 3, 4)
HAND_USER = 9
TYPES = ["VIEW"] * 6 + ["CLICK"] * 3 + ["ADD_TO_CART", "PURCHASE", "RATING"]


def category(item: int) -> int:
    return (item - 1) // 3


def clickstream(users: tuple[int, ...], per_user: int, seed: int, prefix: str,
                end: datetime = END) -> list[dict[str, Any]]:
    """Deterministic events over the two hours before ``end``, distinct times within a user."""
    rng = random.Random(seed)
    events = []
    for user in users:
        times = sorted(rng.sample(range(1, 7_200_000), per_user))  # milliseconds before END
        for n, ms in enumerate(reversed(times)):
            etype = rng.choice(TYPES)
            events.append({
                S.COL_EVENT_ID: f"{prefix}-{user}-{n}", S.COL_USER: user, S.COL_ITEM: rng.randint(1, N_ITEMS),
                S.COL_EVENT_TYPE: etype, S.COL_VALUE: float(rng.randint(1, 5)) if etype == "RATING" else None,
                S.COL_TS: end - timedelta(milliseconds=ms), S.COL_SESSION: f"s{user}",
                S.COL_CONTEXT: {"device": "web", "location": "GB", "referrer": "direct"},
            })
    return events


def hand_events() -> list[dict[str, Any]]:
    """User 9, worked out by hand (category = (item - 1) // 3):
    VIEW 1 (t0), CLICK 2 (t1), PURCHASE 4 (t2, cat 1), RATING 7 = 5 (t3, cat 2), RATING 8 = 2 (t4: counts
    only), VIEW 1 again (t5: moves to the end), PURCHASE 5 (t6, cat 1). Items the user has (never
    recommended): 4 and 5 bought, 7 and 8 rated."""
    steps = [("VIEW", 1, None), ("CLICK", 2, None), ("PURCHASE", 4, None), ("RATING", 7, 5.0), ("RATING", 8, 2.0),
             ("VIEW", 1, None), ("PURCHASE", 5, None)]
    return [{S.COL_EVENT_ID: f"h{i}", S.COL_USER: HAND_USER, S.COL_ITEM: item, S.COL_EVENT_TYPE: etype,
             S.COL_VALUE: value, S.COL_TS: END - timedelta(minutes=30) + timedelta(seconds=10 * i),
             S.COL_SESSION: None, S.COL_CONTEXT: None} for i, (etype, item, value) in enumerate(steps)]


HAND_EXPECTED = {
    "last_5_items": [2, 7, 1],
    "last_action_ts": END - timedelta(minutes=30) + timedelta(seconds=60),
    "interaction_count": 7,
    "total_purchases": 2,
    "preferred_categories": [1, 2],  # category 1 twice, category 2 once
}
CANONICAL_EVENTS = clickstream(STREAM_USERS, 150, seed=1, prefix="c") + hand_events()


def write_dataset(path: Path, events: list[dict[str, Any]]) -> None:
    items = [{S.COL_ITEM: i, "title": f"Item {i}", S.COL_CATEGORY: category(i), "tags": [], "price": 1.0,
              "margin": 0.1, "quality_score": 4.0, "inventory": 10, S.COL_CREATED_AT: END - timedelta(days=30),
              "image_url": None} for i in range(1, N_ITEMS + 1)]
    users = sorted({e[S.COL_USER] for e in events})
    with CanonicalWriter(path, source="test-stream") as writer:
        writer.add_items(pa.Table.from_pylist(items, schema=S.ITEMS_SCHEMA))
        writer.add_users(pa.Table.from_pylist(
            [{S.COL_USER: u, "age": 30, "gender": "F", "occupation": "x", "zip_code": "0",
              S.COL_CREATED_AT: END - timedelta(days=30)} for u in users], schema=S.USERS_SCHEMA))
        writer.add_events(pa.Table.from_pylist(events, schema=S.EVENTS_SCHEMA))


_DBS = iter(range(1, 16))


def scoped(ws: Settings, name: str) -> Settings:
    """Its own Redis database, topics and consumer group."""
    uid = uuid.uuid4().hex[:6]
    settings = ws.with_overrides(redis_url=f"redis://127.0.0.1:{ws.redis_port}/{next(_DBS)}",
                                 events_topic=f"{name}-{uid}", dlq_topic=f"{name}-{uid}.dlq",
                                 stream_group_id=f"g-{name}-{uid}")
    redis.Redis.from_url(settings.effective_redis_url).flushdb()
    ensure_topics(settings)
    return settings


def produce(settings: Settings, events: list[dict[str, Any]], replay: bool = False) -> None:
    """Send ``events`` keyed by user; ``replay``: as ``recsys events replay`` sends events the
    offline log already holds (the stream folds them but does not log them again)."""
    headers = REPLAY_HEADERS if replay else None
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic, headers=headers) as producer:
        producer.send_many(events)


def live_events(settings: Settings) -> pd.DataFrame:
    """The events that the stream of ``settings.events_topic`` logged in the dataset's events table."""
    files = sorted((settings.dataset_path / "events").glob(f"{LIVE_PREFIX}*-{settings.events_topic}-p*.parquet"))
    if not files:
        return S.EVENTS_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()


def run_stream(settings: Settings, **options: Any) -> Any:
    opts = StreamOptions.from_settings(settings, stop_when_caught_up=True, offline_flush_s=3600.0, **options)
    return StreamProcessor(settings, opts).run()


def as_rule_events(events: list[dict[str, Any]]) -> list[Event]:
    return [Event(e[S.COL_EVENT_ID], e[S.COL_USER], e[S.COL_ITEM], e[S.COL_EVENT_TYPE], e[S.COL_VALUE],
                  to_us(e[S.COL_TS]), category(e[S.COL_ITEM])) for e in events]


def reference(settings: Settings, events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The pure-Python fold of the same events, as Feast serves them (last_action_ts in whole seconds)."""
    states = fold_events(as_rule_events(events), StreamOptions.from_settings(settings).window)
    return {u: {**st.features(), "last_action_ts": st.last_action.replace(microsecond=0)} for u, st in states.items()}


def reference_purchased(events: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Each user's purchased items by the pure fold (the default bound)."""
    return {u: set(st.purchased_items) for u, st in fold_events(as_rule_events(events)).items()}


def purchased_sets(settings: Settings, users: Iterable[int]) -> dict[int, set[int]]:
    """What serving reads: each user's Redis set at ``purchased_key`` (empty when absent)."""
    client = redis.Redis.from_url(settings.effective_redis_url)
    return {u: {int(m) for m in client.smembers(S.purchased_key(u))} for u in users}


def online(settings: Settings, users: list[int]) -> dict[int, dict[str, Any]]:
    """What Feast's own online read returns for these users."""
    got = fs.get_store(settings).get_online_features(
        features=[f"{T.USER_REALTIME}:{f}" for f in FEATURES], entity_rows=[{S.COL_USER: u} for u in users]).to_dict()
    return {u: {f: got[f][i] for f in FEATURES} for i, u in enumerate(users)}


def offline_rows(settings: Settings, users: list[int]) -> pd.DataFrame:
    frame = pd.read_parquet(T.table_path(settings, T.USER_REALTIME))
    frame = frame[frame[S.COL_USER].isin(users) & ~frame[S.COL_USER].isna()]
    for col in ("last_5_items", "preferred_categories"):
        frame[col] = frame[col].map(list)
    return frame


def committed_total(settings: Settings) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap, group_id=settings.stream_group_id,
                             enable_auto_commit=False)
    try:
        parts = [TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)]
        return sum(consumer.committed(tp) or 0 for tp in parts)
    finally:
        consumer.close()


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update({
        "RECSYS_HOME": str(settings.home), "RECSYS_DATA_DIR": str(settings.data_path),
        "RECSYS_RUN_DIR": str(settings.run_path), "RECSYS_DATASET": settings.dataset,
        "RECSYS_FEAST_PROJECT": settings.feast_project, "REDIS_URL": settings.effective_redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": settings.effective_kafka_bootstrap, "RECSYS_EVENTS_TOPIC": settings.events_topic,
        "RECSYS_DLQ_TOPIC": settings.dlq_topic, "RECSYS_STREAM_GROUP_ID": settings.stream_group_id,
    })
    return env


def start_cli(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).with_name("recsys")), "stream", "run", "--batch-events", "100",
               "--offline-flush-s", "2", *args]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(settings), stdout=subprocess.PIPE,  # noqa: S603
                            stderr=subprocess.STDOUT)


def applied_so_far(settings: Settings, users: tuple[int, ...]) -> int:
    store = StateStore(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project, settings.events_topic)
    return sum(st.count for st in store.load(list(users)))


def wait_for_progress(settings: Settings, users: tuple[int, ...], proc: subprocess.Popen[bytes]) -> int:
    for _ in range(1200):
        done = applied_so_far(settings, users)
        if done > 0:
            return done
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
        time.sleep(0.1)
    raise AssertionError("the consumer made no progress in 120 s")


def fold_events(events: Iterable[Event], window: DedupeWindow | None = None) -> dict[int, UserState]:
    """The reference the stream is checked against: every user's final state after all ``events``
    (any order, duplicates allowed), by the same rules the stream folds with."""
    window = window or DedupeWindow()
    by_user: dict[int, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    states = {}
    for user, user_events in by_user.items():
        state = UserState()
        for _ in fold_user(user_events, window, state):
            pass
        states[user] = state
    return states
