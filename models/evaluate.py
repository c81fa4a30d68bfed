"""``recsys evaluate``: load -> split -> clean -> tune -> fit -> evaluate, under the one protocol
(:mod:`models.protocol`), in a workspace of its own.

The workspace holds the canonical copy of the input, the factors, and an MLflow store (SQLite, so
its runs and registered models never mix with the demo's); nothing outside it is written but the
report. Hyperparameters are tuned on the validation split (the protocol's split applied to train),
never on test.

The split, the tuning and :class:`models.holdout.EvaluationConfig` live in :mod:`models.holdout`,
which the training jobs share. The report's ``two_stage_*`` keys are reserved for the two-stage
model (retrieval candidates re-ranked by the TensorFlow ranker): pass ``two_stage`` to
:func:`run_evaluation` to fill them. The ``served_*`` keys are the service's own engine on the
same users (``bentos.evaluation.served``, passed in as ``served`` because ``models`` may not
import ``bentos``); it reuses what the two-stage step recorded on the :class:`EvalContext`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.als import ALSConfig, Factors, Popularity, export_factors, fit_als
from models.holdout import (
    EvalContext,
    EvaluationConfig,
    Holdout,
    ServedFn,
    Timer,
    TwoStageFn,
    clean_to_last_event,
    holdout,
    tune,
)
from models.protocol import evaluate_top_k, rank_with, ranking_metrics_spark, top_k_frame
from pipelines.canonical import MANIFEST, read_manifest
from pipelines.cleaning import CleaningConfig
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "ml-100k", "ml-csv", "canonical")
#: Report keys each model fills, prefixed by the model name (popularity_, als_, two_stage_, served_): the
#: accuracy metrics, then the beyond-accuracy measures of the same top-10 lists.
HEADLINE = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@10", "novelty@10", "ild@10", "arp@10")
TWO_STAGE = "two_stage"
SERVED = "served"
#: the two-stage lists re-ranked by the ranker's int8 variant (models.ranker.export), when it has one
QUANTIZED = "quantized"


# ---- stages -----------------------------------------------------------------------------------


def load_dataset(data: Path, workspace: Path, layout: str = "auto") -> Path:
    """The canonical dataset to evaluate: a MovieLens folder is loaded into the workspace; a
    canonical dataset folder (with manifest.json) is read where it is, never written."""
    from pipelines.loaders import load_movielens

    data = Path(data)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose {', '.join(LAYOUTS)}")
    if layout == "canonical" or (layout == "auto" and (data / MANIFEST).is_file()):
        read_manifest(data)  # a clear error when it is not one
        return data
    target = workspace / "data" / "canonical" / data.name
    load_movielens(data, target, layout=layout)
    return target


def workspace_settings(base: Settings, workspace: Path, dataset: str, tracking_uri: str | None) -> Settings:
    """Settings whose data, run dir and MLflow store are the workspace's own."""
    return base.with_overrides(
        data_dir=workspace / "data", run_dir=workspace / "run", dataset=dataset,
        mlflow_tracking_uri=tracking_uri or f"sqlite:///{(workspace / 'mlflow.db').resolve()}",
    )


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if not np.isfinite(value) else round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _headline(name: str, report: dict[str, Any] | None) -> dict[str, Any]:
    return {f"{name}_{key}": (report or {}).get(key) for key in HEADLINE}


# ---- the pipeline -----------------------------------------------------------------------------


def item_vectors_of(factors: Factors, catalogue: np.ndarray) -> np.ndarray:
    """The ALS item factors, one row per catalogue column (zeros for an item without one): the
    embeddings every row's intra-list diversity compares, so the rows share one item space."""
    return factors.item_vectors(catalogue)[0]


