"""The stream end to end: the real Tansu broker, the real valkey server, real Feast (and Spark for
the offline log, the backfill and the trending refresh). No mocks.

One feature workspace per module: a hand-made catalogue (items 1..12, category = (item - 1) // 3),
a deterministic clickstream for users 1..4 plus a hand-computed user 9, all written as the
canonical dataset, then `feast apply`. Each test gets its own Redis database, topics and consumer
group, so the stores it asserts on hold only what it produced.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipelines import feature_store as fs
from pipelines import trending
from pipelines.canonical import CanonicalWriter
from pipelines.events import EventProducer, event_to_message
from pipelines.realtime_rules import FEATURES, Event, UserState, fold_events, to_us
from pipelines.stack import ensure_topics, free_port
from pipelines.stream import OnlineRowWriter, StateStore, StreamOptions, StreamProcessor, recs_cache_key, state_row
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

REPO = Path(__file__).resolve().parents[2]
END = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
N_ITEMS = 12
STREAM_USERS = (1, 2, 3, 4)
HAND_USER = 9
TYPES = ["VIEW"] * 6 + ["CLICK"] * 3 + ["ADD_TO_CART", "PURCHASE", "RATING"]


def category(item: int) -> int:
    return (item - 1) // 3


def clickstream(users: tuple[int, ...], per_user: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Deterministic events over the two hours before END, distinct times within a user."""
    rng = random.Random(seed)
    events = []
    for user in users:
        times = sorted(rng.sample(range(1, 7_200_000), per_user))  # milliseconds before END
        for n, ms in enumerate(reversed(times)):
            etype = rng.choice(TYPES)
            events.append({
                S.COL_EVENT_ID: f"{prefix}-{user}-{n}", S.COL_USER: user, S.COL_ITEM: rng.randint(1, N_ITEMS),
                S.COL_EVENT_TYPE: etype, S.COL_VALUE: float(rng.randint(1, 5)) if etype == "RATING" else None,
                S.COL_TS: END - timedelta(milliseconds=ms), S.COL_SESSION: f"s{user}",
                S.COL_CONTEXT: {"device": "web", "location": "GB", "referrer": "direct"},
            })
    return events


def hand_events() -> list[dict[str, Any]]:
    """User 9, worked out by hand (category = (item - 1) // 3):
    VIEW 1 (t0), CLICK 2 (t1), PURCHASE 4 (t2, cat 1), RATING 7 = 5 (t3, cat 2), RATING 8 = 2 (t4: counts
    only), VIEW 1 again (t5: moves to the end), PURCHASE 5 (t6, cat 1)."""
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


@pytest.fixture(scope="module")
def ws(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("stream")
    settings = stack_settings.with_overrides(data_dir=tmp / "data", dataset="rt",
                                             feast_project=f"s{uuid.uuid4().hex[:8]}")
    write_dataset(settings.dataset_path, CANONICAL_EVENTS)
    fs.apply(settings)
    return settings


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


def produce(settings: Settings, events: list[dict[str, Any]]) -> None:
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic) as producer:
        producer.send_many(events)


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


# ---- in process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(ws: Settings) -> Iterator[tuple[Settings, Any]]:
    """The canonical events through the stream once (and the recs cache of user 1 set beforehand)."""
    settings = scoped(ws, "main")
    redis.Redis.from_url(settings.effective_redis_url).set(recs_cache_key(1), b"cached")
    produce(settings, CANONICAL_EVENTS)
    stats = run_stream(settings)
    yield settings, stats


def test_online_features_equal_the_fold(streamed: tuple[Settings, Any]) -> None:
    settings, stats = streamed
    users = [*STREAM_USERS, HAND_USER]
    assert online(settings, users) == reference(settings, CANONICAL_EVENTS)
    got = online(settings, [HAND_USER])[HAND_USER]
    assert got == HAND_EXPECTED
    assert (stats.events, stats.applied, stats.duplicates, stats.dead_letters) == (607, 607, 0, 0)
    assert redis.Redis.from_url(settings.effective_redis_url).exists(recs_cache_key(1)) == 0


def test_offline_log_holds_what_serving_saw(streamed: tuple[Settings, Any]) -> None:
    settings, _ = streamed
    rows = offline_rows(settings, [HAND_USER])
    rows = rows[rows[T.CREATED] > END]  # the stream's rows (not a backfill's)
    last = rows.sort_values([S.COL_TS, T.CREATED]).iloc[-1]
    assert last["interaction_count"] == 7 and last["last_5_items"] == [2, 7, 1]
    assert last[S.COL_TS] == pd.Timestamp(HAND_EXPECTED["last_action_ts"])


