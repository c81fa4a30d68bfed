"""The main job on the embedded default: each step a small function, run in order by ``run_demo``.

Local stack -> synthetic canonical data -> dataset registered in MLflow -> offline feature
snapshots, `feast apply`, materialize into Redis -> a slice of the clickstream through Kafka and
the stream consumer -> Spark ALS, embeddings, the FAISS index (and the ranker with ``--ranker``)
in MLflow and the BentoML store -> `bentoml serve` and a few answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from datetime import timedelta

import pyarrow.dataset as pads
import typer

from pipelines.canonical import DatasetError, Manifest, read_manifest, reference_time
from pipelines.events import EventProducer
from pipelines.stack import LocalStack
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

log = logging.getLogger(__name__)

DEMO_REPLAY_EVENTS = 2_000


def step_stack(settings: Settings) -> None:
    rows = LocalStack(settings).up()
    for row in rows:
        typer.echo(f"  {row.name:<7} {row.state:<9} {row.endpoint}")


def step_data(settings: Settings, n_users: int, n_items: int) -> Manifest:
    """Generate the synthetic dataset unless one with the same size is already there."""
    from pipelines.generator import GeneratorConfig, generate

    try:
        manifest = read_manifest(settings.dataset_path)
        if manifest.params.get("n_users") == n_users and manifest.params.get("n_items") == n_items:
            typer.echo(f"  reusing {settings.dataset_path} ({manifest.events:,} events)")
            return manifest
    except DatasetError:
        pass
    manifest = generate(GeneratorConfig(n_users=n_users, n_items=n_items), settings.dataset_path)
    typer.echo(f"  {manifest.events:,} events, {manifest.items:,} items, {manifest.users:,} users, "
               f"{manifest.rejects:,} malformed rows set aside in {settings.dataset_path / 'rejects'}")
    return manifest


def step_replay_tail(settings: Settings, n_events: int = DEMO_REPLAY_EVENTS) -> int:
    """Send the dataset's latest events to the clickstream topic, as the live site would."""
    dataset = pads.dataset(settings.dataset_path / "events", format="parquet")
    now = reference_time(settings.dataset_path, settings.as_of)
    table = dataset.to_table(filter=pads.field(S.COL_TS) <= now)
    table = table.sort_by([(S.COL_TS, "descending")]).slice(0, n_events).sort_by(S.COL_TS)
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic) as producer:
        sent = producer.send_many(table.to_pylist())
    typer.echo(f"  sent the latest {sent:,} events to Kafka topic {settings.events_topic}")
    return sent


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short stable hash of what the dataset is (source, counts, time range, parameters)."""
    payload = json.dumps(asdict(manifest), sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def step_register_dataset(settings: Settings, manifest: Manifest) -> str:
    """Record the dataset in MLflow, so every later training run can point at what it used."""
    import mlflow

    mlflow.set_tracking_uri(settings.effective_mlflow_uri)
    mlflow.set_experiment("datasets")
    with mlflow.start_run(run_name=f"{settings.dataset}-{dataset_fingerprint(manifest)}") as run:
        mlflow.log_params({"source": manifest.source, "fingerprint": dataset_fingerprint(manifest),
                           "min_event_ts": manifest.min_event_ts, "max_event_ts": manifest.max_event_ts})
        mlflow.log_metrics({"events": manifest.events, "items": manifest.items, "users": manifest.users,
                            "rejects": manifest.rejects})
        mlflow.log_dict(asdict(manifest), "manifest.json")
    typer.echo(f"  dataset recorded in MLflow run {run.info.run_id}")
    return run.info.run_id


def step_features(settings: Settings, days: int = 30) -> None:
    """Batch snapshots (Spark) -> `feast apply` -> materialize into Redis -> read one user back."""
    from pipelines import feature_store as fs
    from pipelines.batch_features import DayRange, run_batch_features
    from recsys.spark import get_spark

    now = reference_time(settings.dataset_path, settings.as_of)
    fs.apply(settings)
    written = run_batch_features(get_spark(settings, "batch-features"), settings, now, DayRange.ending_at(now, days))
    typer.echo("  offline snapshots: " + ", ".join(f"{t} {n:,} rows" for t, n in written.items()))
    fs.materialize(settings, now - timedelta(days=days), now)
    store = fs.get_store(settings)
    user = int(pads.dataset(settings.dataset_path / "events").to_table(columns=[S.COL_USER]).column(0)[0].as_py())
    row = store.get_online_features(
        features=["user_profile:n_events", "user_profile:n_events_7d", "user_profile:top_categories"],
        entity_rows=[{S.COL_USER: user}]).to_dict()
    typer.echo(f"  materialized into Redis; user {user} online: "
               + ", ".join(f"{k}={v[0]}" for k, v in row.items() if k != S.COL_USER))


def step_stream(settings: Settings) -> None:
    """The stream consumer folds the replayed clickstream into real-time user features (until it
    has caught up); show how the busiest user's features changed, and what is trending."""
    import redis

    from pipelines import feature_store as fs
    from pipelines.events import select_events
    from pipelines.realtime_rules import FEATURES
    from pipelines.stream import StreamOptions, StreamProcessor
    from pipelines.trending import read_trending

    now = reference_time(settings.dataset_path, settings.as_of)
    tail = select_events(settings.dataset_path, end=now, limit=DEMO_REPLAY_EVENTS).column(S.COL_USER).to_pandas()
    user = int(tail.value_counts().index[0])
    store = fs.get_store(settings)

    def features() -> dict:
        row = store.get_online_features(features=[f"user_realtime:{f}" for f in FEATURES],
                                        entity_rows=[{S.COL_USER: user}]).to_dict()
        return {f: row[f][0] for f in FEATURES}

    before = features()
    stats = StreamProcessor(settings, StreamOptions.from_settings(settings, stop_when_caught_up=True)).run()
    after = features()
    typer.echo(f"  stream (recsys stream run): {stats.events:,} events, {stats.applied:,} applied, "
               f"{stats.duplicates:,} already applied before, {stats.dead_letters:,} dead letters")
    typer.echo(f"  user {user}, real-time features before -> after:")
    for name in FEATURES:
        typer.echo(f"    {name:<22} {before[name]!s:<36} -> {after[name]}")
    if before == after:
        typer.echo("  (unchanged: an earlier run applied these events; updates are idempotent by event_id)")
    top = read_trending(redis.Redis.from_url(settings.effective_redis_url), k=5)
    typer.echo("  trending: " + (", ".join(f"item {i} ({n:.0f})" for i, n in top) or "nothing in the window"))


