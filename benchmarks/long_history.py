"""Benchmark: `recsys evaluate` on a long history (issue 12, item 8: evaluation that finishes).

Run: ``python -m benchmarks.long_history`` -> ``benchmarks/results/long_history.json``: the time
of each stage of the evaluation (``timings``: split, clean, fit, evaluate, two_stage, served,
total_s), the goal (``total_s`` under 30 minutes on 2 cores), the dataset's size and span, and the
rows of the offline feature snapshots the ranker's frames read (``snapshot_rows``, with
``item_profile_dense_rows``: what one row per item per day, the old layout, would have written).

The dataset is the project's synthetic generator over a long span (default 10,000 items over 20
years), written to a temporary folder and evaluated with the same pipeline as ``recsys evaluate
--layout canonical --no-tune --no-track`` (the ranker's two-stage row included; the served row
too when Redis is up, ``recsys stack up``; ``--no-served`` skips it).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import write_results
from recsys.logs import configure_logging

log = logging.getLogger(__name__)

GOAL_S = 30 * 60


def parquet_rows(folder: Path) -> int:
    """Rows of every parquet file under ``folder`` (0 when there is none)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.rglob("*.parquet"))


def snapshot_rows(workspace: Path) -> dict[str, int]:
    """Rows of each offline feature table the evaluation wrote under ``workspace`` (one entry per
    table folder name, summed over the workspaces' datasets)."""
    from recsys.feature_tables import ITEM_EMBEDDING, ITEM_PROFILE, USER_EMBEDDING, USER_PROFILE, USER_REALTIME

    rows: dict[str, int] = {}
    for name in (USER_PROFILE, ITEM_PROFILE, USER_REALTIME, USER_EMBEDDING, ITEM_EMBEDDING):
        found = [p for p in workspace.rglob(name) if p.is_dir()]
        if found:
            rows[name] = sum(parquet_rows(p) for p in found)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=20 * 365)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-served", action="store_true", help="Skip the served row (it needs Redis).")
    args = parser.parse_args()
    configure_logging()

    from bentos.evaluation import check_redis, served
    from models.evaluate import run_evaluation
    from models.holdout import EvaluationConfig
    from models.ranker.two_stage import two_stage
    from pipelines.generator import GeneratorConfig, generate
    from recsys.config import Settings

    if not args.no_served:
        check_redis(Settings())  # before minutes of work: names the fix (`recsys stack up`, --no-served)
    cfg = GeneratorConfig(n_users=args.users, n_items=args.items, days=args.days, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="recsys-long-") as tmp:
        data, workspace = Path(tmp) / "long", Path(tmp) / "ws"
        started = time.perf_counter()
        manifest = generate(cfg, data)
        generate_s = round(time.perf_counter() - started, 2)
        log.info("generated %d events over %d days in %.0f s", manifest.events, args.days, generate_s)
        report = run_evaluation(data, None, layout="canonical", config=EvaluationConfig(grid=None), track=False,
                                workspace=workspace, two_stage=two_stage, served=None if args.no_served else served)
        rows = snapshot_rows(workspace)
    timings: dict[str, Any] = report["timings"]
    numbers: dict[str, Any] = {
        "total_s": timings["total_s"], "goal_s": GOAL_S, "goal_met": timings["total_s"] < GOAL_S,
        "timings": timings, "generate_s": generate_s,
        "dataset": {"users": manifest.users, "items": manifest.items, "events": manifest.events,
                    "days": args.days, "first_event": manifest.min_event_ts, "last_event": manifest.max_event_ts},
        "snapshot_rows": rows, "item_profile_dense_rows": args.items * args.days,
        "two_stage_ndcg@10": report.get("two_stage_ndcg@10"), "als_ndcg@10": report.get("als_ndcg@10"),
        "served_ndcg@10": report.get("served_ndcg@10"),
    }
    table = [("total", f"{timings['total_s']:.0f} s (goal < {GOAL_S} s)"),
             *[(stage, f"{seconds:.1f} s") for stage, seconds in timings.items() if stage != "total_s"],
             ("events / items / days", f"{manifest.events:,} / {manifest.items:,} / {args.days:,}"),
             *[(f"rows of {name}", f"{n:,}") for name, n in rows.items()],
             ("item_profile rows if dense (items x days)", f"{args.items * args.days:,}")]
    path = write_results("long_history", numbers, table,
                         notes="The stages of `recsys evaluate --layout canonical --no-tune --no-track` on the "
                               "synthetic generator's long history (benchmarks/long_history.py says how).")
    log.info("wrote %s: total %.0f s", path, timings["total_s"])


if __name__ == "__main__":
    main()
