"""Pure logic of the serving engine's latency techniques: the ranker's budget, its bounded
executor, and single flight (no services: threads and events only)."""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from bentos.config import ServingConfig
from bentos.ranker_call import RankerBusy, RankerExecutor, choose_budget, measure_scoring
from bentos.scoring import fallback_kind
from bentos.single_flight import SingleFlight
from tests.support.serving import wait_until


def test_budget_is_the_measured_p99_times_headroom() -> None:
    # timings 1..100 ms: numpy's linear p99 = 1 + 0.99 * 99 = 99.01; x3 headroom = 297.03 > floor 25
    budget = choose_budget(ServingConfig(), [float(t) for t in range(1, 101)])
    assert budget.source == "measured"
    assert budget.p99_ms == pytest.approx(99.01)
    assert budget.ms == pytest.approx(297.03)
    assert budget.seconds == pytest.approx(0.29703)


def test_budget_floor_configured_and_unmeasured() -> None:
    # [1, 2, 3]: p99 = 1 + 0.99 * 2 = 2.98; x3 = 8.94 < floor 25 -> 25
    low = choose_budget(ServingConfig(), [1.0, 2.0, 3.0])
    assert (low.ms, low.source) == (25.0, "measured") and low.p99_ms == pytest.approx(2.98)
    # a configured value wins over any measurement, which is kept for the log line
    fixed = choose_budget(ServingConfig(ranker_timeout_ms=80.0), [1.0, 2.0, 3.0])
    assert (fixed.ms, fixed.source) == (80.0, "configured") and fixed.p99_ms == pytest.approx(2.98)
    # nothing measured (no ranker at start-up, or its warm-up failed): the floor
    assert choose_budget(ServingConfig(ranker_timeout_floor_ms=40.0), []).ms == 40.0
    assert choose_budget(ServingConfig(), None).source == "floor"
    assert "configured" in fixed.describe() and "p99 2.98 ms" in fixed.describe()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ranker_timeout_headroom", 0.5, "ranker_timeout_headroom=0.5 must be >= 1"),
    ("ranker_timeout_ms", 0.0, "ranker_timeout_ms=0.0 must be > 0"),
    ("ranker_timeout_floor_ms", -1.0, "ranker_timeout_floor_ms=-1.0 must be > 0"),
    ("ranker_workers", 0, "ranker_workers=0 must be >= 1"),
    ("ranker_queue", -1, "ranker_queue=-1 must be >= 0"),
    ("ranker_warmup_timeout_s", 0.0, "ranker_warmup_timeout_s=0.0 must be > 0"),
])
def test_serving_config_rejects_bad_ranker_settings(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ServingConfig(**{field: value})  # type: ignore[arg-type]


def test_ranker_executor_is_bounded_and_cancels_abandoned_calls() -> None:
    gate = threading.Event()
    ran: list[str] = []

    def blocked(name: str) -> str:
        ran.append(name)
        gate.wait(30)
        return name

    executor = RankerExecutor(workers=1, queue=1)  # capacity 2: one running, one waiting
    try:
        running = executor.submit(blocked, "a")
        wait_until(lambda: ran == ["a"], what="the first call to start")
        # the second call waits for the only thread; its caller gives up after 10 ms and the
        # call is cancelled, so it never runs and its slot is free again
        with pytest.raises(FutureTimeout):
            executor.call(blocked, "b", timeout_s=0.01)
        assert executor.in_flight == 1
        queued = executor.submit(blocked, "c")
        with pytest.raises(RankerBusy, match="all 2 ranker slots are taken"):
            executor.submit(blocked, "d")
        assert executor.in_flight == 2
        gate.set()
        assert (running.result(30), queued.result(30)) == ("a", "c")
        assert ran == ["a", "c"]  # "b" was cancelled before it ran, "d" was never queued
        wait_until(lambda: executor.in_flight == 0, what="the slots to be released")
    finally:
        gate.set()
        executor.shutdown()


def test_warm_up_runs_once_on_every_ranker_thread() -> None:
    """Per-thread state (a TFLite interpreter) must exist on each thread before the first request:
    3 workers -> 3 calls on 3 distinct threads, all named by the executor's prefix."""
    executor = RankerExecutor(workers=3, queue=0)
    threads: list[str] = []
    lock = threading.Lock()

    def record() -> None:
        with lock:
            threads.append(threading.current_thread().name)

    try:
        executor.warm_up(record)
        assert len(threads) == 3 and len(set(threads)) == 3
        assert all(name.startswith("ranker") for name in threads)
        assert executor.in_flight == 0
    finally:
        executor.shutdown()


def test_warm_up_raises_what_the_scorer_raised() -> None:
    executor = RankerExecutor(workers=2, queue=0)

    def broken() -> None:
        raise ValueError("signature mismatch")

    try:
        with pytest.raises(ValueError, match="signature mismatch"):
            executor.warm_up(broken)
    finally:
        executor.shutdown()


def test_a_warm_up_that_hangs_ends_at_its_timeout_with_nothing_measured() -> None:
    # a model whose first call never returns must not keep the service from starting: the
    # measurement gives up after its timeout (nothing timed: the budget falls to the floor)
    executor = RankerExecutor(workers=2, queue=0)
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError):
            executor.warm_up(lambda: release.wait(60), timeout_s=0.2)
        # both threads are still held by the hung calls: the measurement gets RankerBusy at once
        assert measure_scoring(executor, lambda: release.wait(60), calls=5, timeout_s=0.2) == []
    finally:
        release.set()
        executor.shutdown()
    fresh, release = RankerExecutor(workers=2, queue=0), threading.Event()
    try:
        assert measure_scoring(fresh, lambda: release.wait(60), calls=5, timeout_s=0.2) == []
    finally:
        release.set()
        fresh.shutdown()


