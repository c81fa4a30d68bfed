"""Spark cleaning on a hand-made fixture: a known bot, a power user and an over-cap day are removed,
exactly them, and nothing else; weights and decay match hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cleaning import CleaningConfig, CleaningResult, clean_events
from recsys import schema as S
from recsys.config import Settings

REF = datetime(2026, 1, 10, tzinfo=timezone.utc)
DAY = timedelta(days=1)

NORMAL, BOT, POWER, CAPPED, INVALID_ONLY, RATER, NEAR_POWER = 1, 2, 3, 4, 9, 6, 8


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from recsys.spark import get_spark

    tmp = tmp_path_factory.mktemp("cleaning")
    yield get_spark(Settings(data_dir=Path(tmp) / "data", run_dir=Path(tmp) / "run"))


def _event(user: int, item: int, etype: str, ts: datetime, value: float | None = None) -> dict[str, object]:
    return {S.COL_USER: user, S.COL_ITEM: item, S.COL_EVENT_TYPE: etype, S.COL_VALUE: value, S.COL_TS: ts}


def fixture_events() -> pd.DataFrame:
    rows: list[dict[str, object]] = []
    # a normal user: VIEW + CLICK on item 10 one day ago, a 5-star rating on item 12 two days ago
    rows += [_event(NORMAL, 10, "VIEW", REF - DAY), _event(NORMAL, 10, "CLICK", REF - DAY),
             _event(NORMAL, 12, "RATING", REF - 2 * DAY, 5.0), _event(NORMAL, 13, "PURCHASE", REF - DAY, 1.0)]
    # invalid rows: rating out of range, an event after the reference time, an unknown type,
    # and user 9 whose only event has a negative value
    rows += [_event(NORMAL, 14, "RATING", REF - DAY, 7.0), _event(NORMAL, 15, "VIEW", REF + DAY),
             _event(NORMAL, 16, "LIKE", REF - DAY), _event(INVALID_ONLY, 10, "PURCHASE", REF - DAY, -1.0)]
    # the bot: 101 views within 50 seconds (over 100 in one minute)
    start = REF - 3 * DAY
    rows += [_event(BOT, 100 + i, "VIEW", start + timedelta(seconds=i * 0.5)) for i in range(101)]
    # a rater: 90 ratings and 30 views in the same minute; ratings are exempt, so not a bot
    rows += [_event(RATER, 200 + i, "RATING", start + timedelta(seconds=i * 0.5), 4.0) for i in range(90)]
    rows += [_event(RATER, 300 + i, "VIEW", start + timedelta(seconds=i)) for i in range(30)]
    # the power user: 10,001 views, one every 10 minutes (never a bot, removed before the cap)
    rows += [_event(POWER, 1 + i % 50, "VIEW", REF - 80 * DAY + timedelta(minutes=10 * i)) for i in range(10_001)]
    # exactly 10,000 ratings: not over the limit, and ratings are exempt from the daily cap
    rows += [_event(NEAR_POWER, 1 + i % 50, "RATING", REF - 5 * DAY + timedelta(seconds=i), 3.0)
             for i in range(10_000)]
    # the over-cap day: 3 purchases and 50 views in one day; the 3 earliest views go (lightest,
    # then oldest). Five ratings that day are exempt. Another day has exactly 50 views: kept.
    day = REF - 4 * DAY
    rows += [_event(CAPPED, 400 + i, "VIEW", day + timedelta(minutes=5 * i)) for i in range(50)]
    rows += [_event(CAPPED, 500 + i, "PURCHASE", day + timedelta(minutes=5 * i + 1), 1.0) for i in range(3)]
    rows += [_event(CAPPED, 600 + i, "RATING", day + timedelta(hours=10, minutes=i), 4.0) for i in range(5)]
    rows += [_event(CAPPED, 700 + i, "VIEW", day + DAY + timedelta(minutes=5 * i)) for i in range(50)]
    frame = pd.DataFrame(rows)
    frame[S.COL_EVENT_ID] = [f"e{i:06d}" for i in range(len(frame))]
    frame[S.COL_TS] = pd.to_datetime(frame[S.COL_TS], utc=True)
    return frame


def _spark_time(t: datetime) -> pd.Timestamp:
    """How toPandas returns a timestamp: naive, in the session time zone (UTC)."""
    return pd.Timestamp(t).tz_convert("UTC").tz_localize(None)


@pytest.fixture(scope="module")
def raw(spark: object) -> pd.DataFrame:
    return fixture_events()


@pytest.fixture(scope="module")
def result(spark: object, raw: pd.DataFrame) -> CleaningResult:
    frame = spark.createDataFrame(raw)  # type: ignore[attr-defined]
    return clean_events(frame, REF, CleaningConfig(decay_per_day=0.1))


def test_each_step_removes_exactly_its_rows_and_users(result: CleaningResult) -> None:
    # invalid: 4 rows (rating 7, future, LIKE, negative value); user 9 had nothing else
    assert (result.removed("invalid").rows_removed, result.removed("invalid").users_removed) == (4, 1)
    assert (result.removed("bots").rows_removed, result.removed("bots").users_removed) == (101, 1)
    assert (result.removed("power_users").rows_removed, result.removed("power_users").users_removed) == (10_001, 1)
    assert (result.removed("daily_cap").rows_removed, result.removed("daily_cap").users_removed) == (3, 0)
    assert [s.step for s in result.steps] == ["invalid", "bots", "power_users", "daily_cap"]


def test_removed_users_are_exactly_the_bot_power_user_and_invalid_one(result: CleaningResult) -> None:
    users = {r[S.COL_USER] for r in result.events.select(S.COL_USER).distinct().collect()}
    assert users == {NORMAL, CAPPED, RATER, NEAR_POWER}


def test_over_cap_day_keeps_the_heaviest_and_newest(result: CleaningResult, raw: pd.DataFrame) -> None:
    kept = result.events.filter(f"{S.COL_USER} = {CAPPED}").toPandas()
    capped_day = kept[kept[S.COL_TS].dt.floor("D") == _spark_time(REF - 4 * DAY)]
    clicks = capped_day[capped_day[S.COL_EVENT_TYPE] != "RATING"]
    assert len(clicks) == 50 and (capped_day[S.COL_EVENT_TYPE] == "RATING").sum() == 5
    assert (clicks[S.COL_EVENT_TYPE] == "PURCHASE").sum() == 3
    # the views dropped are the three earliest: items 400, 401, 402
    assert set(range(400, 450)) - set(clicks[S.COL_ITEM]) == {400, 401, 402}
    assert len(kept) == 50 + 5 + 50  # the other day, exactly at the cap, is untouched


def test_rater_is_not_a_bot_and_near_power_user_stays(result: CleaningResult) -> None:
    counts = result.events.groupBy(S.COL_USER).count().toPandas().set_index(S.COL_USER)["count"]
    assert counts[RATER] == 120  # 90 ratings + 30 views in one minute: only 30 clickstream events
    assert counts[NEAR_POWER] == 10_000


def test_weights_and_decay(result: CleaningResult) -> None:
    rows = result.interactions.filter(f"{S.COL_USER} = {NORMAL}").toPandas().set_index(S.COL_ITEM)
    # item 10: VIEW (1) + CLICK (3) one day ago, decay exp(-0.1 * 1)
    assert rows.loc[10, "weight"] == pytest.approx(4 * math.exp(-0.1))
    assert rows.loc[10, "n_events"] == 2
    # item 12: a 5-star rating two days ago weighs 5 - 2 = 3, decayed exp(-0.2)
    assert rows.loc[12, "weight"] == pytest.approx(3 * math.exp(-0.2))
    # item 13: a purchase one day ago weighs 10
    assert rows.loc[13, "weight"] == pytest.approx(10 * math.exp(-0.1))
    assert set(rows.index) == {10, 12, 13}
    assert rows.loc[10, S.COL_TS] == _spark_time(REF - DAY)


def test_rating_weight_is_value_minus_offset(spark: object) -> None:
    frame = spark.createDataFrame(pd.DataFrame([  # type: ignore[attr-defined]
        _event(1, item, "RATING", REF, value) for item, value in ((1, 1.0), (2, 2.0), (3, 3.5), (4, 5.0))
    ]).assign(**{S.COL_TS: lambda f: pd.to_datetime(f[S.COL_TS], utc=True)}))
    weights = clean_events(frame, REF).interactions.toPandas().set_index(S.COL_ITEM)["weight"]
    assert weights.to_dict() == {1: -1.0, 2: 0.0, 3: 1.5, 4: 3.0}


def test_bot_window_boundary(spark: object) -> None:
    """Over 3 events within 60 s: 4 events spanning 59.999999 s is a bot, spanning 60 s is not."""
    just_in = [REF - DAY + timedelta(seconds=s) for s in (0, 20, 40)] + [REF - DAY + timedelta(seconds=59.999999)]
    just_out = [REF - DAY + timedelta(seconds=s) for s in (0, 20, 40, 60)]
    rows = [_event(1, i, "VIEW", t) for i, t in enumerate(just_in)] + \
           [_event(2, i, "VIEW", t) for i, t in enumerate(just_out)]
    frame = spark.createDataFrame(pd.DataFrame(rows).assign(  # type: ignore[attr-defined]
        **{S.COL_TS: lambda f: pd.to_datetime(f[S.COL_TS], utc=True)}))
    cleaned = clean_events(frame, REF, CleaningConfig(bot_max_events=3))
    assert cleaned.removed("bots").users_removed == 1
    assert {r[S.COL_USER] for r in cleaned.events.select(S.COL_USER).distinct().collect()} == {2}


def test_catalogue_filter_and_bad_config(spark: object) -> None:
    rows = [_event(1, 1, "VIEW", REF - DAY), _event(1, 99, "VIEW", REF - DAY)]
    frame = spark.createDataFrame(pd.DataFrame(rows).assign(  # type: ignore[attr-defined]
        **{S.COL_TS: lambda f: pd.to_datetime(f[S.COL_TS], utc=True)}))
    items = spark.createDataFrame(pd.DataFrame({S.COL_ITEM: [1, 2]}))  # type: ignore[attr-defined]
    cleaned = clean_events(frame, REF, catalogue=items)
    assert cleaned.removed("invalid").rows_removed == 1
    with pytest.raises(ValueError, match="daily_cap=0 must be >= 1"):
        CleaningConfig(daily_cap=0)
    with pytest.raises(ValueError, match="naive"):
        clean_events(frame, REF.replace(tzinfo=None))
