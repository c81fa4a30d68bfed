"""The main job on the embedded default: each step a small function, run in order by ``run_demo``.

Local stack -> synthetic canonical data -> dataset registered in MLflow -> offline feature
snapshots, `feast apply`, materialize into Redis -> a slice of the clickstream through Kafka and
the stream consumer -> Spark ALS, embeddings, the FAISS index and the TensorFlow ranker (unless
``--no-ranker``) in MLflow and the BentoML store -> `bentoml serve` and a few answers, with the
model versions that computed them -> simulated users clicking and buying by the generator's
ground truth (`recsys simulate`), with the CTR. Every step prints its elapsed seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.dataset as pads
import typer

from pipelines.canonical import DatasetError, Manifest, read_manifest, reference_time
from pipelines.events import EventProducer
from pipelines.stack import LocalStack
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings

if TYPE_CHECKING:
    from models.ranker.job import RankerTrainResult

log = logging.getLogger(__name__)

DEMO_REPLAY_EVENTS = 2_000
#: The closing simulation: a bounded number of requests at a steady rate, a few seconds' run.
DEMO_SIM_REQUESTS, DEMO_SIM_RATE = 300, 20.0
#: One fit where ``recsys train ranker`` fits 5 folds (which bag the fold models and pick the ALS
#: blend on held-out label users): the folds are most of the ranker's fit time, and the demo has
#: a time budget on 2 cores. The data (label users, examples) and the epochs are the defaults.
DEMO_CV_FOLDS = 1
#: The experiment the demo's service runs (relative to home): its simulation reports the CTR per arm.
DEMO_EXPERIMENT = Path("deploy/experiments/demo.yaml")


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
    from pipelines.live_log import REPLAY_HEADERS  # already in the offline log: the stream does not log them again

    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic, headers=REPLAY_HEADERS) as producer:
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


def stream_totals(settings: Settings) -> dict[str, float]:
    """The managed stream workers' events so far, by outcome (applied, duplicate, late,
    dead_letter), summed over the workers' metrics ports; a worker that does not answer adds none."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for i in range(settings.stream_workers):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.stream_port + i}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "recsys_stream_events_total":
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


def wait_for_stream(settings: Settings, before: dict[str, float], n_events: int,
                    timeout_s: float = 600.0) -> dict[str, int]:
    """Wait until the managed workers have handled ``n_events`` more events than ``before`` (every
    outcome counts); returns the new events by outcome."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = stream_totals(settings)
        delta = {k: int(v - before.get(k, 0.0)) for k, v in now.items()}
        if sum(delta.values()) >= n_events:
            return delta
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stream handled {sum(delta.values()):,} of {n_events:,} events in "
                               f"{timeout_s:.0f} s: see {settings.run_path / 'stream-0.log'}")
        time.sleep(0.2)


def step_stream(settings: Settings) -> None:
    """Start the stream consumer as a service of the stack (it keeps running after the demo), send
    the latest events to Kafka, wait until the workers have handled them; show how the busiest
    user's real-time features changed, and what is trending."""
    import redis

    from pipelines import feature_store as fs
    from pipelines.events import select_events
    from pipelines.realtime_rules import FEATURES
    from pipelines.stack import STREAM
    from pipelines.trending import read_trending
    from recsys.cli.stack import platform_stack

    now = reference_time(settings.dataset_path, settings.as_of)
    tail = select_events(settings.dataset_path, end=now, limit=DEMO_REPLAY_EVENTS).column(S.COL_USER).to_pandas()
    user = int(tail.value_counts().index[0])
    store = fs.get_store(settings)

    def features() -> dict:
        row = store.get_online_features(features=[f"user_realtime:{f}" for f in FEATURES],
                                        entity_rows=[{S.COL_USER: user}]).to_dict()
        return {f: row[f][0] for f in FEATURES}

    before = features()
    stack = platform_stack(settings)
    stack.down([STREAM])  # a worker of an earlier run may hold an older dataset or registry
    for row in stack.up([STREAM]):
        typer.echo(f"  {row.name} started (pid {row.pid}), metrics {row.endpoint}, log {row.log_path}")
    counted = stream_totals(settings)
    sent = step_replay_tail(settings)
    done = wait_for_stream(settings, counted, sent)
    after = features()
    typer.echo(f"  stream ({settings.stream_workers} managed worker(s)): {sent:,} events, {done.get('applied', 0):,} "
               f"applied, {done.get('duplicate', 0):,} already applied before, {done.get('dead_letter', 0):,} "
               "dead letters")
    typer.echo(f"  user {user}, real-time features before -> after:")
    for name in FEATURES:
        typer.echo(f"    {name:<22} {before[name]!s:<36} -> {after[name]}")
    if before == after:
        typer.echo("  (unchanged: an earlier run applied these events; updates are idempotent by event_id)")
    top = read_trending(redis.Redis.from_url(settings.effective_redis_url), k=5)
    typer.echo("  trending: " + (", ".join(f"item {i} ({n:.0f})" for i, n in top) or "nothing in the window"))


