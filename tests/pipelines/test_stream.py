"""The stream end to end: the real Tansu broker, the real valkey server, real Feast (and Spark for
the offline log, the backfill and the trending refresh). No mocks.

One feature workspace per module: a hand-made catalogue (items 1..12, category = (item - 1) // 3),
a deterministic clickstream for users 1..4 plus a hand-computed user 9 (:mod:`tests.support.stream`),
all written as the canonical dataset, then `feast apply`. Each test gets its own Redis database,
topics and consumer group, so the stores it asserts on hold only what it produced.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from pipelines import feature_store as fs
from pipelines import trending
from pipelines.events import event_to_message
from pipelines.live_log import REPLAY_HEADERS, live_summary
from pipelines.realtime_rules import FEATURES, UserState, to_us
from pipelines.stack import free_port
from pipelines.stream import (
    OnlineRowWriter,
    StateStore,
    StreamOptions,
    StreamProcessor,
    activity_key,
    live_activity,
    state_row,
)
from pipelines.stream.activity import ACTIVITY_RETENTION_S, hour_of
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.schema import recs_cache_key
from tests.support.stream import (
    CANONICAL_EVENTS,
    END,
    HAND_EXPECTED,
    HAND_USER,
    STREAM_USERS,
    applied_so_far,
    category,
    clickstream,
    committed_total,
    hand_events,
    live_events,
    offline_rows,
    online,
    produce,
    purchased_sets,
    reference,
    reference_purchased,
    run_stream,
    scoped,
    start_cli,
    wait_for_progress,
    write_dataset,
)

#: events that are not the dataset's (the SIGKILL, SIGTERM and purchase tests) happen after it: the
#: stream appends them to the dataset's events table, where the backfill and the trending refresh
#: (which read up to END) do not see them
LIVE_END = END + timedelta(days=1)


@pytest.fixture(scope="module")
def ws(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("stream")
    settings = stack_settings.with_overrides(data_dir=tmp / "data", dataset="rt",
                                             feast_project=f"s{uuid.uuid4().hex[:8]}")
    write_dataset(settings.dataset_path, CANONICAL_EVENTS)
    fs.apply(settings)
    return settings


# ---- in process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(ws: Settings) -> Iterator[tuple[Settings, Any]]:
    """The canonical events through the stream once (and the recs cache of user 1 set beforehand)."""
    settings = scoped(ws, "main")
    redis.Redis.from_url(settings.effective_redis_url).set(recs_cache_key(1), b"cached")
    produce(settings, CANONICAL_EVENTS, replay=True)  # the dataset's own events, as `recsys events replay` sends them
    stats = run_stream(settings)
    yield settings, stats


def test_online_features_equal_the_fold(streamed: tuple[Settings, Any]) -> None:
    settings, stats = streamed
    users = [*STREAM_USERS, HAND_USER]
    assert online(settings, users) == reference(settings, CANONICAL_EVENTS)
    got = online(settings, [HAND_USER])[HAND_USER]
    assert got == HAND_EXPECTED
    assert (stats.events, stats.applied, stats.duplicates, stats.dead_letters) == (607, 607, 0, 0)
    assert stats.events_offline == 0 and live_events(settings).empty  # a replay of the log is not logged again
    assert redis.Redis.from_url(settings.effective_redis_url).exists(recs_cache_key(1)) == 0
    # the purchased sets serving reads: user 9 bought 4 and 5 (hand_events); the others as the fold says
    assert purchased_sets(settings, users) == reference_purchased(CANONICAL_EVENTS)
    assert purchased_sets(settings, [HAND_USER]) == {HAND_USER: {4, 5, 7, 8}}  # bought 4, 5; rated 7, 8


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
    produce(settings, CANONICAL_EVENTS, replay=True)
    stats = run_stream(settings)
    assert (stats.events, stats.applied, stats.duplicates, stats.rows_online) == (607, 0, 607, 0)
    assert online(settings, users) == before == reference(settings, CANONICAL_EVENTS)
    assert purchased_sets(settings, users) == reference_purchased(CANONICAL_EVENTS)
    # the activity set counted nothing twice (users 1..4: 150 events each, user 9: 7)
    assert live_activity(redis.Redis.from_url(settings.effective_redis_url), settings.feast_project, END,
                         24).to_dict() == {1: 150, 2: 150, 3: 150, 4: 150, HAND_USER: 7}


def test_the_activity_set_counts_each_users_events_by_the_hour(streamed: tuple[Settings, Any]) -> None:
    """What precompute reads as the stream's active users. Users 1..4 sent 150 events each in the
    two hours before END (12:00, so from 10:00 on), user 9 its 7 hand events at 11:30."""
    settings, _ = streamed
    client = redis.Redis.from_url(settings.effective_redis_url)
    project = settings.feast_project
    assert live_activity(client, project, END, 24).sort_index().to_dict() == {1: 150, 2: 150, 3: 150, 4: 150,
                                                                              HAND_USER: 7}
    # one hour ending at 12:00 reads the hours 11:00-12:00 and 12:00-13:00 (empty): events from 11:00 on
    last_hour = Counter(e[S.COL_USER] for e in CANONICAL_EVENTS if e[S.COL_TS] >= END - timedelta(hours=1))
    assert live_activity(client, project, END, 1).to_dict() == dict(last_hour) and last_hour[HAND_USER] == 7
    # a window ending at 09:59 reads the hours 08:00 and 09:00: nobody
    assert live_activity(client, project, END - timedelta(hours=2, minutes=1), 1).empty
    # each hour expires a retention (48 h) plus an hour after its last write
    key = activity_key(project, hour_of(to_us(END - timedelta(minutes=30))))
    assert 0 < client.ttl(key) <= ACTIVITY_RETENTION_S + 3_600


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
def test_backfill_agrees_with_the_stream(streamed: tuple[Settings, Any], ws: Settings) -> None:
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
    # a rerun replaces its files instead of adding rows; seeding an empty Redis database (the same
    # dataset) writes the states and the purchased sets the stream built (user 9 bought 4 and 5)
    seeded = scoped(ws, "seed")
    result = run_backfill(get_spark(seeded), seeded, END, seed_state=True)
    assert len(offline_rows(settings, users)) == len(rows)
    assert result.seeded == 5
    assert purchased_sets(seeded, users) == purchased_sets(settings, users) == reference_purchased(CANONICAL_EVENTS)
    assert purchased_sets(seeded, [HAND_USER]) == {HAND_USER: {4, 5, 7, 8}}  # bought 4, 5; rated 7, 8


BUYER, BOUNDED, RATER = 31, 32, 33


def purchase_events() -> list[dict[str, Any]]:
    """User 31: PURCHASE 3 (t0), VIEW 5 (t1), PURCHASE 7 (t2). User 32: PURCHASE 3, 7, 9 (t0..t2).
    User 33: only a RATING of 5 (a low one, 2.0: the film was watched all the same)."""
    steps = [(BUYER, "PURCHASE", 3), (BUYER, "VIEW", 5), (BUYER, "PURCHASE", 7),
             (BOUNDED, "PURCHASE", 3), (BOUNDED, "PURCHASE", 7), (BOUNDED, "PURCHASE", 9), (RATER, "RATING", 5)]
    return [{S.COL_EVENT_ID: f"b{i}", S.COL_USER: user, S.COL_ITEM: item, S.COL_EVENT_TYPE: etype,
             S.COL_VALUE: 2.0 if etype == "RATING" else None,
             S.COL_TS: LIVE_END - timedelta(minutes=10) + timedelta(seconds=10 * (i % 3)),
             S.COL_SESSION: None, S.COL_CONTEXT: None} for i, (user, etype, item) in enumerate(steps)]


def test_stream_keeps_the_latest_purchases_and_a_redelivery_changes_nothing(ws: Settings) -> None:
    settings = scoped(ws, "buy")
    client = redis.Redis.from_url(settings.effective_redis_url)
    client.set(recs_cache_key(BUYER), b"cached")  # an answer cached before the purchase
    events = purchase_events()
    produce(settings, events)
    stats = run_stream(settings, purchased_max=2)
    assert (stats.applied, stats.duplicates) == (7, 0)
    # 31: the VIEW of 5 is not a purchase -> {3, 7}; 32: bound 2, so its oldest purchase (3) falls
    # out; 33: a batch with a RATING only still writes the set -> {5}
    assert purchased_sets(settings, [BUYER, BOUNDED, RATER]) == {BUYER: {3, 7}, BOUNDED: {7, 9}, RATER: {5}}
    assert client.exists(recs_cache_key(BUYER)) == 0  # the stale answer is gone with the purchase
    assert sorted(live_events(settings)[S.COL_EVENT_ID]) == [f"b{i}" for i in range(7)]  # each logged offline
    produce(settings, events)  # the same events again, at new offsets (a producer's retry)
    stats = run_stream(settings, purchased_max=2)
    assert (stats.applied, stats.duplicates) == (0, 7)
    assert sorted(live_events(settings)[S.COL_EVENT_ID]) == [f"b{i}" for i in range(7)]  # not logged again
    # PURCHASE 3 of user 32 again is a duplicate: it does not come back
    assert purchased_sets(settings, [BUYER, BOUNDED]) == {BUYER: {3, 7}, BOUNDED: {7, 9}}


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
        key, value = event_to_message(event)  # user 9's events are the dataset's: sent as a replay
        producer.send(settings.events_topic, key=key, value=value, headers=list(REPLAY_HEADERS))
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


KILL_USERS = (101, 102, 103)


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_equals_the_reference(ws: Settings) -> None:
    settings = scoped(ws, "kill")
    events = clickstream(KILL_USERS, 4000, seed=2, prefix="k", end=LIVE_END)
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
    # the offline event log holds every event exactly once, though flushes (every 2 s) were cut by the kill
    logged = live_events(settings)
    assert len(logged) == len(events) == 12_000
    assert set(logged[S.COL_EVENT_ID]) == {e[S.COL_EVENT_ID] for e in events}


@pytest.mark.slow
def test_sigterm_leaves_no_processed_event_uncommitted(ws: Settings) -> None:
    settings = scoped(ws, "term")
    users = (201, 202)
    events = clickstream(users, 6000, seed=3, prefix="t", end=LIVE_END)
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
    assert summary["events_offline"] == applied == len(live_events(settings))
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


NEW_ITEM, NEW_ITEM_USER = 13, 41  # the catalogue is items 1..12


def test_an_item_added_while_streaming_is_accepted_and_logged(ws: Settings) -> None:
    """POST /items writes the item to the dataset's items table (record_new_item, called here as the
    service calls it); the running consumer's catalogue (loaded before) reloads on the event for an
    unknown item instead of dead-lettering it. catalogue_reload_s=0: the event may come less than the
    default second after the catalogue was loaded."""
    from bentos.factory import record_new_item

    settings = scoped(ws, "item")
    processor = StreamProcessor(settings, StreamOptions.from_settings(settings, offline_flush_s=3600.0,
                                                                      catalogue_reload_s=0.0))
    runner = threading.Thread(target=processor.run, daemon=True)
    runner.start()
    try:
        assert processor.assigned.wait(60), "the consumer got no partition in 60 s"
        assert record_new_item(settings, {S.COL_ITEM: NEW_ITEM, "title": "New", S.COL_CATEGORY: 4, "tags": ["n"],
                                          S.COL_CREATED_AT: LIVE_END.isoformat()})
        event = {S.COL_EVENT_ID: "n1", S.COL_USER: NEW_ITEM_USER, S.COL_ITEM: NEW_ITEM,
                 S.COL_EVENT_TYPE: "PURCHASE", S.COL_VALUE: None, S.COL_TS: LIVE_END, S.COL_SESSION: None,
                 S.COL_CONTEXT: None}
        produce(settings, [event])
        deadline = time.monotonic() + 60  # a generous bound: the event takes a batch (100 ms) normally
        while processor.stats.events < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        processor.request_stop()
        runner.join(120)
    assert (processor.stats.applied, processor.stats.dead_letters) == (1, 0)
    assert live_events(settings)[S.COL_EVENT_ID].tolist() == ["n1"]  # counted offline
    # a PURCHASE: the new item's category (4, from the items table) counts
    assert online(settings, [NEW_ITEM_USER])[NEW_ITEM_USER]["preferred_categories"] == [4]
    assert live_summary(settings.dataset_path).items == 1
