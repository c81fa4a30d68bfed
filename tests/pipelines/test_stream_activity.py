"""The stream's activity set as pure logic (no services): events counted per event-time hour,
hours past the retention dropped, the hours a precompute window reads, and the option's bound."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pipelines.realtime_rules import to_us
from pipelines.stream import StreamOptions
from pipelines.stream.activity import ActivityCounts, count_event, drop_expired, hour_of, window_hours

H = 3_600_000_000  # microseconds per hour


def test_events_are_counted_per_user_and_hour() -> None:
    counts: ActivityCounts = {}
    # user 7: two events in hour 100, one in hour 101; user 8: one in hour 100
    for user, ts in [(7, 100 * H), (7, 100 * H + H - 1), (8, 100 * H + 5), (7, 101 * H)]:
        count_event(counts, user, ts)
    assert {h: dict(users) for h, users in counts.items()} == {100: {7: 2, 8: 1}, 101: {7: 1}}


def test_hours_past_the_retention_are_dropped() -> None:
    counts: ActivityCounts = {}
    for hour in (90, 97, 98, 100):
        count_event(counts, 1, hour * H)
    # newest event at 100:30, retention 2 h: the first hour kept is that of 98:30, so 98 and later
    assert sorted(drop_expired(counts, 100 * H + H // 2, 7_200)) == [98, 100]
    assert drop_expired(counts, None, 7_200) is counts  # nothing applied yet: nothing to compare with


def test_a_window_reads_the_hours_it_touches_its_first_whole() -> None:
    end = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)
    hours = window_hours(end, 24)
    # (11:30 the day before, 12:30]: 25 hours, from the hour of 11:00 the day before to that of 12:00
    assert len(hours) == 25 and hours.start == hour_of(to_us(end)) - 24 and hours[-1] == hour_of(to_us(end))
    on_the_hour = window_hours(datetime(2026, 3, 1, 12, tzinfo=timezone.utc), 1)
    assert len(on_the_hour) == 2  # 11:00-12:00 and the hour starting at 12:00 (an event at 12:00 sharp)


def test_a_retention_under_an_hour_is_refused() -> None:
    with pytest.raises(ValueError, match="activity_retention_s 60 must be at least 3600"):
        StreamOptions(activity_retention_s=60)
