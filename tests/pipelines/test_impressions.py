"""Impressions: the wire format, attribution on the clickstream's wire, the offline table's writer
and its crash recovery, and the sink on a real Kafka (each message once in the table across a crash
between a write and its commit)."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.events import decode_batch, event_to_message, new_event
from pipelines.impression_sink import ImpressionSink
from pipelines.impressions import (
    decode_impression,
    impression_message,
    read_impressions,
    recover,
    write_batch,
    written_offsets,
)
from recsys.config import Settings
from tests.support.impressions import LATE_EVENING, produce_impressions, run_sink_once, sink_settings, table_root

ITEMS = [{"item_id": 7, "score": 0.9, "strategy": "als"}, {"item_id": 3, "score": 0.5, "strategy": "new_item"}]


def _row(request_id: str, served_at: float) -> dict:
    key, value = impression_message(request_id, 42, served_at, ITEMS, {"index": "item_index:a"}, False, True, False)
    return decode_impression(value)


def test_an_impression_round_trips_with_positions() -> None:
    key, value = impression_message("r1", 42, LATE_EVENING, ITEMS, {"index": "item_index:a"},
                                    cold_start=False, cached=True, degraded=False)
    assert key == b"42"
    row = decode_impression(value)
    assert row["item_ids"] == [7, 3] and row["positions"] == [1, 2]  # position p is items[p-1]
    assert row["scores"] == [0.9, 0.5] and row["strategies"] == ["als", "new_item"]
    assert row["served_at"] == datetime(2026, 1, 4, 23, 59, 59, tzinfo=timezone.utc)
    assert row["arm"] is None and row["cached"] is True and row["model_versions"] == [("index", "item_index:a")]


@pytest.mark.parametrize(("raw", "why"), [
    (b"{not json", "malformed impression JSON"),
    (b'{"schema_version": 99, "request_id": "x"}', "schema_version 1"),
    (b'{"schema_version": 1, "request_id": "x", "user_id": 1}', "lacks or mistypes a field"),
])
def test_a_bad_impression_names_what_is_wrong(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_impression(raw)


def test_attribution_rides_on_the_clickstream_and_old_messages_still_decode() -> None:
    ts = datetime(2026, 1, 4, 12, tzinfo=timezone.utc)
    _, plain = event_to_message(new_event(1, 2, "CLICK", ts=ts, event_id="e-old"))
    _, attributed = event_to_message(new_event(1, 2, "CLICK", ts=ts, event_id="e-new", request_id="r1", position=3))
    assert "request_id" not in json.loads(plain) and "position" not in json.loads(plain)  # as every older message
    body = json.loads(attributed)
    assert body["request_id"] == "r1" and body["position"] == 3
    decoded = decode_batch([plain, attributed])
    assert decoded.rejected == [] and decoded.event_id == ["e-old", "e-new"]


def test_a_batch_is_one_file_per_date_and_a_rewrite_replaces_it(tmp_path: Path) -> None:
    rows = [_row("a", LATE_EVENING), _row("b", LATE_EVENING + 2)]  # 23:59:59 and 00:00:01 the next day
    assert write_batch(tmp_path, "ab12", 0, 10, 11, rows) == 2
    assert sorted(p.parent.name for p in tmp_path.glob("date=*/part-*.parquet")) == \
        ["date=2026-01-04", "date=2026-01-05"]
    write_batch(tmp_path, "ab12", 0, 10, 11, rows)  # the same offsets again (a retry): replaced, not added
    table = read_impressions(tmp_path, dedupe=False)
    assert table["request_id"].to_pylist() == ["a", "b"] and table["date"].to_pylist() == ["2026-01-04", "2026-01-05"]
    assert written_offsets(tmp_path, "ab12") == {0: 11} and written_offsets(tmp_path, "cd34") == {}


def test_recovery_finishes_a_begun_batch_and_discards_an_unbegun_one(tmp_path: Path) -> None:
    rows = [_row("a", LATE_EVENING), _row("b", LATE_EVENING + 2)]
    write_batch(tmp_path, "ab12", 0, 0, 1, rows)
    # a crash after the first rename: the second date's file is still staged
    second = next(tmp_path.glob("date=2026-01-05/part-*.parquet"))
    os.replace(second, second.with_name(f".{second.name}.tmp"))
    # and a crash before any rename of another batch: staged only
    pq.write_table(pq.read_table(next(tmp_path.glob("date=2026-01-04/part-*.parquet"))),
                   tmp_path / "date=2026-01-04" / ".part-ab12-p0000-000000000000002-000000000000002.parquet.tmp")
    recover(tmp_path)
    assert sorted(read_impressions(tmp_path)["request_id"].to_pylist()) == ["a", "b"]
    assert not list(tmp_path.glob("date=*/.*.tmp")) and written_offsets(tmp_path, "ab12") == {0: 1}


class _CrashAfterWrite(ImpressionSink):
    """A sink that dies between writing a batch and committing it."""

    def _commit(self, offsets: dict[int, int]) -> None:
        raise RuntimeError("crash before the commit")


def test_the_sink_writes_each_message_once_across_a_crash(stack_settings: Settings, tmp_path: Path) -> None:
    settings = sink_settings(stack_settings, tmp_path)
    group = f"imp-{uuid.uuid4().hex[:6]}"
    produce_impressions(settings, [(f"r{n}", n, LATE_EVENING + n, [n, n + 100]) for n in range(3)])
    # r0, r1, r2 (offsets 0..2): written and committed
    assert run_sink_once(settings, group).rows == 3
    # offsets 3..5: written, then the sink dies before the commit; r1 sent again by a retrying producer
    produce_impressions(settings, [("r3", 3, LATE_EVENING + 3, [3]), ("r4", 4, LATE_EVENING + 4, [4]),
                                   ("r1", 1, LATE_EVENING + 1, [1, 101])])
    with pytest.raises(RuntimeError, match="crash before the commit"):
        run_sink_once(settings, group, _CrashAfterWrite)
    # the restart starts after the table's last offset (5), not the commit (3): nothing is written twice
    assert run_sink_once(settings, group).rows == 0
    raw = read_impressions(table_root(settings), dedupe=False)
    assert raw.num_rows == 6  # one row per message: 3 + 3
    table = read_impressions(table_root(settings))
    assert table["request_id"].to_pylist() == ["r0", "r1", "r2", "r3", "r4"]  # r1's second message dropped
    assert table["item_ids"].to_pylist()[1] == [1, 101] and table["positions"].to_pylist()[1] == [1, 2]
    # served 23:59:59 (r0), then 00:00:00.. (r1..r4) UTC
    assert table["date"].to_pylist() == ["2026-01-04"] + ["2026-01-05"] * 4
