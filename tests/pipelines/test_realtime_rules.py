"""The real-time rules on tiny hand-made event lists, each result worked out by hand in a comment."""

from __future__ import annotations

import random

import pytest

from pipelines.realtime_rules import DedupeWindow, Event, Outcome, UserState, from_us, to_us
from tests.support.stream import fold_events

S_ = 1_000_000  # microseconds per second
W = DedupeWindow(window_us=3600 * S_, max_ids=100)


def ev(eid: str, t: int, etype: str = "VIEW", item: int = 1, cat: int | None = 10, value: float | None = None,
       user: int = 1) -> Event:
    return Event(eid, user, item, etype, value, t * S_, cat)


def fold(*events: Event, window: DedupeWindow = W) -> UserState:
    return fold_events(events, window)[events[0].user_id]


def test_last_5_items_keeps_the_newest_five_and_moves_repeats_to_the_end() -> None:
    # views of 1..6 then 3 again: 1 falls out, 3 moves to the end -> [2, 4, 5, 6, 3]
    events = [ev(f"e{i}", i, item=i) for i in range(1, 7)] + [ev("e7", 7, item=3)]
    assert fold(*events).last_5_items == [2, 4, 5, 6, 3]


def test_which_events_feed_which_feature() -> None:
    state = fold(
        ev("a", 1, "VIEW", item=1, cat=10),  # last items
        ev("b", 2, "CLICK", item=2, cat=10),  # last items
        ev("c", 3, "ADD_TO_CART", item=3, cat=20),  # count only
        ev("d", 4, "PURCHASE", item=4, cat=20),  # purchases + category 20
        ev("e", 5, "RATING", item=5, cat=30, value=4.0),  # last items + category 30 (>= 4)
        ev("f", 6, "RATING", item=6, cat=40, value=3.5),  # count only (< 4)
    )
    assert state.last_5_items == [1, 2, 5]
    assert state.purchases == 1
    assert state.count == 6
    # categories 20 (count 1, t=4) and 30 (count 1, t=5): same count, so the more recent first
    assert state.preferred_categories == [30, 20]
    assert state.last_action == from_us(6 * S_)


def test_preferred_categories_rank_by_count_then_recency_at_most_five() -> None:
    buys = [(1, 1), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6), (8, 6)]  # (t, category)
    state = fold(*[ev(f"p{t}", t, "PURCHASE", item=t, cat=c) for t, c in buys])
    # counts: 1->2, 6->2 (latest t=8), 2..5 -> 1 each (latest 5 at t=6, 4 at 5, 3 at 4, 2 at 3)
    assert state.preferred_categories == [6, 1, 5, 4, 3]
    assert state.purchases == 8


def test_an_event_id_counts_once() -> None:
    state = fold(ev("a", 1), ev("a", 1), ev("b", 2, "PURCHASE", cat=7), ev("b", 2, "PURCHASE", cat=7))
    assert (state.count, state.purchases, state.preferred_categories) == (2, 1, [7])
    outcome = state.apply(ev("a", 1), W)
    assert outcome is Outcome.DUPLICATE and state.count == 2


def test_a_late_event_inside_the_window_lands_in_event_time_order() -> None:
    in_order = fold(ev("a", 10, item=1), ev("b", 20, item=2), ev("c", 30, item=3))
    state = UserState()
    for e in (ev("a", 10, item=1), ev("c", 30, item=3), ev("b", 20, item=2)):  # b arrives late
        assert state.apply(e, W) is Outcome.APPLIED
    assert state.last_5_items == in_order.last_5_items == [1, 2, 3]
    assert state.last_action == in_order.last_action == from_us(30 * S_)  # never moves back


def test_an_event_older_than_the_window_is_late_and_changes_nothing() -> None:
    state = fold(ev("a", 7200, item=1))  # last action at 2 h; the window reaches back to 1 h
    before = state.dumps()
    assert state.apply(ev("old", 3599, item=2), W) is Outcome.LATE
    assert state.dumps() == before
    assert state.apply(ev("ok", 3600, item=2), W) is Outcome.APPLIED  # exactly at the floor is inside


def test_the_dedupe_window_is_bounded_and_its_floor_rises() -> None:
    small = DedupeWindow(window_us=3600 * S_, max_ids=3)
    state = UserState()
    for i in range(1, 6):
        state.apply(ev(f"e{i}", i), small)
    state.trim(small)
    # 5 ids, 3 kept (e3, e4, e5); e1/e2 forgotten, so anything before t=2 s is late from now on
    assert sorted(state.seen) == ["e3", "e4", "e5"]
    assert state.apply(ev("e1", 1), small) is Outcome.LATE
    assert state.apply(ev("e3", 3), small) is Outcome.DUPLICATE


def test_the_fold_does_not_depend_on_arrival_order() -> None:
    rng = random.Random(7)
    types = ["VIEW", "CLICK", "ADD_TO_CART", "PURCHASE", "RATING"]
    events = [ev(f"e{i:03d}", 1000 + i, rng.choice(types), item=rng.randint(1, 9), cat=rng.randint(1, 4),
                 value=rng.choice([2.0, 4.0, 5.0])) for i in range(60)]
    expected = fold(*events)
    for seed in range(5):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        state = UserState()
        arrivals = shuffled + shuffled[:10]  # and ten replays
        for start in range(0, len(arrivals), 7):  # in arbitrary batches
            for e in arrivals[start:start + 7]:
                state.apply(e, W)
            state.trim(W)
        assert state.features() == expected.features()
        assert (state.cats, state.items, state.seen) == (expected.cats, expected.items, expected.seen)


def test_state_round_trips_through_its_serialized_form() -> None:
    state = fold(ev("a", 1, "PURCHASE", cat=3), ev("b", 2, "VIEW", item=9))
    assert UserState.loads(state.dumps()) == state
    assert UserState.loads(None) == UserState()


def test_time_conversion_is_exact() -> None:
    t = from_us(1_761_955_200_123_457)
    assert to_us(t) == 1_761_955_200_123_457 and t.microsecond == 123_457


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must both be positive"):
        DedupeWindow(window_us=0)
