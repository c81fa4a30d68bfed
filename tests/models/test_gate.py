"""The promotion gate: the decision on hand-computed numbers (and which rows decide), the user
sample, the evaluation window on hand-made events (Spark), and the gate on real ALS fits of sets
without a ranker: a challenger with more data passes it, one trained on a history whose items were
shuffled does not. The gate on sets with rankers: tests/models/test_retrain.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.als import ALSConfig
from models.gate import decide, decide_rows, metric_depth, served_row, window_eval_set
from models.gate_scoring import ScoredSet, gate, sample_users
from models.protocol import EvalSet
from pipelines.cleaning import CleaningConfig
from recsys import schema as S
from recsys.config import Settings
from tests.support.retrain import END, degraded_copy, small_dataset

# ---- the decision --------------------------------------------------------------------------------


def test_no_champion_promotes() -> None:
    decision = decide({"ndcg@10": 0.1}, None, "ndcg@10", 0.005)
    assert decision.promote and decision.champion is None and decision.reason == "promoted: no champion yet"


@pytest.mark.parametrize(("ours", "theirs", "promote"), [
    (0.200, 0.200, True),   # equal
    (0.196, 0.200, True),   # 0.004 below: within 0.005
    (0.195, 0.200, True),   # 0.005 below: at the tolerance (see the comment below)
    (0.194, 0.200, False),  # 0.006 below: more than 0.005
    (0.300, 0.200, True),   # better
])
def test_the_tolerance_bounds_how_much_worse_a_challenger_may_be(ours: float, theirs: float, promote: bool) -> None:
    # 0.200 - 0.195 = 0.0050000000000000044 in binary floats, just above 0.005: the boundary row
    # uses tolerance 0.0051 so the test states the rule (gap <= tolerance), not float noise
    tolerance = 0.0051 if ours == 0.195 else 0.005
    decision = decide({"ndcg@10": ours}, {"ndcg@10": theirs}, "ndcg@10", tolerance)
    assert decision.promote is promote, decision.reason
    assert (decision.challenger, decision.champion) == (ours, theirs)
    if not promote:
        assert decision.reason == ("kept the champion: challenger ndcg@10 0.1940 is 0.0060 below the champion's "
                                   "0.2000, more than the tolerance 0.005")


def test_the_gate_metric_is_configurable() -> None:
    # recall@20 decides, ndcg@10 is ignored: 0.50 vs 0.40 is better
    decision = decide({"ndcg@10": 0.1, "recall@20": 0.5}, {"ndcg@10": 0.9, "recall@20": 0.4}, "recall@20", 0.0)
    assert decision.promote and decision.metric == "recall@20"


def test_an_empty_window_keeps_the_champion() -> None:
    decision = decide({"ndcg@10": float("nan")}, {"ndcg@10": float("nan")}, "ndcg@10", 0.005)
    assert not decision.promote and "RECSYS_GATE_WINDOW_DAYS" in decision.reason


@pytest.mark.parametrize("metric", ["map@10", "ndcg", "ndcg@0", "ndcg@x"])
def test_a_bad_metric_name_is_refused_naming_it(metric: str) -> None:
    with pytest.raises(ValueError, match=f"gate metric '{metric}'.*RECSYS_GATE_METRIC"):
        metric_depth(metric)


def test_a_negative_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="tolerance -0.1 must be >= 0"):
        decide({"ndcg@10": 0.1}, {"ndcg@10": 0.1}, "ndcg@10", -0.1)


# ---- which rows decide ---------------------------------------------------------------------------


def test_what_a_set_serves_decides() -> None:
    """A set with a two-stage row is judged on it, one without on its ALS row."""
    ranked = {"als": {"ndcg@10": 0.30}, "two_stage": {"ndcg@10": 0.20}}
    alone = {"als": {"ndcg@10": 0.25}, "two_stage": None}
    assert (served_row(ranked), served_row(alone)) == ("two_stage", "als")
    # two-stage 0.20 against two-stage 0.30: 0.10 below, refused although its ALS (0.30) is level
    kept = decide_rows(ranked, {"als": {"ndcg@10": 0.30}, "two_stage": {"ndcg@10": 0.30}}, "ndcg@10", 0.005)
    assert not kept.promote and (kept.challenger_row, kept.champion_row) == ("two_stage", "two_stage")
    assert kept.reason == ("kept the champion: challenger ndcg@10 0.2000 is 0.1000 below the champion's 0.3000, "
                           "more than the tolerance 0.005 (two-stage lists)")
    # a challenger with a ranker against a champion without one: two-stage 0.20 vs ALS 0.25
    mixed = decide_rows(ranked, alone, "ndcg@10", 0.005)
    assert not mixed.promote and (mixed.challenger, mixed.champion) == (0.20, 0.25)
    assert mixed.reason.endswith("(challenger two-stage lists vs champion ALS lists)")
    first = decide_rows(ranked, None, "ndcg@10", 0.005)
    assert first.promote and (first.challenger, first.challenger_row, first.champion_row) == (0.20, "two_stage", None)


def _eval_set(n_users: int) -> EvalSet:
    """User u (10, 20, ...) has positive column u and saw column u + 1 (of n_users + 1 columns)."""
    return EvalSet(catalogue=np.arange(n_users + 1, dtype=np.int64),
                   users=np.arange(1, n_users + 1, dtype=np.int64) * 10,
                   positives=tuple(np.array([u]) for u in range(n_users)),
                   seen=tuple(np.array([u + 1]) for u in range(n_users)),
                   train_counts=np.arange(n_users, dtype=np.int64), popularity=np.ones(n_users + 1))


def test_the_sample_keeps_each_users_rows_together() -> None:
    full = _eval_set(6)
    assert sample_users(full, None) is full and sample_users(full, 6) is full  # no more users than the cap
    sample = sample_users(full, 3)
    assert len(sample.users) == 3 and list(sample.users) == sorted(sample.users)  # in the set's order
    rows = (sample.users // 10 - 1).tolist()  # user 10u sits in row u - 1 of the full set
    assert [p.tolist() for p in sample.positives] == [[r] for r in rows]
    assert [s.tolist() for s in sample.seen] == [[r + 1] for r in rows]
    assert sample.train_counts.tolist() == rows
    assert np.array_equal(sample_users(full, 3).users, sample.users)  # seeded: the same users again
    with pytest.raises(ValueError, match="gate_max_users"):
        Settings(gate_max_users=0)


# ---- the window ----------------------------------------------------------------------------------


def test_the_window_scores_only_users_active_in_it(spark: object) -> None:
    """User 1: five CLICKs on days 1-5; user 2: five CLICKs on days 1-3. Latest event: day 5;
    a 1.5-day window is (day 3.5, day 5]: only user 1 is active. Each user's last
    max(1, floor(0.2 * 5)) = 1 event is test, so user 1 is scored with one positive, item 15."""
    day = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [(1, 10 + d, d) for d in range(1, 6)] + [(2, 21 + n, 1 + n / 2) for n in range(5)]
    frame = pd.DataFrame({S.COL_USER: [r[0] for r in rows], S.COL_ITEM: [r[1] for r in rows],
                          S.COL_EVENT_TYPE: "CLICK", S.COL_VALUE: 1.0,
                          S.COL_TS: [day + timedelta(days=r[2]) for r in rows]})
    events = spark.createDataFrame(frame)  # type: ignore[attr-defined]
    catalogue = np.array(sorted(frame[S.COL_ITEM].unique()), dtype=np.int64)
    window = window_eval_set(events, catalogue, window_days=1.5)
    assert window.window_end == day + timedelta(days=5)
    assert window.window_start == day + timedelta(days=3.5)
    assert window.active_users == 1
    assert window.eval_set.users.tolist() == [1]
    assert catalogue[window.eval_set.positives[0]].tolist() == [15]
    assert len(window.train_rows) == 4 + 4  # both users' train rows stay: they are what is excluded
    window.train.unpersist()


def test_a_nonpositive_window_is_refused(spark: object) -> None:
    with pytest.raises(ValueError, match="gate window 0 days must be > 0"):
        window_eval_set(None, np.array([1]), window_days=0)  # type: ignore[arg-type]


# ---- the gate on real fits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("gate")
    settings = Settings(data_dir=tmp / "data", run_dir=tmp / "run", dataset="gate", gate_window_days=3,
                        spark_conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"})
    return small_dataset(settings)


ALS = ALSConfig(rank=8, max_iter=5, num_blocks=1)


def test_more_data_passes_and_a_shuffled_history_does_not(dataset: Settings, tmp_path: Path) -> None:
    """The champion: ALS on the first half (to day 5 of 10). The challenger on all ten days
    passes the gate; on a copy whose history before the 3-day window has its items shuffled, it
    fails."""
    from models.train import train_als

    champion = ScoredSet(train_als(dataset.with_overrides(as_of=END - timedelta(days=5)), ALS, export=False,
                                   progress=False).factors)
    more, _ = gate(dataset.with_overrides(as_of=END), ALS, CleaningConfig(), champion)
    assert more.promote and more.champion is not None, more.reason
    shuffled = degraded_copy(dataset, "shuffled", before=END - timedelta(days=3))
    worse, comparison = gate(shuffled.with_overrides(as_of=END), ALS, CleaningConfig(), champion)
    assert not worse.promote and worse.reason.startswith("kept the champion: challenger ndcg@10"), worse.reason
    assert worse.reason.endswith("(ALS lists)")
    assert comparison["window"]["scored_users"] > 0 and comparison["metric"] == "ndcg@10"
    # neither set has a ranker: the ALS rows decide, the two-stage rows are absent and say why
    assert comparison["decided_by"] == {"challenger": "als", "champion": "als"}
    assert comparison["rows"]["two_stage"] == {"challenger": None, "champion": None}
    assert comparison["rows"]["als"]["challenger"] == comparison["challenger"]
    assert comparison["rankers"] == {"challenger": "no ranker: ALS alone", "champion": "no ranker: ALS alone"}
