"""The promotion gate of ``recsys retrain``: the evaluation window (:func:`window_eval_set`) and
the decision (:func:`decide`).

**The window.** The protocol's per-user temporal split (:func:`models.protocol.temporal_split`)
of every event up to the reference time, with its positives (:func:`models.protocol.positives_of`),
scored only for users with at least one event in the window: the ``window_days`` before the
latest event at or before the reference time (``(latest - window_days, latest]``). Challenger and
champion are ranked for exactly these users, over the same catalogue, with the same items
excluded (each user's train items), and scored by the same metric.

**The rows.** Each model set is scored twice on the same users (:mod:`models.gate_scoring`):
the ``als`` row (its ALS factors rank the catalogue) and, when the set has a ranker, the
``two_stage`` row (its ALS candidates re-ranked by its ranker). What decides is what each set
would serve (:func:`served_row`): its ``two_stage`` row, or its ``als`` row when it has no ranker.

**The decision.** With no champion the challenger is promoted. Otherwise it is promoted when
``challenger >= champion - tolerance`` on the gate metric (``Settings.gate_metric``, default
``ndcg@10``; ``Settings.gate_tolerance``) of the deciding rows; a window without a scored user
gives no evidence, so the champion is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from models.protocol import KS, TEST_FRACTION, EvalSet, build_eval_set, positives_of, temporal_split
from recsys import schema as S

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, the two values of the metric (champion None: there is none, or it
    could not be scored) and the reason, in one line."""

    promote: bool
    metric: str
    challenger: float
    champion: float | None
    tolerance: float
    reason: str
    #: the rows compared (:data:`ALS_ROW`, :data:`TWO_STAGE_ROW`); None: not named, or no champion
    challenger_row: str | None = None
    champion_row: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The comparison's rows: a set's ALS factors ranking the catalogue, and its ALS candidates
#: re-ranked by its ranker.
ALS_ROW, TWO_STAGE_ROW = "als", "two_stage"
ROWS = (ALS_ROW, TWO_STAGE_ROW)
_ROW_WORDS = {ALS_ROW: "ALS", TWO_STAGE_ROW: "two-stage"}


def served_row(rows: Mapping[str, Mapping[str, float] | None]) -> str:
    """The row of what a set serves: ``two_stage`` when it has one (it has a ranker), else ``als``."""
    return TWO_STAGE_ROW if rows.get(TWO_STAGE_ROW) is not None else ALS_ROW


def _compared(rows: tuple[str, str] | None) -> str:
    """The reason's tail naming the compared lists (empty when the rows are not named)."""
    if rows is None:
        return ""
    ours, theirs = (_ROW_WORDS.get(row, row) for row in rows)
    return f" ({ours} lists)" if ours == theirs else f" (challenger {ours} lists vs champion {theirs} lists)"


def metric_depth(metric: str) -> int:
    """The k of ``ndcg@k`` / ``recall@k``; a clear error for any other name."""
    name, _, k = metric.partition("@")
    if name not in ("ndcg", "recall") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"gate metric {metric!r} is not ndcg@k or recall@k (e.g. ndcg@10): set RECSYS_GATE_METRIC")
    return int(k)


