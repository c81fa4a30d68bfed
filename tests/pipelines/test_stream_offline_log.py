"""The stream's offline event log: a flush that crashed after writing its files but before trimming
the outbox writes nothing twice (real Redis, real files; no Spark: the outboxes hold events only),
and the live appends to a dataset's tables (events by date, with their attribution; items by id)
and their count."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import redis

from pipelines.canonical import read_table
from pipelines.events import event_to_message
from pipelines.live_log import append_live_events, append_live_item, live_summary
from pipelines.stream.flush import append_outbox_events, flush_outboxes
from pipelines.stream.state import StateStore
from recsys import schema as S
from recsys.config import Settings
from tests.support.stream import END, clickstream, live_events, scoped, write_dataset


@pytest.fixture(scope="module")
def dataset(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A small dataset (items 1..12, users 1..2) on the session's Redis; no Feast workspace."""
    settings = stack_settings.with_overrides(data_dir=tmp_path_factory.mktemp("log") / "data", dataset="log",
                                             feast_project=f"l{uuid.uuid4().hex[:8]}")
    write_dataset(settings.dataset_path, clickstream((1, 2), 5, seed=4, prefix="base"))
    return settings


def wire(event: dict) -> str:
    return event_to_message(event)[1].decode()


def test_a_flush_cut_after_writing_writes_nothing_twice(dataset: Settings) -> None:
    settings = scoped(dataset, "flush")
    client = redis.Redis.from_url(settings.effective_redis_url)
    state = StateStore(client, settings.feast_project, settings.events_topic, "topic-1")
    # five events of user 7 on partition 0, either side of midnight: 23:58 .. 00:02
    midnight = datetime(2026, 3, 3, tzinfo=timezone.utc)
    events = [{S.COL_EVENT_ID: f"e{i}", S.COL_USER: 7, S.COL_ITEM: 1 + i, S.COL_EVENT_TYPE: "VIEW", S.COL_VALUE: None,
               S.COL_TS: midnight + timedelta(minutes=i - 2), S.COL_SESSION: "s", S.COL_CONTEXT: None}
              for i in range(5)]
    events[1].update({S.COL_REQUEST_ID: "r7", S.COL_POSITION: 2})  # sent with its answer's id (attribution)

    def entry(first: int, last: int) -> None:
        pipe = client.pipeline(transaction=True)
        state.queue_outbox(pipe, 0, last, [], first, [wire(e) for e in events[first:last + 1]])
        pipe.execute()

    entry(0, 2)  # offsets 0..2: e0, e1 (Mar 2), e2 (Mar 3)
    # a flush writes the files of the entries it read, then dies before the trim
    assert append_outbox_events(settings, settings.events_topic, "topic-1", {0: state.read_outbox(0)}) == 3
    entry(3, 4)  # meanwhile the consumer appended offsets 3..4: e3, e4 (Mar 3)
    done = flush_outboxes(settings, settings.events_topic, "topic-1", [0])  # the next flush
    assert (done.events, done.rows, done.offsets) == (5, 0, {0: 5})  # safe to commit up to offset 5
    logged = live_events(settings)
    assert sorted(logged[S.COL_EVENT_ID]) == ["e0", "e1", "e2", "e3", "e4"]  # each once
    attributed = logged.set_index(S.COL_EVENT_ID)
    assert attributed.loc["e1", S.COL_REQUEST_ID] == "r7" and attributed.loc["e1", S.COL_POSITION] == 2
    assert attributed.loc["e0", S.COL_REQUEST_ID] is None  # an event without: null
    # one file per date, named by the first offset: the retry rewrote the same two files
    files = (settings.dataset_path / "events").glob(f"live-*-{settings.events_topic}-*")
    names = sorted(p.name.split("-p0-")[0] for p in files)
    assert names == [f"live-2026-03-02-{settings.events_topic}", f"live-2026-03-03-{settings.events_topic}"]
    assert state.outbox_size([0]) == 0
    assert flush_outboxes(settings, settings.events_topic, "topic-1", [0]).events == 0


