"""The purchased-items rule of the real-time fold (pure, no services): which events feed it, the
bound per user, order independence, duplicates, and the state's round trip through JSON."""

from __future__ import annotations

import random

import pytest

from pipelines.realtime_rules import DedupeWindow, Event, Outcome, UserState, fold_user
from pipelines.stream import StreamOptions

S_ = 1_000_000  # microseconds per second
W = DedupeWindow(window_us=3600 * S_, max_ids=100)


def ev(eid: str, t: int, etype: str, item: int, value: float | None = None) -> Event:
    return Event(eid, 1, item, etype, value, t * S_, 0)


def fold(events: list[Event], purchased_max: int = 100) -> UserState:
    state = UserState()
    for _ in fold_user(events, W, state, purchased_max):
        pass
    return state


def test_only_purchases_and_ratings_count_oldest_first() -> None:
    # PURCHASE 3 (t1), VIEW 5 (t2), ADD_TO_CART 6, RATING 8 = 5 (t4), PURCHASE 7 (t5), RATING 9 = 1
    # (t6: a low rating still means the film was watched) -> [3, 8, 7, 9]; one purchase counter per PURCHASE
    state = fold([ev("a", 1, "PURCHASE", 3), ev("b", 2, "VIEW", 5), ev("c", 3, "ADD_TO_CART", 6),
                  ev("d", 4, "RATING", 8, 5.0), ev("e", 5, "PURCHASE", 7), ev("f", 6, "RATING", 9, 1.0)])
    assert state.purchased_items == [3, 8, 7, 9]
    assert state.purchases == 2


def test_the_bound_drops_the_oldest_purchase() -> None:
    # purchases of 3 (t1), 7 (t2), 9 (t3), bound 2: 3 falls out -> [7, 9]
    state = fold([ev("a", 1, "PURCHASE", 3), ev("b", 2, "PURCHASE", 7), ev("c", 3, "PURCHASE", 9)], purchased_max=2)
    assert state.purchased_items == [7, 9]
    # buying 3 again (t4) brings it back as the newest; 7 falls out -> [9, 3]
    assert state.apply(ev("d", 4, "PURCHASE", 3), W, 2) is Outcome.APPLIED
    assert state.purchased_items == [9, 3]


def test_a_repeat_purchase_counts_once_at_its_latest_time() -> None:
    # 3 at t1 and t4, 7 at t2: 3's latest purchase is the newest -> [7, 3]; a late purchase of 7
    # at t0 (older than its t2) changes nothing
    state = fold([ev("a", 1, "PURCHASE", 3), ev("b", 2, "PURCHASE", 7), ev("c", 4, "PURCHASE", 3)])
    assert state.purchased_items == [7, 3]
    state.apply(ev("z", 0, "PURCHASE", 7), W)
    assert state.purchased_items == [7, 3] and state.purchases == 4


def test_a_redelivered_purchase_changes_nothing() -> None:
    # bound 2: 3 fell out; the same PURCHASE 3 event again is a duplicate and does not bring it back
    events = [ev("a", 1, "PURCHASE", 3), ev("b", 2, "PURCHASE", 7), ev("c", 3, "PURCHASE", 9)]
    state = fold(events, purchased_max=2)
    assert state.apply(events[0], W, 2) is Outcome.DUPLICATE
    assert state.purchased_items == [7, 9]


def test_any_arrival_order_gives_the_same_items() -> None:
    rng = random.Random(7)
    events = [ev(f"e{i}", rng.randint(1, 50), "PURCHASE", rng.randint(1, 12)) for i in range(40)]
    expected = fold(events, purchased_max=4).purchased_items  # fold_user sorts by event time
    for _ in range(20):
        shuffled = events[:]
        rng.shuffle(shuffled)
        state = UserState()
        for e in shuffled:  # the stream's order: as they arrive, bounded after every event
            state.apply(e, W, 4)
        assert state.purchased_items == expected


def test_the_items_survive_the_state_json_and_old_states_load() -> None:
    state = fold([ev("a", 1, "PURCHASE", 3), ev("b", 2, "PURCHASE", 7)])
    assert UserState.loads(state.dumps()).purchased_items == [3, 7]
    # a state written before purchases were kept (no "b" field) loads with none
    old = b'{"n":1,"p":1,"t":1000000,"f":-1,"i":[],"c":{},"s":{"a":1000000}}'
    assert UserState.loads(old).purchased_items == []


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="purchased_max 0 must be at least 1"):
        StreamOptions(purchased_max=0)