def score_models(spark: SparkSession, split: Holdout, factors: Factors, cfg: EvaluationConfig) -> dict[str, Any]:
    """Popularity and ALS under the protocol, the ALS ranking cross-checked by the Spark metrics."""
    eval_set, catalogue = split.eval_set, split.eval_set.catalogue
    vectors = item_vectors_of(factors, catalogue)
    depth = max(max(cfg.ks), 10, cfg.curve_to)
    popularity = Popularity.fit(split.train_rows)
    pop_ranked = rank_with(eval_set, popularity.score_fn(catalogue), depth)
    # users without an ALS vector (cleaning removed them, or no train rows) fall back to popularity
    als_ranked = rank_with(eval_set, factors.score_fn(catalogue, fallback=popularity.scores(catalogue)), depth)
    models: dict[str, Any] = {"popularity": evaluate_top_k(eval_set, pop_ranked, cfg.ks, cfg.curve_to, vectors),
                              "als": evaluate_top_k(eval_set, als_ranked, cfg.ks, cfg.curve_to, vectors)}
    positives = pd.DataFrame({S.COL_USER: np.repeat(eval_set.users, [len(p) for p in eval_set.positives]),
                              S.COL_ITEM: catalogue[np.concatenate(eval_set.positives)]})
    models["als"]["spark_check"] = ranking_metrics_spark(
        spark.createDataFrame(top_k_frame(eval_set, als_ranked)), spark.createDataFrame(positives), 10)
    return models