def step_train(settings: Settings, ranker: bool = True) -> None:
    """Spark ALS on the cleaned events -> embeddings offline and online -> FAISS index -> the
    TensorFlow ranker (unless ``ranker`` is False) -> MLflow and the BentoML model store (what the
    service loads)."""
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
        typer.echo("  ranker: point-in-time frames from Feast, TensorFlow fit (as `recsys train ranker`) ...")
        typer.echo(f"  ranker: {ranker_summary(train_demo_ranker(settings))}")
    else:
        typer.echo("  ranker: skipped (--no-ranker): the service serves the ranker already in the BentoML store if "
                   "there is one (`recsys train ranker`), else it blends the strategies' scores")


def train_demo_ranker(settings: Settings) -> RankerTrainResult:
    """The TensorFlow ranker as ``recsys train ranker`` trains it (the same label users, examples
    and epochs), with one fit instead of its cross-validated folds (:data:`DEMO_CV_FOLDS`), to
    MLflow and the BentoML store. The summary line says what was used, in numbers."""
    from models.ranker import RankerConfig
    from models.ranker.job import train_ranker

    return train_ranker(settings, RankerConfig(cv_folds=DEMO_CV_FOLDS), progress=False)


def ranker_summary(result: RankerTrainResult) -> str:
    """One line: rows, label users, device, the configuration used (numbers), MLflow run, BentoML tag."""
    from models.ranker.job import describe_configuration

    fit = result.training.fit
    return (f"{fit.rows:,} rows ({fit.positives:,} positive) on {fit.device} in {result.seconds['ranker_s']:.0f} s; "
            f"{describe_configuration(result)}; MLflow run {result.run_id}, BentoML model {result.bento_tag}")


def step_serve(settings: Settings) -> None:
    """(Re)start `bentoml serve` with the models just trained, and answer a few requests with the
    model versions that computed them."""
    import urllib.request

    import redis

    stack = LocalStack(settings)
    stack.down(["service"])  # pick up the new models
    stack.up(["service"])
    if settings.experiment_file is not None:
        from bentos.experiments import experiment_of

        declared = experiment_of(settings)
        arms = ", ".join(f"{a.name} {a.share:.0%} ({a.mode})" for a in declared.arms) if declared else "none"
        typer.echo(f"  experiment {declared.name if declared else '?'} ({settings.experiment_file}): {arms}; "
                   "a plain `recsys stack up` restarts the service without it unless RECSYS_EXPERIMENT_FILE names it")
    base = f"http://127.0.0.1:{settings.service_port}"

    def post(path: str, body: dict, key: str | None = None) -> dict:
        headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    events = pads.dataset(settings.dataset_path / "events").to_table(columns=[S.COL_USER]).column(0).to_pandas()
    user = sample_user(settings, [int(u) for u in events.value_counts().index])
    samples: list[tuple[str, dict]] = [
        ("/recommend", {"user_id": user, "k": 5, "context": {"device": "mobile"}}),
        ("/recommend", {"user_id": 10_000_000, "k": 5, "context": {"categories": [3, 7]}}),
        ("/similar_items", {"item_id": 1, "k": 5}),
    ]
    # an answer cached by an earlier run carries that run's model versions: drop it, so the first
    # answer is computed by the models just loaded
    redis.Redis.from_url(settings.effective_redis_url).delete(S.recs_cache_key(user))
    served: dict[str, str] = {}
    for path, body in samples:
        reply = post(path, body)
        items = ", ".join(f"{i['item_id']} ({i['strategy']}, {i['score']:.2f})" for i in reply["items"])
        flags = f" cold_start={reply['cold_start']} degraded={reply['degraded']}" if "cold_start" in reply else ""
        typer.echo(f"  POST {path} {json.dumps(body)}\n    ->{flags} items: {items}")
        if reply.get("degraded_reasons"):
            typer.echo(f"    degraded because: {', '.join(reply['degraded_reasons'])}")
        if "model_versions" in reply:
            typer.echo(f"    model_versions: {json.dumps(reply['model_versions'], sort_keys=True)}")
            served = served if "ranker" in served else reply["model_versions"]
    ranker = served.get("ranker", "absent")
    typer.echo(f"  the ranker scoring these answers: {ranker}" if ranker != "absent" else
               "  no ranker served: the answers blend the strategies' scores (run `recsys train ranker`, or the "
               "demo without --no-ranker)")
    reply = post("/events", {"user_id": user, "item_id": 1, "event_type": "VIEW"},
                 key=settings.api_key.get_secret_value())
    typer.echo(f"  POST /events (with X-API-Key) -> {reply['status']}, event_id {reply['event_id']}")