def step_train(settings: Settings, ranker: bool = False) -> None:
    """Spark ALS on the cleaned events -> embeddings offline and online -> FAISS index -> MLflow
    and the BentoML model store (what the service loads)."""
    from models.train import build_index, train_als
    from pipelines import feature_store as fs

    als = train_als(settings)
    typer.echo(f"  ALS: {len(als.factors.user_ids):,} users x {len(als.factors.item_ids):,} items, "
               f"rank {als.factors.rank}, MLflow run {als.run_id}")
    now = reference_time(settings.dataset_path, settings.as_of)
    fs.materialize(settings, now - timedelta(days=365), now, views=[T.USER_EMBEDDING, T.ITEM_EMBEDDING])
    index = build_index(settings)
    typer.echo(f"  FAISS index saved to the BentoML store as {index.bento_tag}")
    if ranker:
        typer.echo(f"  ranker: {_ranker_step(settings)}")
    else:
        typer.echo("  ranker: skipped (add --ranker, or run `recsys train ranker`): the service blends the "
                   "strategies' scores without it")


def _ranker_step(settings: Settings) -> str:
    """The TensorFlow ranker on point-in-time frames from Feast, to MLflow and the BentoML store;
    returns a one-line summary."""
    from models.ranker import RankerConfig
    from models.ranker.job import train_ranker

    # one fit, no cross-validation: the demo shows the pipeline, the evaluation measures it
    result = train_ranker(settings, RankerConfig(epochs=2, cv_folds=1), progress=False)
    return (f"{result.training.fit.rows:,} rows on {result.training.fit.device}, MLflow run {result.run_id}, "
            f"BentoML model {result.bento_tag}")