def test_replaying_the_same_events_changes_nothing(streamed: tuple[Settings, Any]) -> None:
    settings, _ = streamed
    users = [*STREAM_USERS, HAND_USER]
    before = online(settings, users)
    produce(settings, CANONICAL_EVENTS)
    stats = run_stream(settings)
    assert (stats.events, stats.applied, stats.duplicates, stats.rows_online) == (607, 0, 607, 0)
    assert online(settings, users) == before == reference(settings, CANONICAL_EVENTS)


def test_stream_keeps_trending_current(streamed: tuple[Settings, Any]) -> None:
    settings, _ = streamed
    cfg = trending.TrendingConfig.from_settings(settings)
    end = max(to_us(e[S.COL_TS]) for e in CANONICAL_EVENTS)  # the stream's watermark
    minutes = set(cfg.minutes(end))
    counts: dict[int, int] = {}
    for e in CANONICAL_EVENTS:
        if e[S.COL_EVENT_TYPE] in ("VIEW", "CLICK") and trending.minute_of(to_us(e[S.COL_TS])) in minutes:
            counts[e[S.COL_ITEM]] = counts.get(e[S.COL_ITEM], 0) + 1
    client = redis.Redis.from_url(settings.effective_redis_url)
    assert dict(trending.read_trending(client)) == counts
    cat0 = {i: n for i, n in counts.items() if category(i) == 0}
    assert dict(trending.read_trending(client, 0)) == cat0
    assert 0 < client.ttl(trending.GLOBAL_KEY) <= cfg.ttl_s


@pytest.mark.slow
def test_trending_refresh_from_the_offline_log_matches_the_stream(streamed: tuple[Settings, Any]) -> None:
    from recsys.spark import get_spark

    settings, _ = streamed
    client = redis.Redis.from_url(settings.effective_redis_url)
    by_stream = {c: trending.read_trending(client, c) for c in (None, 0, 1, 2, 3)}
    end = max(e[S.COL_TS] for e in CANONICAL_EVENTS)
    result = trending.refresh_trending(settings, get_spark(settings), end)
    assert {c: trending.read_trending(client, c) for c in (None, 0, 1, 2, 3)} == by_stream
    assert result.events == sum(n for _, n in by_stream[None])


@pytest.mark.slow
def test_backfill_agrees_with_the_stream(streamed: tuple[Settings, Any]) -> None:
    from pipelines.backfill import run_backfill
    from recsys.spark import get_spark

    settings, _ = streamed
    users = [*STREAM_USERS, HAND_USER]
    stream_rows = offline_rows(settings, users)
    result = run_backfill(get_spark(settings), settings, END)
    assert (result.rows, result.users) == (607, 5)  # one row per event: every event has its own instant
    rows = offline_rows(settings, users)
    backfill = rows[rows[T.CREATED] > stream_rows[T.CREATED].max()]
    cols = [S.COL_USER, S.COL_TS, *[f for f in FEATURES]]
    # the backfill's last row per user is what the stream serves
    last = backfill.sort_values(S.COL_TS).groupby(S.COL_USER).tail(1).set_index(S.COL_USER)
    expected = reference(settings, CANONICAL_EVENTS)
    for user in users:
        got = {f: last.loc[user, f] for f in FEATURES}
        got["last_action_ts"] = got["last_action_ts"].to_pydatetime().replace(microsecond=0)
        assert got == expected[user]
    # and every row the stream logged equals the backfill's row at the same instant
    merged = stream_rows[cols].merge(backfill[cols], on=[S.COL_USER, S.COL_TS], suffixes=("_s", "_b"))
    assert len(merged) == len(stream_rows)
    for f in FEATURES:
        assert merged[f"{f}_s"].tolist() == merged[f"{f}_b"].tolist()
    # a rerun replaces its files instead of adding rows
    run_backfill(get_spark(settings), settings, END)
    assert len(offline_rows(settings, users)) == len(rows)


