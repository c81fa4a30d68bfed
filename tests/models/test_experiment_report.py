"""`recsys report experiment` on tables written by the real writers, with Spark: hand-computed
counts and CTRs through the CLI, its table, JSON and plot (attribution by user, item and window:
duplicates, other experiments, late, early and unshown clicks left out), attribution by
request_id where the events carry one (logged by the stream's live log; parts written before the
column existed read as null), and an arm built to be better shown better with an interval
of the difference that excludes zero."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.experiment_report import ReportError, attribution_rule, build_report, experiment_report
from pipelines.canonical import read_table
from pipelines.events import event_to_message, select_events
from pipelines.live_log import append_live_events
from recsys import schema as S
from recsys.cli.main import app
from recsys.config import Settings
from tests.support.experiments import T0, answer, event, write_dataset


def _settings(tmp: Path, dataset: str) -> Settings:
    return Settings(data_dir=tmp / "data", run_dir=tmp / "run", dataset=dataset)


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Experiment ``exp-a``: ranker answers r1 (user 1: items 10, 11, 12) and r2 (user 2: 10, 13);
    blend answers r3 (user 3: 20, 21) and, 10 minutes later, r4 (user 3: 22, 20); r5 (user 4: 10)
    belongs to experiment ``other``; r1 is written twice (a producer's retry)."""
    settings = _settings(tmp_path_factory.mktemp("report"), "hand")
    r1 = answer("r1", 1, T0, [10, 11, 12], "ranker", "exp-a")
    batches = [[r1, answer("r2", 2, T0, [10, 13], "ranker", "exp-a"), answer("r3", 3, T0, [20, 21], "blend", "exp-a")],
               [answer("r4", 3, T0 + 600, [22, 20], "blend", "exp-a"), answer("r5", 4, T0, [10], "ranker", "other"),
                r1]]
    events = [
        event(1, 11, "CLICK", T0 + 60),       # r1, slot 2
        event(1, 11, "CLICK", T0 + 90),       # r1, slot 2 again: a click event, not another clicked slot
        event(1, 11, "PURCHASE", T0 + 900),   # a ranker purchase by user 1, at the 900 s window's very end
        event(1, 10, "VIEW", T0 + 5),         # not a click or purchase
        event(2, 99, "CLICK", T0 + 60),       # item 99 was never shown to user 2
        event(2, 13, "CLICK", T0 + 901),      # a second past the 900 s window (the default 1,800 s would take it)
        event(3, 20, "CLICK", T0 + 30),       # r3, slot 1
        event(3, 21, "CLICK", T0 - 60),       # before r3 was served
        event(3, 22, "CLICK", T0 + 660),      # r4, slot 1
        event(3, 20, "CLICK", T0 + 650),      # item 20 is in r3 and r4: the latest, r4 (slot 2)
        event(4, 10, "CLICK", T0 + 10),       # user 4's answer is experiment "other"
    ]
    write_dataset(settings.dataset_path, events, batches)
    return settings