def step_serve(settings: Settings) -> None:
    """(Re)start `bentoml serve` with the models just trained, and answer a few requests."""
    import urllib.request

    stack = LocalStack(settings)
    stack.down(["service"])  # pick up the new models
    stack.up(["service"])
    base = f"http://127.0.0.1:{settings.service_port}"

    def post(path: str, body: dict, key: str | None = None) -> dict:
        headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    events = pads.dataset(settings.dataset_path / "events").to_table(columns=[S.COL_USER]).column(0).to_pandas()
    user = int(events.value_counts().index[len(events.value_counts()) // 2])  # an ordinary active user
    samples = [
        ("/recommend", {"user_id": user, "k": 5, "context": {"device": "mobile"}}),
        ("/recommend", {"user_id": 10_000_000, "k": 5, "context": {"categories": [3, 7]}}),
        ("/similar_items", {"item_id": 1, "k": 5}),
    ]
    for path, body in samples:
        reply = post(path, body)
        items = ", ".join(f"{i['item_id']} ({i['strategy']}, {i['score']:.2f})" for i in reply["items"])
        flags = f" cold_start={reply['cold_start']} degraded={reply['degraded']}" if "cold_start" in reply else ""
        typer.echo(f"  POST {path} {json.dumps(body)}\n    ->{flags} items: {items}")
    reply = post("/events", {"user_id": user, "item_id": 1, "event_type": "VIEW"},
                 key=settings.api_key.get_secret_value())
    typer.echo(f"  POST /events (with X-API-Key) -> {reply['status']}, event_id {reply['event_id']}")


def run_demo(settings: Settings, n_users: int = 10_000, n_items: int = 5_000, ranker: bool = False) -> None:
    steps = 7
    typer.secho(f"[1/{steps}] local stack", bold=True)
    step_stack(settings)
    typer.secho(f"[2/{steps}] synthetic data", bold=True)
    manifest = step_data(settings, n_users, n_items)
    typer.echo(f"  reference time (the platform's now): {reference_time(settings.dataset_path, settings.as_of)}")
    typer.secho(f"[3/{steps}] dataset into MLflow", bold=True)
    step_register_dataset(settings, manifest)
    typer.secho(f"[4/{steps}] features: Spark snapshots, feast apply, materialize to Redis", bold=True)
    step_features(settings)
    typer.secho(f"[5/{steps}] clickstream: Kafka -> stream consumer -> real-time features", bold=True)
    step_replay_tail(settings)
    step_stream(settings)
    typer.secho(f"[6/{steps}] training: Spark ALS, FAISS index, MLflow, BentoML model store", bold=True)
    step_train(settings, ranker)
    typer.secho(f"[7/{steps}] serving: bentoml serve on port {settings.service_port}, sample requests", bold=True)
    step_serve(settings)
    typer.secho("\nDone. Where to look next:", bold=True, fg=typer.colors.GREEN)
    typer.echo(f"  service:   http://127.0.0.1:{settings.service_port}  (POST /recommend, /similar_items; "
               "GET /metrics, /readyz)")
    typer.echo(f"  data:      {settings.dataset_path}  (recsys data info)")
    typer.echo("  features:  cd feature_repo && ../.venv/bin/feast feature-views list")
    typer.echo("             recsys features show --user 1;  notebooks/training_frame.ipynb")
    typer.echo(f"  MLflow UI: {settings.effective_mlflow_uri}")
    typer.echo(f"  services:  recsys stack status   (logs in {settings.run_path})")
    typer.echo("The stack and the service keep running. Stop them with: make down   "
               "(or: .venv/bin/recsys stack down)")
