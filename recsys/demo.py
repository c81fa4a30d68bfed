"""The main job on the embedded default: each step a small function, run in order by ``run_demo``.

Today: local stack -> synthetic canonical data -> dataset registered in MLflow -> offline feature
snapshots, `feast apply`, materialize into Redis -> a slice of the clickstream into Kafka.
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


def run_demo(settings: Settings, n_users: int = 10_000, n_items: int = 5_000) -> None:
    steps = 5
    typer.secho(f"[1/{steps}] local stack", bold=True)
    step_stack(settings)
    typer.secho(f"[2/{steps}] synthetic data", bold=True)
    manifest = step_data(settings, n_users, n_items)
    typer.echo(f"  reference time (the platform's now): {reference_time(settings.dataset_path, settings.as_of)}")
    typer.secho(f"[3/{steps}] dataset into MLflow", bold=True)
    step_register_dataset(settings, manifest)
    typer.secho(f"[4/{steps}] features: Spark snapshots, feast apply, materialize to Redis", bold=True)
    step_features(settings)
    typer.secho(f"[5/{steps}] clickstream into Kafka", bold=True)
    step_replay_tail(settings)
    typer.secho("\nDone. Where to look next:", bold=True, fg=typer.colors.GREEN)
    typer.echo(f"  data:      {settings.dataset_path}  (recsys data info)")
    typer.echo("  features:  cd feature_repo && ../.venv/bin/feast feature-views list")
    typer.echo("             recsys features show --user 1;  notebooks/training_frame.ipynb")
    typer.echo(f"  MLflow UI: {settings.effective_mlflow_uri}")
    typer.echo(f"  services:  recsys stack status   (logs in {settings.run_path})")
    typer.echo("The stack keeps running. Stop it with: make down   (or: .venv/bin/recsys stack down)")