def sample_user(settings: Settings, by_activity: list[int]) -> int:
    """An ordinary active user (the median of ``by_activity``, most active first) whose answers the
    ranker scores: in an experiment, the first from the median on in an arm of mode ``ranker``."""
    from bentos.experiments import experiment_of

    experiment = experiment_of(settings)
    middle = by_activity[len(by_activity) // 2:] + by_activity[:len(by_activity) // 2]
    if experiment is None:
        return middle[0]
    return next((u for u in middle if experiment.assign(u).mode == "ranker"), middle[0])


def step_simulate(settings: Settings, requests: int = DEMO_SIM_REQUESTS) -> dict:
    """A short `recsys simulate`: the dataset's users ask, click and buy by their ground-truth
    preferences, the events go back through /events; prints the CTR (per arm when answers carry one)."""
    from recsys.cli.simulate import run_simulation

    return run_simulation(settings, requests=requests, rate=DEMO_SIM_RATE, progress=False)


@contextmanager
def timed_step(number: int, total: int, title: str, seconds: dict[str, float]) -> Iterator[None]:
    """Print the step's header, run it, print and record (in ``seconds``) its elapsed seconds."""
    typer.secho(f"[{number}/{total}] {title}", bold=True)
    started = time.perf_counter()
    yield
    seconds[f"{number}. {title.split(':')[0]}"] = elapsed = time.perf_counter() - started
    typer.echo(f"  ({elapsed:.1f} s)")


def serving_settings(settings: Settings, experiment: bool) -> Settings:
    """The settings the demo's service runs with: the experiment the settings already name, else
    the demo's own (:data:`DEMO_EXPERIMENT`) unless ``experiment`` is False."""
    if settings.experiment_file is not None or not experiment:
        return settings
    return settings.with_overrides(experiment_file=DEMO_EXPERIMENT)


def run_demo(settings: Settings, n_users: int = 10_000, n_items: int = 5_000, ranker: bool = True,
             experiment: bool = True) -> dict[str, float]:
    """Run the demo's steps in order; returns the elapsed seconds of each step."""
    steps, seconds = 8, dict[str, float]()
    serving = serving_settings(settings, experiment)
    started = time.perf_counter()
    with timed_step(1, steps, "local stack", seconds):
        step_stack(settings)
    with timed_step(2, steps, "synthetic data", seconds):
        manifest = step_data(settings, n_users, n_items)
        typer.echo(f"  reference time (the platform's now): {reference_time(settings.dataset_path, settings.as_of)}")
    with timed_step(3, steps, "dataset into MLflow", seconds):
        step_register_dataset(settings, manifest)
    with timed_step(4, steps, "features: Spark snapshots, feast apply, materialize to Redis", seconds):
        step_features(settings)
    with timed_step(5, steps, "clickstream: Kafka -> stream consumer -> real-time features", seconds):
        step_stream(settings)  # starts the managed consumer, then replays the tail
    training = "Spark ALS, FAISS index" + (", TensorFlow ranker" if ranker else "") + ", MLflow, BentoML model store"
    with timed_step(6, steps, f"training: {training}", seconds):
        step_train(settings, ranker)
    with timed_step(7, steps, f"serving: bentoml serve on port {settings.service_port}, sample requests", seconds):
        step_serve(serving)
    with timed_step(8, steps, f"simulated users: {DEMO_SIM_REQUESTS} requests, clicks and purchases -> /events", seconds):
        step_simulate(serving)
    total = time.perf_counter() - started
    typer.secho(f"\nDone in {total / 60:.1f} min: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()),
                bold=True, fg=typer.colors.GREEN)
    typer.secho("Where to look next:", bold=True, fg=typer.colors.GREEN)
    typer.echo(f"  service:   http://127.0.0.1:{settings.service_port}  (POST /recommend, /similar_items; "
               "GET /metrics, /readyz)")
    typer.echo(f"  data:      {settings.dataset_path}  (recsys data info)")
    typer.echo("  features:  cd feature_repo && ../.venv/bin/feast feature-views list")
    typer.echo("             recsys features show --user 1;  notebooks/training_frame.ipynb")
    typer.echo(f"  MLflow UI: {settings.effective_mlflow_uri}")
    typer.echo(f"  services:  recsys stack status   (logs in {settings.run_path})")
    typer.echo("The stack and the service keep running. Stop them with: make down   "
               "(or: .venv/bin/recsys stack down)")
    return seconds