def test_ranker_executor_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="workers >= 1 and queue >= 0, got 0 and 1"):
        RankerExecutor(workers=0, queue=1)


def test_fallback_kinds() -> None:
    assert fallback_kind(RankerBusy("full")) == "ranker_busy"
    assert fallback_kind(FutureTimeout()) == "ranker_timeout"
    assert fallback_kind(RuntimeError("model exploded")) == "ranker_error"


def test_single_flight_runs_once_for_concurrent_callers() -> None:
    flights: SingleFlight[dict[str, int]] = SingleFlight()
    gate = threading.Event()
    computed: list[int] = []
    results: list[tuple[dict[str, int], bool]] = []

    def compute() -> dict[str, int]:
        computed.append(1)
        gate.wait(30)
        return {"answer": 42}

    threads = [threading.Thread(target=lambda: results.append(flights.run("u1", compute))) for _ in range(10)]
    for t in threads:
        t.start()
    wait_until(lambda: flights.waiting("u1") == 9, what="9 followers to join the flight")
    assert flights.waiting() == 9 and flights.waiting("u2") == 0
    # another key is its own flight, computed at once
    assert flights.run("u2", lambda: {"answer": 7}) == ({"answer": 7}, False)
    gate.set()
    for t in threads:
        t.join(30)
    assert len(computed) == 1 and len(results) == 10
    assert sorted(shared for _, shared in results) == [False] + [True] * 9
    assert len({id(result) for result, _ in results}) == 1  # every caller got the leader's object
    assert flights.waiting() == 0
    # the flight has landed: a later call computes again
    assert flights.run("u1", lambda: {"answer": 43}) == ({"answer": 43}, False)


def test_single_flight_shares_the_leaders_exception() -> None:
    flights: SingleFlight[int] = SingleFlight()
    gate = threading.Event()
    errors: list[BaseException] = []

    def fail() -> int:
        gate.wait(30)
        raise KeyError("no such user")

    def call() -> None:
        try:
            flights.run("k", fail)
        except KeyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: flights.waiting("k") == 2, what="2 followers to join the flight")
    gate.set()
    for t in threads:
        t.join(30)
    assert len(errors) == 3 and len({id(e) for e in errors}) == 1
