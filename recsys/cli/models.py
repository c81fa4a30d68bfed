"""`recsys train ...`, `recsys index ...`, `recsys evaluate` and `recsys retrain`: training, the item
indexes, the one evaluation protocol and the gated retrain from the command line. Heavy modules
load inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, settings_of

train_app = typer.Typer(help="Train models on the active dataset and hand them to MLflow.", no_args_is_help=True)
index_app = typer.Typer(help="The FAISS item indexes built from the ALS item vectors.", no_args_is_help=True)

BentomlHome = Annotated[Optional[Path], typer.Option(
    help="BentoML home for the model store (default: $BENTOML_HOME, else ~/bentoml).")]
TrackToStores = Annotated[bool, typer.Option("--track/--no-track",
                                             help="Log to MLflow and save to the BentoML model store.")]


@train_app.command("als")
def train_als_cmd(
    ctx: typer.Context,
    rank: Annotated[Optional[int], typer.Option(min=1, help="Factors per user and item.")] = None,
    reg_param: Annotated[Optional[float], typer.Option(min=0, help="L2 regularization (Spark's regParam).")] = None,
    alpha: Annotated[Optional[float], typer.Option(min=0, help="Confidence scale of implicit feedback.")] = None,
    max_iter: Annotated[Optional[int], typer.Option(min=1, help="ALS iterations.")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune",
                                       help="Pick rank, regParam and alpha on a validation split first.")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log and register in MLflow.")] = True,
) -> None:
    """Clean the active dataset's events, fit Spark ALS, write the embedding tables, log to MLflow."""
    from dataclasses import replace

    from models.als import ALSConfig
    from models.train import train_als
    from pipelines.canonical import DatasetError

    settings = settings_of(ctx)
    overrides = {k: v for k, v in {"rank": rank, "reg_param": reg_param, "alpha": alpha,
                                    "max_iter": max_iter}.items() if v is not None}
    try:
        config = replace(ALSConfig(), **overrides)
        result = train_als(settings, config, tune=tune, track=track)
    except (ValueError, DatasetError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    typer.echo(f"ALS rank {result.config.rank}, regParam {result.config.reg_param}, alpha {result.config.alpha}: "
               f"{len(result.factors.user_ids):,} users, {len(result.factors.item_ids):,} items, "
               f"cutoff {result.cutoff.isoformat()}")
    typer.echo(f"  user factors: {result.user_path}\n  item factors: {result.item_path}")
    if result.run_id:
        typer.echo(f"  MLflow run {result.run_id} at {settings.effective_mlflow_uri}; registered {result.registered}")


@train_app.command("ranker")
def train_ranker_cmd(
    ctx: typer.Context,
    epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Training epochs (default: RankerConfig's, chosen on validation splits).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size on CPU (x4 on a GPU).")] = 512,
    n_hard: Annotated[int, typer.Option(min=0, help="Hard negatives per user (retrieval candidates).")] = 150,
    n_random: Annotated[int, typer.Option(min=0, help="Random negatives per user.")] = 10,
    max_users: Annotated[int, typer.Option(
        min=0, help="Label users sampled per window when more have a positive (0: all of them).")] = 2_000,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: data/models/<dataset>/ranker).")] = None,
    track: TrackToStores = True,
    bentoml_home: BentomlHome = None,
) -> None:
    """Train the TensorFlow ranker on point-in-time training frames from the feature store."""
    from models.ranker import RankerConfig
    from models.ranker.examples import ExampleConfig
    from models.ranker.job import train_ranker
    from pipelines.canonical import DatasetError
    from pipelines.feature_store import FeatureStoreError

    settings = settings_of(ctx)
    try:
        examples = ExampleConfig(n_hard=n_hard, n_random=n_random, max_users=max_users or None)
        result = train_ranker(settings, RankerConfig(**({"epochs": epochs} if epochs else {}), batch_size=batch_size),
                              examples, out=out, track=track, bentoml_home=bentoml_home)
    except (ValueError, DatasetError, FeatureStoreError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    fit = result.training.fit
    typer.echo(f"ranker: {fit.rows:,} rows ({fit.positives:,} positive) on {fit.device}, "
               f"final loss {fit.history['loss'][-1]:.4f}, {result.seconds['ranker_s']}s; saved to {result.path}")
    if result.run_id:
        typer.echo(f"  MLflow run {result.run_id}; BentoML model {result.bento_tag}")


@train_app.command("two-tower")
def train_two_tower_cmd(
    ctx: typer.Context,
    epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Most epochs per loss; early stopping on validation recall (default: TwoTowerConfig's).")] = None,
    loss: Annotated[str, typer.Option(
        help="softmax (in-batch, logQ-corrected), bce (sampled negatives) or auto (train both, keep the better).")
    ] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Batch size on CPU, x4 on a GPU (default: TwoTowerConfig's).")] = None,
    max_rows: Annotated[int, typer.Option(
        min=0, help="Positive rows kept, the latest (0: all of them).")] = 500_000,
    valid_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of the rows, the latest by time, that validates.")] = 0.1,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: data/models/<dataset>/two_tower).")] = None,
    track: TrackToStores = True,
    bentoml_home: BentomlHome = None,
) -> None:
    """Train the two-tower retrieval model on point-in-time frames from the feature store."""
    from models.two_tower.config import TwoTowerConfig
    from models.two_tower.job import TwoTowerJobConfig, train_two_tower_job
    from pipelines.canonical import DatasetError
    from pipelines.feature_store import FeatureStoreError

    settings = settings_of(ctx)
    try:
        config = TwoTowerConfig(loss=loss, epochs=epochs or TwoTowerConfig.epochs,
                                batch_size=batch_size or TwoTowerConfig.batch_size)
        job = TwoTowerJobConfig(max_rows=max_rows or None, valid_fraction=valid_fraction)
        result = train_two_tower_job(settings, config, job, out=out, track=track, bentoml_home=bentoml_home)
    except (ValueError, DatasetError, FeatureStoreError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    trained = result.trained
    scores = ", ".join(f"{k} {v:.4f}" for k, v in trained.metrics.items() if k.startswith(("recall", "auc")))
    typer.echo(f"two-tower: {len(result.train_frame):,} training rows, {len(result.valid_frame):,} validation rows "
               f"(from {result.split_time.isoformat()}) on {trained.device}; kept {trained.loss}: {scores}; "
               f"{result.seconds['two_tower_s']}s; saved to {result.path}")
    if result.run_id:
        typer.echo(f"  MLflow run {result.run_id}; registered {result.registered}; BentoML model {result.bento_tag}")


@index_app.command("build")
def index_build_cmd(
    ctx: typer.Context,
    kind: Annotated[str, typer.Option(help="auto (by catalogue size), flat (exact) or hnsw.")] = "auto",
    exact_max_items: Annotated[Optional[int], typer.Option(
        min=1, help="With --kind auto: exact search up to this many items, HNSW above.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: data/models/<dataset>/index).")] = None,
    track: Annotated[bool, typer.Option("--track/--no-track",
                                        help="Log to MLflow and save to the BentoML model store.")] = True,
    bentoml_home: BentomlHome = None,
) -> None:
    """Build the user -> item (inner product) and item -> item (cosine) indexes from the ALS factors."""
    from dataclasses import replace

    from models.index import IndexConfig
    from models.train import build_index
    from pipelines.canonical import DatasetError

    settings = settings_of(ctx)
    try:
        config = IndexConfig(kind=kind)  # type: ignore[arg-type]
        if exact_max_items is not None:
            config = replace(config, exact_max_items=exact_max_items)
        result = build_index(settings, config, out=out, track=track, bentoml_home=bentoml_home)
    except (ValueError, DatasetError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    for name, report in result.index.report.items():
        typer.echo(f"{name}: {report['kind']} over {report['items']:,} items x {report['dim']}, "
                   f"recall@{report['recall_k']} {report['recall_at_k']:.3f} vs exact, built in {report['build_s']}s")
    typer.echo(f"  saved to {result.path}")
    if result.run_id:
        typer.echo(f"  MLflow run {result.run_id}; registered {result.registered}; BentoML model {result.bento_tag}")


def evaluate_cmd(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A MovieLens folder (or a canonical dataset folder).")],
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")],
    layout: Annotated[str, typer.Option(help="auto, ml-100k, ml-csv or canonical.")] = "auto",
    workspace: Annotated[Optional[Path], typer.Option(
        help="Keep the workspace (data copy, factors, MLflow store) here; default: a temporary one.")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="Tune ALS on the validation split.")] = True,
    mlflow_uri: Annotated[Optional[str], typer.Option(
        help="Log to this MLflow instead of the workspace's own SQLite store.")] = None,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log the run to MLflow.")] = True,
    two_stage: Annotated[bool, typer.Option("--two-stage/--no-two-stage",
                                            help="Also train the ranker and score ALS candidates re-ranked by it.")] = True,
    served: Annotated[Optional[bool], typer.Option(
        "--served/--no-served",
        help="Also score the service's own engine (needs Redis: `recsys stack up`); default: with --two-stage.")] = None,
) -> None:
    """Load -> split -> clean -> tune -> fit -> evaluate under the one protocol; writes a JSON report.

    Runs in its own workspace: it never touches the demo's data, models or MLflow registry (the
    served row borrows an empty Redis database and empties it afterwards).
    """
    from bentos.evaluation import check_redis
    from bentos.evaluation import served as served_engine
    from models.evaluate import run_evaluation
    from models.holdout import EvaluationConfig
    from models.ranker.two_stage import two_stage as ranker_two_stage
    from pipelines.canonical import DatasetError
    from pipelines.feature_store import FeatureStoreError
    from pipelines.loaders import LoaderError

    settings = settings_of(ctx)
    serve = two_stage if served is None else served
    config = EvaluationConfig() if tune else EvaluationConfig(grid=None)
    try:
        if serve and data.exists():  # a missing --data gets the loader's own message first
            check_redis(settings)  # before minutes of work, not after
        report = run_evaluation(data, out, layout=layout, workspace=workspace, config=config,
                                settings=settings, tracking_uri=mlflow_uri, track=track,
                                two_stage=ranker_two_stage if two_stage else None,
                                served=served_engine if serve else None)
    except (ValueError, DatasetError, LoaderError, FileNotFoundError, FeatureStoreError) as exc:
        raise CliError(str(exc)) from exc
    headline = {k: v for k, v in report.items() if k.endswith(("@10", "@20")) and v is not None}
    typer.echo(json.dumps(headline, indent=2))
    typer.echo(f"report: {out}")


def retrain_cmd(
    ctx: typer.Context,
    ranker: Annotated[bool, typer.Option("--ranker/--no-ranker",
                                         help="Retrain the ranker too (else the champion's carries over).")] = True,
    materialize: Annotated[bool, typer.Option(
        "--materialize/--no-materialize",
        help="On promotion, load the new ALS vectors into the online store (needs `recsys features apply`).")] = True,
    bentoml_home: BentomlHome = None,
) -> None:
    """Clean -> ALS -> ranker -> index on the offline log up to now, registered as the challenger;
    promoted to champion only if the gate passes it (exit 0 either way, the reason printed)."""
    from models.retrain import retrain
    from pipelines.canonical import DatasetError
    from pipelines.feature_store import FeatureStoreError

    settings = settings_of(ctx)
    try:
        result = retrain(settings, ranker=ranker, bentoml_home=bentoml_home, materialize=materialize)
    except (ValueError, DatasetError, FeatureStoreError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    d = result.decision
    typer.echo(f"challenger {result.challenger.tags} (MLflow run {result.run_id}, cutoff {result.cutoff.isoformat()})")
    champion = "none" if d.champion is None else f"{d.champion:.4f}"
    typer.echo(f"gate {d.metric}: challenger {d.challenger:.4f}, champion {champion}, tolerance {d.tolerance:g}")
    typer.echo(d.reason)
    typer.echo(f"comparison: {result.comparison_path}")


def register(app: typer.Typer) -> None:
    """Attach `train`, `index`, `evaluate` and `retrain` to the root `recsys` app."""
    app.add_typer(train_app, name="train")
    app.add_typer(index_app, name="index")
    app.command("evaluate")(evaluate_cmd)
    app.command("retrain")(retrain_cmd)