def test_the_command_reports_the_hand_counts(hand_built: Settings, spark: object, tmp_path: Path) -> None:
    """Through `recsys report experiment` (Spark), the table, the JSON and the plot."""
    env = {"RECSYS_DATA_DIR": str(hand_built.data_path), "RECSYS_DATASET": hand_built.dataset}
    result = CliRunner().invoke(app, ["report", "experiment", "exp-a", "--window-s", "900", "--out", str(tmp_path)],
                                env=env)
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "experiment-exp-a.json").read_text())
    assert (body["attribution"], body["baseline"]) == ("window", "blend")  # the first arm by name
    arms = {a["arm"]: a for a in body["arms"]}
    counts = ("impressions", "users", "items_shown", "clicks", "click_events", "purchases")
    # ranker: r1 and r2 (r1 once), 2 users, 3 + 2 = 5 items shown, 1 clicked slot (r1's item 11) from
    # 2 click events: CTR 1/5 = 0.2; 1 purchase over 2 users: 0.5 per user
    assert [arms["ranker"][c] for c in counts] == [2, 2, 5, 1, 2, 1]
    assert arms["ranker"]["ctr"]["value"] == pytest.approx(0.2)
    assert arms["ranker"]["purchases_per_user"]["value"] == 0.5
    # Wilson of 1/5 (tests/models/test_experiment_stats.py works it out): [0.0362, 0.6245]
    assert "0.2000 [0.0362, 0.6245]" in result.output  # the table's CTR [95% CI]
    # blend: r3 and r4, 1 user, 4 items shown, 3 clicked slots (r3's 20, r4's 22 and 20): CTR 3/4; no purchase
    assert [arms["blend"][c] for c in counts] == [2, 1, 4, 3, 3, 0]
    assert arms["blend"]["ctr"]["value"] == pytest.approx(0.75)
    # ranker - blend CTR = 0.2 - 0.75 = -0.55; blend has one user: no comparison of purchases per user
    assert [(c["metric"], c["arm"]) for c in body["comparisons"]] == [("ctr", "ranker")]
    assert body["comparisons"][0]["difference"]["value"] == pytest.approx(-0.55)
    assert (tmp_path / "experiment-exp-a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = CliRunner().invoke(app, ["report", "experiment", "nope"], env=env)
    assert failed.exit_code == 2 and "no impressions of experiment 'nope'" in failed.output
    assert "['exp-a', 'other']" in failed.output  # the experiments the table holds


def _row(arm: str, impressions: int, users: int, shown: int, clicks: int, purchases: int, squares: int) -> dict:
    return {"arm": arm, "impressions": impressions, "users": users, "items_shown": shown, "clicks": clicks,
            "click_events": clicks, "purchases": purchases, "purchases_sq": squares}


def test_the_baseline_and_the_comparisons_from_the_counts() -> None:
    """No Spark: the report from counts per arm (what the Spark step returns)."""
    rows = [_row("blend", 2, 1, 4, 3, 0, 0), _row("ranker", 2, 2, 5, 1, 1, 1)]
    first = build_report("exp-a", rows, "window", 1_800.0)
    assert first.baseline == "blend" and [(c.metric, c.arm) for c in first.comparisons] == [("ctr", "ranker")]
    chosen = build_report("exp-a", rows, "window", 1_800.0, baseline="ranker")
    assert chosen.comparison("ctr", "blend").difference.value == pytest.approx(0.55)  # 0.75 - 0.2
    with pytest.raises(ReportError, match=re.escape("baseline arm 'control' is not in experiment 'exp-a' "
                                                    "(arms: ['blend', 'ranker'])")):
        build_report("exp-a", rows, "window", 1_800.0, baseline="control")
    # two users in each arm: purchases per user compared too, 1 purchase by 2 users (squares 1)
    # against none: difference 0.5
    both = build_report("exp-a", [_row("blend", 2, 2, 4, 3, 0, 0), _row("ranker", 2, 2, 5, 1, 1, 1)], "window", 1_800.0)
    assert both.comparison("purchases_per_user", "ranker").difference.value == 0.5
    # the attribution label: 2 click events + 1 purchase attributed, of them by their id none, 1, all 3
    labels = [attribution_rule([{**_row("x", 1, 1, 2, 2, 1, 1), "by_request_id": n}]) for n in (0, 1, 3)]
    assert labels == ["window", "request_id, else window", "request_id"]


def _live(dataset: Path, events: list[dict], key: str) -> None:
    """``events`` through the stream's live log (:func:`append_live_events`), as wire messages."""
    assert append_live_events(dataset, [event_to_message(e)[1] for e in events], key) == len(events)


def test_events_with_a_request_id_are_attributed_by_it(tmp_path: Path, spark: object) -> None:
    """Every click and purchase carries its answer's ``request_id`` (logged by the stream's live log
    as /events sends them): each counts in the answer it names, however late, and nowhere else."""
    settings = _settings(tmp_path, "ids")
    write_dataset(settings.dataset_path, [], [[answer("r1", 1, T0, [10, 11, 12], "a", "exp-c"),
                                               answer("r2", 2, T0, [10], "b", "exp-c"),
                                               answer("r3", 3, T0, [20, 21], "b", "exp-c")]])
    _live(settings.dataset_path, [
        event(1, 11, "CLICK", T0 + 7_200, request_id="r1", position=2),  # r1 slot 2, two hours on
        event(1, 12, "CLICK", T0 + 60, request_id="r1", position=3),     # r1 slot 3
        event(1, 10, "CLICK", T0 + 60, request_id="r9", position=1),     # an answer not in the table
        event(3, 10, "CLICK", T0 + 60, request_id="r3", position=1),     # item 10 is not in r3
        event(2, 10, "CLICK", T0 + 30, request_id="r2", position=1),     # r2 slot 1
        event(3, 21, "PURCHASE", T0 + 90, request_id="r3", position=2),  # r3 slot 2: a purchase, no click
    ], "ids")
    report = experiment_report(settings, "exp-c", window_s=1_800, spark=spark)
    assert report.attribution == "request_id"  # every attributed event by its id
    a, b = report.arm("a"), report.arm("b")
    # a: r1 shows 3 items, 2 clicked (11 and 12): CTR 2/3; both clicks by id
    assert (a.clicks, a.items_shown, a.by_request_id) == (2, 3, 2) and a.ctr.value == pytest.approx(2 / 3)
    # b: r2 (1 item) and r3 (2 items), 1 clicked (r2's 10): CTR 1/3; r3's purchase: 1 over 2 users
    assert (b.clicks, b.items_shown, b.purchases, b.by_request_id) == (1, 3, 1, 2)
    assert b.ctr.value == pytest.approx(1 / 3) and b.purchases_per_user.value == 0.5


def test_parts_written_before_the_attribution_columns_read_as_null(tmp_path: Path, spark: object) -> None:
    """A dataset of tables version 1 (its part has no ``request_id`` or ``position``) to which the
    stream appended a live event with one: every reader reads both parts, the old rows with nulls,
    and the report attributes the old event by the window, the new one by its id."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    settings = _settings(tmp_path, "v1")
    write_dataset(settings.dataset_path, [], [[answer("r1", 1, T0, [10, 11], "a", "exp-c"),
                                               answer("r2", 2, T0, [10], "b", "exp-c")]])
    v1 = pa.schema([f for f in S.EVENTS_SCHEMA if f.name not in S.ATTRIBUTION_COLUMNS])
    old = event(2, 10, "CLICK", T0 + 60, event_id="old")  # no id: by the window, r2
    part = settings.dataset_path / "events" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist([old], schema=v1), part, coerce_timestamps="us")
    _live(settings.dataset_path, [event(1, 11, "CLICK", T0 + 7_200, event_id="new", request_id="r1", position=2)],
          "v2")
    rows = read_table(settings.dataset_path, "events").set_index(S.COL_EVENT_ID)
    assert rows[S.COL_REQUEST_ID].to_dict() == {"old": None, "new": "r1"}
    assert rows[S.COL_POSITION].isna().to_dict() == {"old": True, "new": False}
    assert select_events(settings.dataset_path).column(S.COL_REQUEST_ID).to_pylist() == [None, "r1"]  # by time
    # Spark's own inference (what batch features, cleaning, backfill and retrain read) takes the
    # schema of one part: either way the canonical columns of both parts are there
    plain = spark.read.parquet(str(settings.dataset_path / "events"))
    assert plain.where(F.col(S.COL_EVENT_TYPE) == "CLICK").select(S.COL_EVENT_ID, S.COL_USER, S.COL_TS).count() == 2
    report = experiment_report(settings, "exp-c", window_s=1_800, spark=spark)
    assert report.attribution == "request_id, else window"
    assert (report.arm("a").clicks, report.arm("a").items_shown, report.arm("a").by_request_id) == (1, 2, 1)  # 1/2
    assert (report.arm("b").clicks, report.arm("b").items_shown, report.arm("b").by_request_id) == (1, 1, 0)  # 1/1


@pytest.fixture(scope="module")
def one_arm_better(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Experiment ``exp-b``: 200 users per arm, one answer of items 1..10 each; in ``better`` each
    user clicks items 1, 2 and 3 and every even user buys item 1; in ``worse`` each clicks item 1."""
    settings = _settings(tmp_path_factory.mktemp("report-b"), "better")
    answers, events = [], []
    for n in range(200):
        for arm, user, clicked in (("better", 1_000 + n, (1, 2, 3)), ("worse", 2_000 + n, (1,))):
            answers.append(answer(f"{arm}-{n}", user, T0 + n, list(range(1, 11)), arm, "exp-b"))
            events += [event(user, item, "CLICK", T0 + n + 30) for item in clicked]
            if arm == "better" and n % 2 == 0:
                events.append(event(user, 1, "PURCHASE", T0 + n + 60))
    write_dataset(settings.dataset_path, events, [answers])
    return settings


def test_an_arm_built_better_is_shown_better_with_an_interval_excluding_zero(one_arm_better: Settings,
                                                                             spark: object) -> None:
    report = experiment_report(one_arm_better, "exp-b", baseline="worse", spark=spark)
    better, worse = report.arm("better"), report.arm("worse")
    # CTR 600/2000 = 0.3 against 200/2000 = 0.1; purchases per user 100/200 = 0.5 against 0
    assert (better.clicks, better.items_shown, worse.clicks, worse.items_shown) == (600, 2_000, 200, 2_000)
    assert better.ctr.low > worse.ctr.high  # the Wilson intervals do not even overlap
    ctr = report.comparison("ctr", "better")
    # difference 0.2 -+ 1.96 * sqrt(0.3*0.7/2000 + 0.1*0.9/2000) = 0.2 -+ 0.0240: [0.176, 0.224]
    assert ctr.difference.value == pytest.approx(0.2)
    assert ctr.difference.low == pytest.approx(0.176, abs=1e-3) and ctr.difference.excludes_zero()
    assert ctr.significant and ctr.p_value < 1e-6
    per_user = report.comparison("purchases_per_user", "better")
    # 0.5 -+ 1.96 * sqrt((0.25 * 200/199) / 200) = 0.5 -+ 0.0695: [0.4305, 0.5695]
    assert per_user.difference.value == pytest.approx(0.5)
    assert per_user.difference.low == pytest.approx(0.4305, abs=1e-3) and per_user.difference.excludes_zero()
