"""The stream consumer as a managed service of the stack, with real processes: `stack up` starts two
`recsys stream run` workers in one group on the feature workspace, an event sent with the
producer changes the user's real-time features in Redis, `stack status` shows the workers healthy
with the group's lag, `stack up --workers 1` stops the second one (SIGTERM: a clean exit) and
`status` then lists one, and `stack down` (SIGTERM) leaves every offset committed.

One start for the module: the workers run on ``feature_ws`` (dataset, Feast applied) with their
own Redis database, topics and consumer group (:func:`tests.support.stream.scoped`).
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.events import EventProducer
from pipelines.online_features import OnlineFeatureReader
from pipelines.realtime_rules import FEATURES
from pipelines.stack import STREAM, LocalStack, StackError, settings_env, worker_name
from pipelines.stack.settings_env import child_environment
from recsys import feature_tables as T
from recsys import schema as S
from recsys.cli.stack import stream_missing
from recsys.config import Settings
from tests.support.settings import isolated_settings
from tests.support.stack import free_port_run, poll, recsys_cli
from tests.support.stream import committed_total, offline_rows, scoped

USER = 4242  # not in the feature workspace's dataset: its features are this test's alone


def platform(settings: Settings) -> LocalStack:
    return LocalStack(settings, requires={STREAM: stream_missing})


@pytest.fixture(scope="module")
def managed(feature_ws: Settings) -> Iterator[tuple[Settings, LocalStack]]:
    """Two stream workers started by the stack; stopped at the end whatever happens."""
    settings = scoped(feature_ws, "managed").with_overrides(
        stream_workers=2, stream_port=free_port_run(2),
        stream_offline_flush_s=600.0)  # no periodic append: offsets stay uncommitted until `down`
    stack = platform(settings)
    try:
        yield settings, stack
    finally:
        stack.down([STREAM])


@pytest.fixture(scope="module")
def started(managed: tuple[Settings, LocalStack]) -> tuple[Settings, LocalStack, list]:
    settings, stack = managed
    return settings, stack, stack.up([STREAM])


def test_settings_reach_a_child_process_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = isolated_settings(tmp_path, dataset="other", redis_url="redis://127.0.0.1:1/4",
                                 spark_conf={"spark.driver.memory": "1g"}, stream_workers=3)
    inherited = {**os.environ, "RECSYS_CONFIG": str(tmp_path / "missing.yaml"),  # a YAML file would add to it
                 "RECSYS_REDIS_URL": "redis://elsewhere:6379/0"}  # REDIS_URL is read first: this one must go
    env = child_environment(inherited, settings_env(settings))
    assert "RECSYS_CONFIG" not in env and "RECSYS_REDIS_URL" not in env
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings().model_dump() == settings.model_dump()


def test_stream_is_not_started_without_its_dataset(stack_settings: Settings) -> None:
    settings = stack_settings.with_overrides(dataset="absent")
    stack = platform(settings)
    missing = settings.dataset_path
    with pytest.raises(StackError, match=rf"stream not started: needs the dataset at {re.escape(str(missing))} "):
        stack.up([STREAM])
    rows = {r.name: r for r in stack.up()}  # a plain `up`: the brokers run, the stream says why not
    assert rows["redis"].state == rows["kafka"].state == "running"
    assert rows[worker_name(0)].state == "stopped"
    assert f"needs the dataset at {missing}" in rows[worker_name(0)].detail
    assert "the Feast registry at" in rows[worker_name(0)].detail
    assert not stack.pid_file(worker_name(0)).exists()


def test_up_starts_each_worker_with_pid_file_log_and_metrics(started: tuple[Settings, LocalStack, list]) -> None:
    settings, stack, rows = started
    assert [r.name for r in rows] == ["stream-0", "stream-1"]
    assert all(r.state == "running" and r.healthy for r in rows), rows
    assert rows[0].detail.startswith("group lag ")
    for i, row in enumerate(rows):
        assert stack.pid_file(row.name).read_text().strip() == str(row.pid)
        assert stack.log_file(row.name).is_file()
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.stream_port + i}/metrics", timeout=5) as resp:
            assert b"recsys_stream_events_total" in resp.read()
    assert [r.pid for r in stack.up([STREAM])] == [r.pid for r in rows]  # idempotent: nothing restarted


def test_an_event_changes_the_users_realtime_features(started: tuple[Settings, LocalStack, list]) -> None:
    settings, _, _ = started
    reader = OnlineFeatureReader(settings, [f"{T.USER_REALTIME}:{f}" for f in FEATURES], [])
    assert reader.read(USER, []).user["interaction_count"] is None  # nothing online for the user yet
    items = pq.read_table(settings.dataset_path / "items", columns=[S.COL_ITEM, S.COL_CATEGORY]).to_pylist()
    (a, _), (b, _), (c, category_c) = [(r[S.COL_ITEM], r[S.COL_CATEGORY]) for r in items[:3]]
    now = datetime.now(timezone.utc)
    events = [{S.COL_EVENT_ID: f"managed-{n}", S.COL_USER: USER, S.COL_ITEM: item, S.COL_EVENT_TYPE: etype,
               S.COL_VALUE: None, S.COL_TS: now, S.COL_SESSION: None, S.COL_CONTEXT: None}
              for n, (etype, item) in enumerate([("VIEW", a), ("CLICK", b), ("PURCHASE", c)])]
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic) as producer:
        producer.send_many(events)

    def applied() -> dict | None:
        user = reader.read(USER, []).user
        return user if user["interaction_count"] == 3 else None

    # generous: the two workers may still be joining their group when the events arrive
    features = poll(applied, 120, "the three events in the user's online features")
    # VIEW a, CLICK b: the last items in order; PURCHASE c: one purchase, c's category preferred
    assert features["last_5_items"] == [a, b]
    assert features["total_purchases"] == 1
    assert features["preferred_categories"] == [category_c]


def test_status_shows_the_workers_healthy_with_the_group_lag(started: tuple[Settings, LocalStack, list]) -> None:
    settings, stack, _ = started

    def consistent() -> tuple[dict, int] | None:
        # the lag is the 3 events sent minus what the group committed; the periodic append is off,
        # but a rebalance while the workers joined may have appended and committed some: read the
        # committed offsets on both sides of `status` and keep a reading where they agree
        before = committed_total(settings)
        rows = {r.name: r for r in stack.status()}
        return (rows, 3 - before) if committed_total(settings) == before else None

    rows, lag = poll(consistent, 30, "a status between two commits")
    assert {"redis", "kafka", "mlflow", "stream-0", "stream-1"} <= set(rows)
    assert all(rows[w].state == "running" and rows[w].healthy for w in ("stream-0", "stream-1"))
    assert rows["stream-0"].detail == rows["stream-1"].detail == f"group lag {lag}"
    result = recsys_cli(settings, "stack", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "running" in lines["stream-1"] and "healthy" in lines["stream-1"]
    assert lines["stream-1"].endswith(f"group lag {3 - committed_total(settings)}")


def test_up_with_fewer_workers_stops_the_extra_ones_with_sigterm(started: tuple[Settings, LocalStack, list]) -> None:
    """`stack up --workers 1` after two: stream-1 gets SIGTERM, flushes, commits and exits 0;
    stream-0 takes over its partitions and runs on; `status` lists the one worker that runs, though
    the module's settings still say two, and every event ends committed."""
    settings, stack, rows = started
    # one event in each of the 4 partitions (kafka-python's partitioner, murmur2 of the key, puts
    # users 5001, 5000, 5002, 5003 in partitions 0..3): both workers hold events not yet committed
    users = (5001, 5000, 5002, 5003)
    item = int(pq.read_table(settings.dataset_path / "items", columns=[S.COL_ITEM]).column(0)[0].as_py())
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic) as producer:
        producer.send_many([{S.COL_EVENT_ID: f"scale-{u}", S.COL_USER: u, S.COL_ITEM: item, S.COL_EVENT_TYPE: "VIEW",
                             S.COL_VALUE: None, S.COL_TS: datetime.now(timezone.utc), S.COL_SESSION: None,
                             S.COL_CONTEXT: None} for u in users])
    reader = OnlineFeatureReader(settings, [f"{T.USER_REALTIME}:interaction_count"], [])
    poll(lambda: all(reader.read(u, []).user["interaction_count"] == 1 for u in users) or None, 60,
         "the four events applied online")
    extra = rows[1].pid
    result = recsys_cli(settings, "stack", "up", "--only", "stream", "--workers", "1", timeout_s=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["stream-0"]
    assert "SIGKILL" not in result.stderr and not stack.pid_file(worker_name(1)).exists()
    # the fixture's process started the worker: its exit status is ours to collect. 0 is a normal
    # return from the consumer's run(), after the last offline append and commit (SIGKILL: -9)
    _, status = os.waitpid(extra, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "stream stopped events=" in stack.log_file(worker_name(1)).read_text()
    listed = [r for r in stack.status() if r.name.startswith(STREAM)]
    assert [(r.name, r.state, r.pid) for r in listed] == [("stream-0", "running", rows[0].pid)]
    assert [r.name for r in stack.status([STREAM])] == ["stream-0"]
    # stream-0 lived through the rebalance: it appended the partitions it gave up and committed
    # them (its rebalance listener runs on Kafka's IO thread: the commit is queued there), took
    # all four, and runs on. Generous: its flush process may start Spark for the append.
    lag = poll(lambda: (g := stack.group_lag()) is not None and g.total == 0 or None, 120, "the group's lag at 0")
    assert lag and stack.status([STREAM])[0].pid == rows[0].pid and stack.status([STREAM])[0].healthy


def test_down_stops_the_workers_with_their_offsets_committed(started: tuple[Settings, LocalStack, list]) -> None:
    settings, stack, rows = started
    assert stack.down([STREAM]) == ["stream-0"]  # stream-1 was stopped by the smaller `up`
    assert not any(stack.pid_file(r.name).exists() for r in rows)
    lag = stack.group_lag()
    assert lag is not None and lag.total == 0, lag  # SIGTERM: appended offline, then committed
    assert len(offline_rows(settings, [USER])) >= 1  # the user's row reached the offline store
    assert [r.state for r in stack.status([STREAM])] == ["stopped", "stopped"]