def test_dead_letters_get_exactly_the_malformed_events(ws: Settings) -> None:
    settings = scoped(ws, "dlq")
    good = hand_events()
    _, template = event_to_message(good[0])

    def variant(**changes: Any) -> bytes:
        body = json.loads(template)
        body.update(changes, event_id=f"bad-{len(changes)}-{sorted(changes)}")
        return json.dumps(body).encode()

    bad = {
        b"{not json": "malformed JSON",
        variant(event_type="LIKE"): "unknown event_type",
        variant(user_id=None): "missing or non-numeric user_id",
        variant(item_id=-4): "negative item_id",
        variant(item_id=999): "item_id not in catalogue",
        variant(event_timestamp="2100-01-01T00:00:00Z"): "event_timestamp in the future",
        variant(schema_version=99): "unsupported schema_version 99",
    }
    producer = KafkaProducer(bootstrap_servers=settings.effective_kafka_bootstrap)
    for i, event in enumerate(good):
        key, value = event_to_message(event)
        producer.send(settings.events_topic, key=key, value=value)
        if i < len(bad):
            producer.send(settings.events_topic, key=key, value=list(bad)[i])
    producer.flush()
    producer.close()

    stats = run_stream(settings)
    assert (stats.applied, stats.dead_letters) == (7, 7)
    assert online(settings, [HAND_USER])[HAND_USER] == HAND_EXPECTED  # the stream went on

    consumer = KafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.effective_kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    letters = {m.value: dict(m.headers) for m in consumer}
    consumer.close()
    assert set(letters) == set(bad)
    for value, reason in bad.items():
        assert letters[value]["reason"].decode().startswith(reason)
        assert letters[value]["source_topic"].decode() == settings.events_topic


# ---- the real CLI in a subprocess: SIGKILL and SIGTERM -----------------------------------------------


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


KILL_USERS = (101, 102, 103)


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_equals_the_reference(ws: Settings) -> None:
    settings = scoped(ws, "kill")
    events = clickstream(KILL_USERS, 4000, seed=2, prefix="k")
    produce(settings, events)
    proc = start_cli(settings)
    wait_for_progress(settings, KILL_USERS, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert applied_so_far(settings, KILL_USERS) < len(events)  # it died in the middle

    restarted = start_cli(settings, "--stop-when-caught-up")
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, out.decode()[-3000:]
    assert online(settings, list(KILL_USERS)) == reference(settings, events)
    assert committed_total(settings) == len(events)
    # the offline log ends with the same state (rows appended twice by the crash are identical)
    rows = offline_rows(settings, list(KILL_USERS)).sort_values([S.COL_TS, T.CREATED])
    last = rows.groupby(S.COL_USER).tail(1).set_index(S.COL_USER)
    expected = reference(settings, events)
    assert {u: int(last.loc[u, "interaction_count"]) for u in KILL_USERS} == \
        {u: expected[u]["interaction_count"] for u in KILL_USERS} == {u: 4000 for u in KILL_USERS}


@pytest.mark.slow
def test_sigterm_leaves_no_processed_event_uncommitted(ws: Settings) -> None:
    settings = scoped(ws, "term")
    users = (201, 202)
    events = clickstream(users, 6000, seed=3, prefix="t")
    produce(settings, events)
    port = free_port()
    proc = start_cli(settings, "--metrics-port", str(port))
    wait_for_progress(settings, users, proc)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()  # noqa: S310
    assert "recsys_stream_consumer_lag" in metrics and "recsys_stream_push_seconds" in metrics
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    applied = applied_so_far(settings, users)
    # every event it folded is committed, and nothing it did not fold is
    assert committed_total(settings) == summary["events"] == summary["applied"] == applied
    assert summary["rows_offline"] == summary["rows_online"]
    store = StateStore(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project,
                       settings.events_topic)
    assert store.outbox_size(range(settings.events_partitions)) == 0


def test_state_survives_in_redis_between_runs(streamed: tuple[Settings, Any]) -> None:
    settings, _ = streamed
    store = StateStore(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project,
                       settings.events_topic)
    state: UserState = store.load_one(HAND_USER)
    assert state.count == 7 and sorted(state.seen) == [f"h{i}" for i in range(7)]
    assert state.cats == {1: [2, to_us(END - timedelta(seconds=1740)), "h6"],
                          2: [1, to_us(END - timedelta(seconds=1770)), "h3"]}


def test_online_rows_are_written_as_feasts_own_writer_writes_them(streamed: tuple[Settings, Any]) -> None:
    settings, _ = streamed
    client = redis.Redis.from_url(settings.effective_redis_url)
    writer = OnlineRowWriter(fs.get_store(settings, skip_dedup=True))
    assert writer.in_transaction  # a plain Redis: the rows go in the state transaction
    store = StateStore(client, settings.feast_project, settings.events_topic)
    for user in (*STREAM_USERS, HAND_USER):  # event times in milliseconds, and in whole seconds
        key = writer.key(user)
        by_stream = client.hgetall(key)
        assert by_stream  # the stream wrote the user's row under Feast's key
        client.delete(key)
        writer.write([state_row(user, store.load_one(user), 0)])  # Feast's own online_write_batch
        assert client.hgetall(key) == by_stream