def test_live_events_are_canonical_and_every_reader_sees_them(dataset: Settings, tmp_path: Path) -> None:
    """Validated by the canonical rules, with the canonical schema: the wire's extra context keys
    dropped, a missing session as null; pyarrow, pandas and the table reader read base and live."""
    base = len(read_table(dataset.dataset_path, "events"))  # the writer's 10 and what other tests logged
    good = {S.COL_EVENT_ID: "w1", S.COL_USER: 3, S.COL_ITEM: 4, S.COL_EVENT_TYPE: "RATING", S.COL_VALUE: 4.5,
            S.COL_TS: END + timedelta(days=2), S.COL_SESSION: None, S.COL_CONTEXT: {"device": "ios"}}
    body = json.loads(wire(good))
    body[S.COL_CONTEXT]["unknown_key"] = 7
    bad = {**body, S.COL_EVENT_ID: "w2", S.COL_VALUE: 9.0}  # a rating outside 0.5..5 -> rejects
    assert append_live_events(dataset.dataset_path, [json.dumps(body), json.dumps(bad)], "unit") == 1
    assert append_live_events(dataset.dataset_path, [json.dumps(body), json.dumps(bad)], "unit") == 1  # same key
    table = pads.dataset(dataset.dataset_path / "events", format="parquet").to_table()
    assert table.schema.equals(S.EVENTS_SCHEMA) and table.num_rows == base + 1  # w1 once; w2 rejected
    row = read_table(dataset.dataset_path, "events").set_index(S.COL_EVENT_ID).loc["w1"]
    assert (row[S.COL_USER], row[S.COL_VALUE], row[S.COL_SESSION]) == (3, 4.5, None)
    assert row[S.COL_CONTEXT] == {"device": "ios", "location": None, "referrer": None}
    rejects = read_table(dataset.dataset_path, "rejects")
    assert rejects["reason"].tolist() == ["rating outside 0.5..5"]
    summary = live_summary(dataset.dataset_path)
    # the live rows are the table's rows but the writer's 10 (users 1 and 2, 5 events each)
    assert (summary.events, summary.max_event_ts) == (table.num_rows - 10, (END + timedelta(days=2)).isoformat())


def test_live_events_keep_their_attribution(dataset: Settings) -> None:
    """An event sent with its answer's ``request_id`` and ``position`` keeps both in the events table;
    bad attribution (a position alone, of the wrong type) is logged as null and the event is kept."""
    at = END + timedelta(days=1)
    shown = wire({**_event("a1", at), S.COL_REQUEST_ID: "r1", S.COL_POSITION: 2})
    bad = {**json.loads(wire(_event("a2", at))), S.COL_REQUEST_ID: 7, S.COL_POSITION: "x"}
    alone = {**json.loads(wire(_event("a3", at))), S.COL_POSITION: 1}  # POST /events refuses this one
    assert append_live_events(dataset.dataset_path, [shown, json.dumps(bad), json.dumps(alone)], "attr") == 3
    rows = read_table(dataset.dataset_path, "events").set_index(S.COL_EVENT_ID).loc[["a1", "a2", "a3"]]
    assert rows[S.COL_REQUEST_ID].tolist() == ["r1", None, None]
    assert rows[S.COL_POSITION].tolist()[0] == 2 and rows[S.COL_POSITION].iloc[1:].isna().all()
    # the writer's own rows (generated or loaded events) have no attribution
    base = read_table(dataset.dataset_path, "events").query("event_id.str.startswith('base')")
    assert len(base) == 10 and base[S.COL_REQUEST_ID].isna().all() and base[S.COL_POSITION].isna().all()


def _event(event_id: str, at: datetime) -> dict:
    return {S.COL_EVENT_ID: event_id, S.COL_USER: 3, S.COL_ITEM: 4, S.COL_EVENT_TYPE: "CLICK", S.COL_VALUE: None,
            S.COL_TS: at, S.COL_SESSION: None, S.COL_CONTEXT: None}


def test_an_added_item_is_one_row_however_often_it_is_written(dataset: Settings) -> None:
    item = {S.COL_ITEM: 40, "title": "Forty", S.COL_CATEGORY: 2, "tags": ["x"], "price": 2.0,
            S.COL_CREATED_AT: END.isoformat()}
    assert append_live_item(dataset.dataset_path, item) is not None
    assert append_live_item(dataset.dataset_path, {**item, "title": "Forty, again"}) is not None  # the latest wins
    assert append_live_item(dataset.dataset_path, {**item, S.COL_ITEM: 3}) is None  # the dataset's own item 3
    items = read_table(dataset.dataset_path, "items")
    assert len(items) == 13 and items[items[S.COL_ITEM] == 40]["title"].tolist() == ["Forty, again"]
    assert live_summary(dataset.dataset_path).items == 1
    with pytest.raises(FileNotFoundError, match="no items table at .*recsys data generate"):
        append_live_item(dataset.dataset_path / "missing", item)