def run_evaluation(
    data: Path,
    out: Path | None = None,
    *,
    layout: str = "auto",
    workspace: Path | None = None,
    config: EvaluationConfig | None = None,
    settings: Settings | None = None,
    tracking_uri: str | None = None,
    track: bool = True,
    two_stage: TwoStageFn | None = None,
    served: ServedFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate popularity and ALS (and ``two_stage``, then ``served``, when given) on ``data``;
    write the JSON report to ``out`` and return it. Without ``workspace`` a temporary one is used
    and removed. ``served`` runs after ``two_stage`` on the same :class:`EvalContext`, whose
    train-only feature dataset and ranker it reuses; its counts go to ``models.served.serving``."""
    from recsys.spark import get_spark

    cfg = config or EvaluationConfig()
    temporary = workspace is None
    ws = Path(tempfile.mkdtemp(prefix="recsys-evaluate-")) if temporary else Path(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    started = time.perf_counter()
    try:
        with timer("load"):
            dataset_dir = load_dataset(data, ws, layout)
        ws_settings = workspace_settings(settings or Settings(), ws, dataset_dir.name, tracking_uri)
        spark = get_spark(ws_settings, app_name="recsys-evaluate")
        events = spark.read.parquet(str(dataset_dir / "events")).persist()
        items = spark.read.parquet(str(dataset_dir / "items")).select(S.COL_ITEM).persist()
        catalogue = np.sort(items.toPandas()[S.COL_ITEM].to_numpy().astype(np.int64))
        with timer("split"):
            split = holdout(events, catalogue, cfg.test_fraction)
            validation = holdout(split.train, catalogue, cfg.test_fraction)  # carved from train only
        best, cleaning, tuning = tune(validation, items, cfg, timer, progress)
        with timer("clean"):
            clean_train = clean_to_last_event(split.train, cleaning, items)
        with timer("fit"):
            factors = fit_als(clean_train.interactions, best, clean_train.reference_time)
        with timer("evaluate"):
            models = score_models(spark, split, factors, cfg)
        models[TWO_STAGE] = models[QUANTIZED] = models[SERVED] = None  # filled by the steps passed in
        context = EvalContext(spark, ws_settings, dataset_dir, split.train, split.test, split.train_rows,
                              split.eval_set, validation.eval_set, cleaning, best, factors, clean_train.reference_time)
        if two_stage is not None:
            with timer("two_stage"):
                models[TWO_STAGE] = evaluate_top_k(split.eval_set, two_stage(context), cfg.ks, cfg.curve_to,
                                                   item_vectors_of(factors, catalogue))
            if context.quantized_ranked is not None:  # the ranker's int8 variant on the same lists
                models[QUANTIZED] = evaluate_top_k(split.eval_set, context.quantized_ranked, cfg.ks, cfg.curve_to,
                                                   item_vectors_of(factors, catalogue))
        if served is not None:
            with timer("served"):
                ranked, serving = served(context)
                models[SERVED] = {**evaluate_top_k(split.eval_set, ranked, cfg.ks, cfg.curve_to,
                                                   item_vectors_of(factors, catalogue)), "serving": serving}

        manifest = read_manifest(dataset_dir)
        report: dict[str, Any] = {
            **_headline("popularity", models["popularity"]),
            **_headline("als", models["als"]),
            **_headline(TWO_STAGE, models[TWO_STAGE]),  # None until the ranker fills them
            **_headline(QUANTIZED, models[QUANTIZED]),
            **_headline(SERVED, models[SERVED]),
            "dataset": {"path": str(data), "source": manifest.source, "events": manifest.events,
                        "users": manifest.users, "items": manifest.items,
                        "fingerprint": _fingerprint(dataset_dir)},
            "protocol": {"test_fraction": cfg.test_fraction, "ks": list(cfg.ks),
                         "scored_users": len(split.eval_set.users), "validation_users": len(validation.eval_set.users),
                         "catalogue": len(catalogue), "training_cutoff": clean_train.reference_time.isoformat()},
            "hyperparameters": {"als": asdict(best), "cleaning": _cleaning_params(cleaning),
                                "tuned": tuning is not None},
            "tuning": tuning,
            "cleaning": clean_train.as_dict(),
            "models": models,
            "timings": timer.seconds,
        }
        if track:
            report["mlflow"] = _track(ws_settings, ws, report, factors, best, cleaning, cfg)
        report["timings"]["total_s"] = round(time.perf_counter() - started, 2)
        report = _rounded(report)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
            log.info("wrote %s", out)
        split.unpersist()
        validation.unpersist()
        for frame in (events, items, clean_train.interactions, clean_train.events):
            frame.unpersist()
        return report
    finally:
        if temporary:
            shutil.rmtree(ws, ignore_errors=True)


def _fingerprint(dataset_dir: Path) -> str:
    from models.tracking import dataset_fingerprint

    return dataset_fingerprint(dataset_dir)


def _cleaning_params(cfg: CleaningConfig) -> dict[str, Any]:
    params = asdict(cfg)
    params["event_weights"] = dict(cfg.event_weights)
    return params


def _track(settings: Settings, ws: Path, report: dict[str, Any], factors: Factors, best: ALSConfig,
           cleaning: CleaningConfig, cfg: EvaluationConfig) -> dict[str, Any]:
    """Log the evaluation as a training run in the workspace's own MLflow store."""
    from models.als import embedding_table_path
    from models.names import ALS_MODEL_NAME, EVALUATION_EXPERIMENT
    from models.pyfunc import AlsRecommender
    from models.tracking import ModelSpec, log_training_run

    user_dir, item_dir = embedding_table_path(settings, "user"), embedding_table_path(settings, "item")
    export_factors(factors, user_dir, item_dir)
    report_path = ws / "report.json"
    report_path.write_text(json.dumps(_rounded(report), indent=2) + "\n")
    params = {**best.params(), **{f"cleaning_{k}": v for k, v in _cleaning_params(cleaning).items()},
              "test_fraction": cfg.test_fraction, "tuned": cfg.grid is not None}
    metrics = {k: v for k, v in report.items()
               if k.startswith(("popularity_", "als_", f"{TWO_STAGE}_", f"{QUANTIZED}_", f"{SERVED}_")) and v is not None}
    artifacts = (ws / "mlartifacts").resolve().as_uri()  # a local store's artifacts stay in the workspace
    run = log_training_run(
        settings.effective_mlflow_uri, EVALUATION_EXPERIMENT, f"evaluate-{settings.dataset}", params, metrics,
        report["dataset"]["fingerprint"], artifacts={"report": report_path, "user_embedding": user_dir,
                                                     "item_embedding": item_dir},
        models=[ModelSpec(ALS_MODEL_NAME, AlsRecommender(), {"user_embedding": user_dir, "item_embedding": item_dir},
                          S.COL_USER)],
        artifact_location=artifacts if settings.effective_mlflow_uri.startswith("sqlite") else None,
    )
    return {"tracking_uri": run.tracking_uri, "run_id": run.run_id, "registered": run.registered}
