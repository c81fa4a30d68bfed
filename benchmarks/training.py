"""Benchmark: training stage timings and FAISS at 1M items.

Run: ``python -m benchmarks.training`` -> ``benchmarks/results/training.json`` with

- ``clean_s``, ``als_s``, ``index_s`` with suffixes ``_ml100k`` (MovieLens 100K) and ``_1m``
  (about 1M synthetic events: 23,000 users, 100,000 items), the stages of ``recsys train als``
  and ``recsys index build`` (default configs, no MLflow); ``ranker_s_*``: ``recsys train ranker``
  (labels and their ALS, the Feast point-in-time frame, the fit) once the feature store is built;
  ``total_s_*``: clean + ALS + index + ranker (goal: under 10 minutes for 1M events).
- ``faiss_build_s_1m``, ``faiss_recall@10_1m``, ``faiss_speedup_vs_exact_1m``: the HNSW index at
  1M items x 128 dims on clustered vectors (a Gaussian mixture of 1,000 clusters; random Gaussian
  vectors are a worst case no index serves), against exact search, both single-threaded when
  searching. Goal: recall@10 >= 0.95 at least 20x faster than exact.

Recall is measured on held-out queries: the queries are split in two, efSearch is calibrated on
one half (``*_calibration_queries_*``, its recall ``*_recall@10_calibration_*``) and the recall
reported is that of the other half (``*_heldout_queries_*``), never seen by the calibration. For
the datasets the query users are split the same way (``index_recall@10_*``, from an index built
like `recsys index build`'s with only the calibration users as its recall sample).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import write_results
from benchmarks.generator import SIZES
from benchmarks.quality import ml100k_path
from recsys.config import Settings
from recsys.logs import configure_logging

log = logging.getLogger(__name__)

FAISS_ITEMS, FAISS_DIM, FAISS_CLUSTERS, FAISS_QUERIES, EXACT_QUERIES = 1_000_000, 128, 1_000, 1_000, 200
#: cluster spread relative to the spread of the centres (both Gaussian)
FAISS_NOISE = 0.5


def bench_stages(settings: Settings, label: str) -> dict[str, Any]:
    """clean, ALS and index seconds for the active dataset of ``settings``."""
    from models.train import build_index, train_als
    from recsys.spark import get_spark

    get_spark(settings)  # the JVM start is not a training stage
    trained = train_als(settings, track=False, progress=False)
    start = time.perf_counter()
    built = build_index(settings, track=False)
    index_s = time.perf_counter() - start
    report = built.index.report
    log.info("%s: clean %.1fs, ALS %.1fs, index %.1fs (%s)", label, trained.seconds["clean_s"],
             trained.seconds["als_s"], index_s, report)
    return {f"clean_s_{label}": trained.seconds["clean_s"], f"als_s_{label}": trained.seconds["als_s"],
            f"index_s_{label}": round(index_s, 2), f"users_{label}": len(trained.factors.user_ids),
            f"items_{label}": len(trained.factors.item_ids),
            f"index_kind_{label}": report["user_to_item"]["kind"],
            **heldout_recall(trained.factors.item_ids, trained.factors.items, trained.factors.users,
                             built.index.user_to_item.config, f"index_{label}", f"_{label}")}


def heldout_recall(item_ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, config: Any, prefix: str,
                   suffix: str, exact_queries: int = EXACT_QUERIES) -> dict[str, Any]:
    """Recall@10 of an inner-product index built with ``config`` on held-out queries: the
    queries are shuffled and split in half, efSearch is calibrated on the first half only and
    recall measured on (at most ``exact_queries`` of) the second, against exact search. Returns
    ``{prefix}_recall@10{suffix}`` (held out), ``{prefix}_recall@10_calibration{suffix}``, both
    halves' sizes and the efSearch chosen."""
    from models.index import ItemIndex, exact_search, recall_against

    order = np.random.default_rng(1).permutation(len(queries))
    calibration, heldout = order[: len(order) // 2], order[len(order) // 2:][:exact_queries]
    if not len(calibration) or not len(heldout):
        raise ValueError(f"{len(queries)} queries cannot be split into calibration and held-out halves: pass >= 2")
    index = ItemIndex.build(item_ids, vectors, "ip", config, queries=queries[calibration])
    _, found = index.search(queries[heldout], 10)
    exact = exact_search(np.asarray(vectors, dtype=np.float32), item_ids, np.asarray(queries[heldout], np.float32), 10)
    return {f"{prefix}_recall@10{suffix}": round(recall_against(found, exact), 4),
            f"{prefix}_recall@10_calibration{suffix}": index.report.get("recall_at_k"),
            f"{prefix}_calibration_queries{suffix}": int(min(len(calibration), config.recall_queries)),
            f"{prefix}_heldout_queries{suffix}": int(len(heldout)),
            f"{prefix}_ef_search{suffix}": index.report.get("ef_search")}


def bench_ranker(settings: Settings, label: str) -> dict[str, Any]:
    """``recsys train ranker`` seconds (labels with their ALS, point-in-time frame, fit; no
    MLflow) after the feature store it reads is built: daily snapshots, real-time backfill, apply."""
    from models.ranker.job import train_ranker
    from pipelines import feature_store as fs
    from pipelines.backfill import run_backfill
    from pipelines.batch_features import DayRange, run_batch_features
    from datetime import datetime

    from pipelines.canonical import read_manifest, reference_time
    from recsys import schema as S
    from recsys.spark import get_spark

    spark = get_spark(settings)
    end = reference_time(settings.dataset_path)
    first = datetime.fromisoformat(str(read_manifest(settings.dataset_path).min_event_ts))
    run_batch_features(spark, settings, end, DayRange(first.date(), end.date()))
    run_backfill(spark, settings, end)
    fs.apply(settings)
    result = train_ranker(settings, track=False, progress=False)
    log.info("%s: ranker %s", label, result.seconds)
    return {f"ranker_s_{label}": result.seconds["ranker_s"],
            **{f"{k.removesuffix('_s')}_s_{label}": v for k, v in result.seconds.items() if k != "ranker_s"},
            f"ranker_rows_{label}": result.training.fit.rows,
            f"ranker_lists_{label}": int(result.training.examples[S.COL_USER].nunique())}


def previous_results() -> dict[str, Any]:
    """The numbers of the last full run (``results/training.json`` without its machine facts)."""
    import json

    from benchmarks._common import RESULTS

    path = RESULTS / "training.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "machine"} if path.is_file() else {}


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    labels = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * FAISS_NOISE
    return centres[labels] + noise


def bench_faiss_1m(n_items: int = FAISS_ITEMS) -> dict[str, Any]:
    import faiss

    from models.index import IndexConfig, ItemIndex, exact_search, recall_against

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((FAISS_CLUSTERS, FAISS_DIM), dtype=np.float32)
    vectors = clustered(n_items, rng, centres)
    # new points of the same mixture (user-like): efSearch is calibrated on the first set, recall
    # measured on the second, which the calibration never saw
    calibration = clustered(FAISS_QUERIES, rng, centres)
    queries = clustered(FAISS_QUERIES, rng, centres)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    start = time.perf_counter()
    index = ItemIndex.build(ids, vectors, "ip", IndexConfig(kind="hnsw"), queries=calibration)
    build_s = time.perf_counter() - start

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # both sides single-threaded: the speed-up is per core
    try:
        start = time.perf_counter()
        exact = exact_search(vectors, ids, queries[:EXACT_QUERIES], 10)
        exact_per_query = (time.perf_counter() - start) / EXACT_QUERIES
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        hnsw_per_query = (time.perf_counter() - start) / FAISS_QUERIES
    finally:
        faiss.omp_set_num_threads(threads)
    recall = recall_against(found[:EXACT_QUERIES], exact)
    log.info("FAISS %d x %d: build %.1fs, recall@10 %.4f (held out), %.3f ms vs exact %.2f ms per query", n_items, FAISS_DIM, build_s,
             recall, hnsw_per_query * 1e3, exact_per_query * 1e3)
    return {"faiss_items_1m": n_items, "faiss_build_s_1m": round(build_s, 1), "faiss_recall@10_1m": round(recall, 4),
            "faiss_speedup_vs_exact_1m": round(exact_per_query / hnsw_per_query, 1),
            "faiss_ms_per_query_1m": round(hnsw_per_query * 1e3, 4),
            "exact_ms_per_query_1m": round(exact_per_query * 1e3, 3),
            "faiss_ef_search_1m": index.report["ef_search"], "faiss_hnsw_m_1m": index.config.hnsw_m,
            "faiss_recall@10_calibration_1m": index.report["recall_at_k"],
            "faiss_calibration_queries_1m": index.report["recall_queries"],
            "faiss_heldout_queries_1m": EXACT_QUERIES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", default=["ml100k", "1m", "faiss"], choices=["ml100k", "1m", "faiss"])
    parser.add_argument("--no-ranker", action="store_true", help="Skip ranker_s_* (it builds the feature store).")
    parser.add_argument("--ranker-only", action="store_true",
                        help="Only ranker_s_* for --parts, merged into the existing training.json (the other "
                             "numbers are kept as they are).")
    parser.add_argument("--faiss-items", type=int, default=FAISS_ITEMS,
                        help="Items in the FAISS part (a smaller number for a smoke run; the keys keep _1m).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Write training.json/.md here instead of benchmarks/results/ (smoke runs).")
    args = parser.parse_args()
    configure_logging()
    numbers: dict[str, Any] = {}
    if args.ranker_only:
        numbers = previous_results()
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
        base = Settings(data_dir=Path(tmp) / "data", run_dir=Path(tmp) / "run")
        if "ml100k" in args.parts:
            from pipelines.loaders import load_movielens

            settings = base.with_overrides(dataset="ml-100k")
            load_movielens(ml100k_path(), settings.dataset_path)
            if not args.ranker_only:
                numbers.update(bench_stages(settings, "ml100k"))
            if not args.no_ranker:
                numbers.update(bench_ranker(settings, "ml100k"))
        if "1m" in args.parts:
            from pipelines.generator import GeneratorConfig, generate

            settings = base.with_overrides(dataset="synthetic-1m")
            users, items = SIZES["1m"]
            manifest = generate(GeneratorConfig(n_users=users, n_items=items), settings.dataset_path, progress=False)
            numbers["events_1m"] = manifest.events
            if not args.ranker_only:
                numbers.update(bench_stages(settings, "1m"))
            if not args.no_ranker:
                numbers.update(bench_ranker(settings, "1m"))
    if "faiss" in args.parts and not args.ranker_only:
        numbers.update(bench_faiss_1m(args.faiss_items))
    for label in ("ml100k", "1m"):
        if f"clean_s_{label}" in numbers:
            numbers.setdefault(f"ranker_s_{label}", None)  # None: run without --no-ranker
        stages = [numbers.get(f"{stage}_s_{label}") for stage in ("clean", "als", "index", "ranker")]
        if all(isinstance(v, (int, float)) for v in stages):
            numbers[f"total_s_{label}"] = round(sum(stages), 1)  # the goal: under 600 s for 1M events
    rows = [(k, "—" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))) for k, v in numbers.items()]
    notes = ("Stages: `recsys train als` (clean_s: cleaning, als_s: Spark ALS fit, default config) and "
             "`recsys index build` (index_s: both indexes, with the recall calibration), local Spark on this "
             "machine; synthetic 1M = GeneratorConfig(n_users=23,000, n_items=100,000). FAISS: HNSW (M=16, "
             "efConstruction 80, efSearch calibrated to recall 0.97 on a calibration query set; faiss_recall@10 is measured on a second, held-out set) over 1M x 128 vectors of "
             "a 1,000-cluster Gaussian mixture, inner product; exact = IndexFlatIP brute force; both timed on "
             "one thread. ranker_s: `recsys train ranker` without MLflow (label window and its ALS, Feast "
             "point-in-time frame, 5-fold listwise fit; at most ExampleConfig.max_users = 2,000 label users, "
             "ranker_lists = the users that kept a retrieved positive), timed after the feature store is built; "
             "total_s = clean + ALS + index + ranker (goal: under 600 s for 1M events); "
             "`--ranker-only` measures it alone and keeps the other numbers; — = not measured. "
             "The machine's two cores are shared with other jobs, so times are upper bounds.")
    path = write_results("training", numbers, rows, notes=notes, folder=args.out)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