def decide(challenger: Mapping[str, float], champion: Mapping[str, float] | None, metric: str,
           tolerance: float, champion_missing_why: str = "no champion yet",
           rows: tuple[str, str] | None = None) -> GateDecision:
    """Promote unless the challenger's ``metric`` is below the champion's by more than
    ``tolerance``. ``champion`` None: nothing to compare with (``champion_missing_why`` says why),
    promote. A NaN challenger value (no scored user in the window) keeps the champion. ``rows``
    (challenger's, champion's) names the compared rows in the decision and its reason."""
    metric_depth(metric)
    if tolerance < 0:
        raise ValueError(f"gate tolerance {tolerance} must be >= 0 (e.g. 0.005): set RECSYS_GATE_TOLERANCE")
    ours = float(challenger[metric])
    named = {} if rows is None else {"challenger_row": rows[0], "champion_row": rows[1]}
    if champion is None:
        return GateDecision(True, metric, ours, None, tolerance, f"promoted: {champion_missing_why}",
                            challenger_row=named.get("challenger_row"))
    theirs = float(champion[metric])
    if math.isnan(ours) or math.isnan(theirs):
        return GateDecision(False, metric, ours, theirs, tolerance,
                            "kept the champion: no user in the evaluation window has a test positive "
                            "(widen RECSYS_GATE_WINDOW_DAYS)", **named)
    gap = theirs - ours
    if gap > tolerance:
        return GateDecision(False, metric, ours, theirs, tolerance,
                            f"kept the champion: challenger {metric} {ours:.4f} is {gap:.4f} below the "
                            f"champion's {theirs:.4f}, more than the tolerance {tolerance:g}{_compared(rows)}",
                            **named)
    return GateDecision(True, metric, ours, theirs, tolerance,
                        f"promoted: challenger {metric} {ours:.4f} vs champion {theirs:.4f} "
                        f"(within the tolerance {tolerance:g} or better){_compared(rows)}", **named)


def decide_rows(challenger: Mapping[str, Mapping[str, float] | None],
                champion: Mapping[str, Mapping[str, float] | None] | None, metric: str, tolerance: float,
                champion_missing_why: str = "no champion yet") -> GateDecision:
    """:func:`decide` on what each set serves (:func:`served_row`): ``challenger`` and ``champion``
    map row names to that row's metrics (None: the set has no such row)."""
    ours = served_row(challenger)
    if champion is None:
        return decide(challenger[ours] or {}, None, metric, tolerance, champion_missing_why, (ours, ours))
    theirs = served_row(champion)
    return decide(challenger[ours] or {}, champion[theirs], metric, tolerance, champion_missing_why, (ours, theirs))


@dataclass
class GateWindow:
    """The gate's evaluation set and what it was cut from: the split's train side (Spark, for
    the challenger's evaluation fit) and its rows in pandas (popularity fallback), the window."""

    eval_set: EvalSet
    train: DataFrame
    train_rows: Any  # pandas: user_id, item_id, event_timestamp of every train event
    window_start: datetime
    window_end: datetime
    active_users: int
    #: pandas, by user id: each window user's first test event, the time its two-stage features
    #: are read as of (just before it), as the ranker's examples are
    test_times: Any = None

    def describe(self) -> dict[str, Any]:
        return {"window_start": self.window_start.isoformat(), "window_end": self.window_end.isoformat(),
                "active_users": self.active_users, "scored_users": int(len(self.eval_set.users)),
                "catalogue": int(len(self.eval_set.catalogue))}


def window_eval_set(events: DataFrame, catalogue: np.ndarray, window_days: float,
                    test_fraction: float = TEST_FRACTION) -> GateWindow:
    """The module docstring's window over ``events`` (already cut at the reference time)."""
    from pyspark.sql import functions as F

    from models.holdout import _max_time
    from models.ranker.examples import first_times

    if window_days <= 0:
        raise ValueError(f"gate window {window_days} days must be > 0 (e.g. 7): set RECSYS_GATE_WINDOW_DAYS")
    end = _max_time(events)
    start = end - timedelta(days=window_days)
    active = events.filter(F.col(S.COL_TS) > F.lit(start)).select(S.COL_USER).distinct()
    train, test = temporal_split(events, test_fraction)
    train = train.persist()
    positives = positives_of(train, test).join(active, S.COL_USER, "left_semi").toPandas()
    rows = train.select(S.COL_USER, S.COL_ITEM, S.COL_TS).toPandas()
    test_times = first_times(test.join(active, S.COL_USER, "left_semi"))
    return GateWindow(build_eval_set(rows, positives, catalogue), train, rows, start, end, active.count(), test_times)


def ks_for(metric: str) -> tuple[int, ...]:
    """The protocol's ks plus the gate metric's own depth."""
    return tuple(sorted(set(KS) | {metric_depth(metric)}))
