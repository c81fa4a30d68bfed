"""The experiment report (``recsys report experiment NAME``): per arm of an A/B experiment, from the
offline ``impressions`` table and the offline ``events`` table with Spark, the answers served,
users, items shown, clicks, CTR and purchases per user with 95% intervals, and each arm against a
baseline arm (:mod:`models.experiment_stats`); written as JSON and a PNG plot, printed as a table.

Which answers: the impressions whose ``model_versions`` carry ``experiment = NAME`` (the service
adds it in an experiment: :mod:`bentos.experiments`), one per ``request_id``, grouped by ``arm``.

Attribution of an event (CLICK or PURCHASE) to a shown item:

- when the event has a ``request_id`` (the events table's attribution column: the stream logs it
  for an event sent to ``/events`` with one; a part written before the column existed reads as
  null), to the item with the event's ``item_id`` in that answer, however late;
- otherwise by user and item: to the latest answer to the event's user that showed its item at or
  before the event and at most ``window_s`` before it.

An event is attributed once at most. The report's ``attribution`` says which rule the attributed
events took: ``request_id`` (every one by its id), ``window`` (none by an id, or none attributed),
or ``request_id, else window`` (some each); each arm counts those by id in ``by_request_id``. The metrics per arm: ``impressions`` (answers), ``users``,
``items_shown`` (slots), ``clicks`` (slots with at least one attributed CLICK), ``ctr`` =
clicks / items_shown with its Wilson interval (each slot a trial), ``purchases`` (attributed
PURCHASE events) and ``purchases_per_user`` (over every user of the arm, buyers or not) with its
normal interval. The comparison: CTR by the two-proportion z-test and the difference's interval,
purchases per user by the difference of means and its normal interval.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.experiment_stats import Comparison, Interval, compare_means, compare_proportions, mean_interval, wilson
from pipelines.impressions import impressions_path
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

#: the ``model_versions`` key naming an answer's experiment (bentos.experiments.EXPERIMENT_KEY)
EXPERIMENT_KEY = "experiment"
#: the events attributed to impressions
ATTRIBUTED = ("CLICK", "PURCHASE")
DEFAULT_WINDOW_S = 1_800.0
REQUEST_ID = S.COL_REQUEST_ID


class ReportError(RuntimeError):
    """The report cannot be made (no table, no impressions of the experiment, an unknown arm)."""


@dataclass(frozen=True)
class ArmResult:
    """One arm's counts and metrics (module docstring); ``purchase_sums`` = (users, sum, sum of
    squares) of purchases per user, what the comparison of means needs."""

    arm: str
    impressions: int
    users: int
    items_shown: int
    clicks: int
    click_events: int
    purchases: int
    ctr: Interval
    purchases_per_user: Interval
    purchase_sums: tuple[int, float, float]
    by_request_id: int = 0


@dataclass
class ExperimentReport:
    experiment: str
    attribution: str
    window_s: float
    baseline: str
    arms: list[ArmResult]
    comparisons: list[Comparison] = field(default_factory=list)

    def arm(self, name: str) -> ArmResult:
        for result in self.arms:
            if result.arm == name:
                return result
        raise KeyError(f"no arm {name!r} in the report (arms: {[a.arm for a in self.arms]})")

    def comparison(self, metric: str, arm: str) -> Comparison:
        for comp in self.comparisons:
            if comp.metric == metric and comp.arm == arm:
                return comp
        raise KeyError(f"no comparison of {metric!r} for arm {arm!r}")

    def as_dict(self) -> dict[str, Any]:
        arms = [{k: v for k, v in asdict(a).items() if k != "purchase_sums"} for a in self.arms]
        return _finite({"experiment": self.experiment, "attribution": self.attribution, "window_s": self.window_s,
                        "baseline": self.baseline, "arms": arms,
                        "comparisons": [c.as_dict() for c in self.comparisons]})


def _finite(value: Any) -> Any:
    """The report with non-finite floats as None (JSON has no infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---- Spark: the counts per arm ---------------------------------------------------------------------


def arm_counts(spark: Any, impressions_root: Path, events_root: Path, name: str,
               window_s: float) -> tuple[list[dict[str, Any]], str]:
    """Per arm (sorted by name) the counts of the module docstring, and how events were attributed.

    One plan and one action (the collect): per shown slot its attributed clicks and purchases, then
    per arm and user, then per arm (each Spark stage costs time even on a tiny table)."""
    from pyspark.sql import functions as F

    if not impressions_root.is_dir():
        raise ReportError(f"no impressions table at {impressions_root}: run `recsys stream impressions` "
                          "while the service answers")
    table = spark.read.parquet(str(impressions_root))
    imps = (table.where(F.col("model_versions").getItem(EXPERIMENT_KEY) == F.lit(name))
            .dropDuplicates([REQUEST_ID])
            .select(REQUEST_ID, S.COL_USER, F.unix_micros("served_at").alias("_t0"),
                    F.coalesce(F.col("arm"), F.lit("none")).alias("arm"), "item_ids"))
    # posexplode_outer: an answer with no items still counts as an answer (one row, slot null)
    slots = imps.select(REQUEST_ID, S.COL_USER, "_t0", "arm", F.posexplode_outer("item_ids").alias("slot", S.COL_ITEM))
    attributed = _attribute(slots, _events(spark, events_root), window_s)
    per_slot = (attributed.groupBy(REQUEST_ID, "slot")
                .agg(F.sum(F.when(F.col(S.COL_EVENT_TYPE) == "CLICK", 1).otherwise(0)).alias("click_events"),
                     F.sum(F.when(F.col(S.COL_EVENT_TYPE) == "PURCHASE", 1).otherwise(0)).alias("purchases"),
                     F.sum("_by_id").alias("by_request_id")))
    per_user = (slots.join(per_slot, [REQUEST_ID, "slot"], "left")
                .fillna(0, ["click_events", "purchases", "by_request_id"])
                .groupBy("arm", S.COL_USER)
                .agg(F.sum(F.when(F.col("slot").isNull() | (F.col("slot") == 0), 1).otherwise(0)).alias("impressions"),
                     F.count(S.COL_ITEM).alias("items_shown"),
                     F.sum(F.when(F.col("click_events") > 0, 1).otherwise(0)).alias("clicks"),
                     F.sum("click_events").alias("click_events"), F.sum("purchases").alias("purchases"),
                     F.sum("by_request_id").alias("by_request_id")))
    result = (per_user.groupBy("arm")
              .agg(F.sum("impressions").alias("impressions"), F.count("*").alias("users"),
                   F.sum("items_shown").alias("items_shown"), F.sum("clicks").alias("clicks"),
                   F.sum("click_events").alias("click_events"), F.sum("purchases").alias("purchases"),
                   F.sum(F.col("purchases") * F.col("purchases")).alias("purchases_sq"),
                   F.sum("by_request_id").alias("by_request_id"))
              .orderBy("arm"))
    rows = [r.asDict() for r in result.collect()]
    if not rows:
        found = sorted(r[0] for r in table.select(F.col("model_versions").getItem(EXPERIMENT_KEY)).distinct()
                       .collect() if r[0] is not None)
        raise ReportError(f"no impressions of experiment {name!r} in {impressions_root} "
                          f"(experiments there: {found or 'none'}): check the name")
    return rows, attribution_rule(rows)


def attribution_rule(rows: list[dict[str, Any]]) -> str:
    """Which rule the attributed events of ``rows`` took (module docstring)."""
    by_id = sum(int(r.get("by_request_id") or 0) for r in rows)
    total = sum(int(r["click_events"]) + int(r["purchases"]) for r in rows)
    if by_id == 0:
        return "window"
    return "request_id" if by_id == total else "request_id, else window"


def _events(spark: Any, events_root: Path) -> Any:
    """The CLICK and PURCHASE events with their time in microseconds (``_te``), read with the
    table's full schema: ``request_id`` is null in parts written before the column existed."""
    from pyspark.sql import functions as F

    return (spark.read.schema(S.EVENTS_SPARK_DDL).parquet(str(events_root))
            .where(F.col(S.COL_EVENT_TYPE).isin(*ATTRIBUTED))
            .withColumn("_te", F.unix_micros(S.COL_TS)))


def _attribute(slots: Any, events: Any, window_s: float) -> Any:
    """The attributed events: (event_id, event_type, request_id, slot, _by_id), one row per event at
    most (module docstring); ``_by_id`` is 1 for an event attributed by its request_id, else 0."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    window_us = int(round(window_s * 1e6))
    keep = [S.COL_EVENT_ID, S.COL_EVENT_TYPE, REQUEST_ID, "slot", "_by_id"]
    tagged = (slots.join(events.where(F.col(REQUEST_ID).isNotNull()).drop(S.COL_USER), [REQUEST_ID, S.COL_ITEM])
              .withColumn("_by_id", F.lit(1)).select(*keep))
    untagged = events.where(F.col(REQUEST_ID).isNull()).drop(REQUEST_ID)
    # only events within the answers' span (plus the window) can join by time: filter before the join
    bounds = slots.agg(F.min("_t0").alias("_lo"), F.max("_t0").alias("_hi"))
    untagged = (untagged.crossJoin(F.broadcast(bounds))
                .where(F.col("_te").between(F.col("_lo"), F.col("_hi") + F.lit(window_us))))
    # the latest answer per event; the same event_id twice (a duplicated row) ranks 1 and 2: one kept
    latest = Window.partitionBy(S.COL_EVENT_ID).orderBy(F.col("_t0").desc(), F.col(REQUEST_ID), F.col("slot"))
    by_window = (slots.join(untagged.select(S.COL_EVENT_ID, S.COL_EVENT_TYPE, S.COL_USER, S.COL_ITEM, "_te"),
                            [S.COL_USER, S.COL_ITEM])
                 .where((F.col("_te") >= F.col("_t0")) & (F.col("_te") <= F.col("_t0") + F.lit(window_us)))
                 .withColumn("_rank", F.row_number().over(latest)).where(F.col("_rank") == 1)
                 .withColumn("_by_id", F.lit(0)).select(*keep))
    return tagged.unionByName(by_window).dropDuplicates([S.COL_EVENT_ID])


# ---- the report ------------------------------------------------------------------------------------


def build_report(name: str, rows: list[dict[str, Any]], attribution: str, window_s: float,
                 baseline: str | None = None) -> ExperimentReport:
    """The report from the counts per arm (:func:`arm_counts`): intervals, then every other arm
    against ``baseline`` (default: the first arm by name)."""
    arms = [ArmResult(arm=r["arm"], impressions=int(r["impressions"]), users=int(r["users"]),
                      items_shown=int(r["items_shown"]), clicks=int(r["clicks"]),
                      click_events=int(r["click_events"]), purchases=int(r["purchases"]),
                      ctr=wilson(int(r["clicks"]), int(r["items_shown"])),
                      purchases_per_user=mean_interval(int(r["users"]), float(r["purchases"]),
                                                       float(r["purchases_sq"])),
                      purchase_sums=(int(r["users"]), float(r["purchases"]), float(r["purchases_sq"])),
                      by_request_id=int(r.get("by_request_id") or 0))
            for r in rows]
    names = [a.arm for a in arms]
    if not arms:
        raise ReportError(f"experiment {name!r} has no arms in the impressions")
    base = baseline or names[0]
    if base not in names:
        raise ReportError(f"baseline arm {base!r} is not in experiment {name!r} (arms: {names}): pick one of them")
    report = ExperimentReport(name, attribution, window_s, base, arms)
    ref = report.arm(base)
    for arm in arms:
        if arm.arm == base:
            continue
        if arm.items_shown and ref.items_shown:
            report.comparisons.append(compare_proportions("ctr", arm.arm, base, arm.clicks, arm.items_shown,
                                                          ref.clicks, ref.items_shown))
        if arm.users >= 2 and ref.users >= 2:
            report.comparisons.append(compare_means("purchases_per_user", arm.arm, base, arm.purchase_sums,
                                                    ref.purchase_sums))
    return report


def experiment_report(settings: Settings, name: str, window_s: float = DEFAULT_WINDOW_S,
                      baseline: str | None = None, spark: Any = None) -> ExperimentReport:
    """The report of experiment ``name`` on the active dataset's impressions and events tables."""
    from recsys.spark import get_spark

    if not window_s > 0:
        raise ReportError(f"window_s={window_s} must be > 0 (seconds after an answer that its clicks count)")
    events_root = settings.dataset_path / "events"
    if not events_root.is_dir():
        raise ReportError(f"no events table at {events_root}: run `recsys data generate` or point --dataset at one")
    spark = spark or get_spark(settings, app_name="recsys-experiment-report")
    rows, how = arm_counts(spark, impressions_path(settings.dataset_path), events_root, name, window_s)
    log.info("experiment %s: %d arms, events attributed by %s", name, len(rows), how)
    return build_report(name, rows, how, window_s, baseline)


# ---- output ----------------------------------------------------------------------------------------


def format_table(report: ExperimentReport) -> str:
    """The report as a text table, then one line per comparison."""
    lines = [f"experiment {report.experiment} (attribution: {report.attribution}, window {report.window_s:g} s, "
             f"baseline {report.baseline})",
             f"{'arm':<16}{'answers':>9}{'users':>8}{'shown':>9}{'clicks':>8}  {'CTR [95% CI]':<26}"
             f"{'purchases':>10}  {'per user [95% CI]':<26}"]
    for a in report.arms:
        lines.append(f"{a.arm:<16}{a.impressions:>9}{a.users:>8}{a.items_shown:>9}{a.clicks:>8}  "
                     f"{_interval(a.ctr):<26}{a.purchases:>10}  {_interval(a.purchases_per_user):<26}")
    for c in report.comparisons:
        d = c.difference
        lines.append(f"{c.arm} - {c.baseline} {c.metric}: {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}], "
                     f"z={c.z:.2f}, p={c.p_value:.3g}{' (significant at 5%)' if c.significant else ''}")
    return "\n".join(lines)


def _interval(i: Interval) -> str:
    return f"{i.value:.4f} [{i.low:.4f}, {i.high:.4f}]"


def write_report(report: ExperimentReport, out_dir: Path) -> tuple[Path, Path]:
    """``experiment-NAME.json`` and ``experiment-NAME.png`` (CTR and purchases per user per arm,
    with their 95% intervals) in ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"experiment-{report.experiment}.json"
    json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    png_path = out_dir / f"experiment-{report.experiment}.png"
    plot_report(report, png_path)
    return json_path, png_path


def plot_report(report: ExperimentReport, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(10, 4), layout="constrained")
    names = [a.arm for a in report.arms]
    for ax, metric, title in zip(fig.subplots(1, 2), ("ctr", "purchases_per_user"),
                                 ("CTR (clicks per item shown)", "purchases per user")):
        values = [getattr(a, metric) for a in report.arms]
        errors = [[v.value - v.low for v in values], [v.high - v.value for v in values]]
        colours = ["tab:grey" if n == report.baseline else "tab:blue" for n in names]
        ax.bar(names, [v.value for v in values], yerr=errors, capsize=6, color=colours)
        ax.set_title(f"{title}, 95% CI")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"experiment {report.experiment} (baseline {report.baseline} in grey)")
    fig.savefig(path, dpi=100)
