"""`recsys events ...`, `recsys stream ...` and `recsys trending`: the clickstream from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, parse_time, reference_time_of, settings_of

events_app = typer.Typer(help="Produce clickstream events into Kafka.", no_args_is_help=True)
stream_app = typer.Typer(help="The clickstream consumer and the backfill of real-time features.",
                         no_args_is_help=True)


@events_app.command("replay")
def replay(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option(min=0, help="Events per second; 0 = as fast as possible.")] = 0,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the latest N events (default: all).")] = None,
    start: Annotated[Optional[str], typer.Option(help="Only events at or after this time (ISO).")] = None,
    end: Annotated[Optional[str], typer.Option(help="Only events up to this time (ISO). Default: the reference time.")] = None,
) -> None:
    """Replay the active dataset's events (synthetic or MovieLens) into the topic, oldest first, keyed by user."""
    from tqdm.auto import tqdm

    from pipelines.events import EventProducer, select_events
    from pipelines.live_log import REPLAY_HEADERS

    settings = settings_of(ctx)
    table = select_events(settings.dataset_path, parse_time(start, "--start"),
                          parse_time(end, "--end") or reference_time_of(ctx), limit)
    # the events are in the offline log already: the stream folds them but does not log them again
    with EventProducer(settings.effective_kafka_bootstrap, settings.events_topic, headers=REPLAY_HEADERS) as producer, \
            tqdm(total=table.num_rows, unit="ev", desc="replay") as bar:
        sent = 0
        for chunk in table.to_batches(max_chunksize=10_000):
            sent += producer.send_many(chunk.to_pylist(), rate=rate or None, progress=bar.update)
    typer.echo(f"sent {sent:,} events to {settings.events_topic} at {settings.effective_kafka_bootstrap}")


@stream_app.command("run")
def run(
    ctx: typer.Context,
    group_id: Annotated[Optional[str], typer.Option(help="Consumer group (default: stream_group_id).")] = None,
    batch_events: Annotated[Optional[int], typer.Option(min=1, help="Most events per micro-batch.")] = None,
    batch_ms: Annotated[Optional[int], typer.Option(min=1, help="Longest wait for a micro-batch (ms).")] = None,
    offline_flush_s: Annotated[Optional[float], typer.Option(min=0.01, help="Offline append at least this often (s).")] = None,
    offline_batch_rows: Annotated[Optional[int], typer.Option(min=1, help="Offline append once this many rows wait.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Serve Prometheus /metrics on this port.")] = None,
    stop_when_caught_up: Annotated[bool, typer.Option(help="Exit once every partition is read to its end.")] = False,
) -> None:
    """Consume the clickstream into real-time user features (Feast online + offline), trending and
    cache invalidation. SIGTERM or Ctrl-C: finish the batch, flush, commit, exit."""
    from pipelines.feature_store import FeatureStoreError
    from pipelines.stream import StreamOptions, StreamProcessor

    settings = settings_of(ctx)
    options = StreamOptions.from_settings(
        settings, group_id=group_id, batch_events=batch_events, batch_ms=batch_ms, offline_flush_s=offline_flush_s,
        offline_batch_rows=offline_batch_rows, metrics_port=metrics_port, stop_when_caught_up=stop_when_caught_up or None)
    processor = StreamProcessor(settings, options)
    processor.install_signal_handlers()
    try:
        stats = processor.run()
    except (FeatureStoreError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    summary = {k: v for k, v in asdict(stats).items() if k != "freshness_ms"}
    typer.echo(json.dumps(summary))


@stream_app.command("backfill")
def backfill(
    ctx: typer.Context,
    end: Annotated[Optional[str], typer.Option(help="Fold events up to this time (ISO). Default: the reference time.")] = None,
    seed_state: Annotated[bool, typer.Option(
        help="Also write each user's final state to Redis and online, so the stream continues from it "
             "(stop the stream first).")] = False,
) -> None:
    """Spark: user_realtime history from the offline events, with the stream's rules (idempotent)."""
    from pipelines.backfill import run_backfill
    from recsys.spark import get_spark

    settings = settings_of(ctx)
    cutoff = parse_time(end, "--end") or reference_time_of(ctx)
    result = run_backfill(get_spark(settings, "realtime-backfill"), settings, cutoff, seed_state=seed_state)
    typer.echo(f"user_realtime backfill up to {cutoff.isoformat()}: {result.rows:,} rows for {result.users:,} users"
               + (f", {result.seeded:,} states seeded" if seed_state else ""))


def trending_cmd(
    ctx: typer.Context,
    top: Annotated[int, typer.Option(min=0, help="Print the top N global items after the refresh.")] = 10,
) -> None:
    """Spark: recount views and clicks in the window ending at the reference time; publish to Redis."""
    import redis

    from pipelines.trending import read_trending, refresh_trending
    from recsys.spark import get_spark

    settings = settings_of(ctx)
    now = reference_time_of(ctx)
    result = refresh_trending(settings, get_spark(settings, "trending"), now)
    typer.echo(f"trending up to {now.isoformat()}: {result.events:,} views and clicks on {result.items:,} items "
               f"in {result.categories} categories")
    client = redis.Redis.from_url(settings.effective_redis_url)
    for rank, (item, score) in enumerate(read_trending(client, k=top), start=1):
        typer.echo(f"  {rank:>3}. item {item:<10} {score:,.0f}")


@stream_app.command("impressions")
def impressions(
    ctx: typer.Context,
    group_id: Annotated[Optional[str], typer.Option(help="Consumer group (default: impressions_group_id).")] = None,
    batch_rows: Annotated[Optional[int], typer.Option(min=1, help="Write once this many impressions wait.")] = None,
    flush_s: Annotated[Optional[float], typer.Option(min=0.01, help="Write at least this often (s).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Prometheus /metrics port.")] = None,
    stop_when_caught_up: Annotated[bool, typer.Option(help="Exit once every partition is read to its end.")] = False,
) -> None:
    """Sink recommendations.served (what /recommend answered) into the dataset's offline
    impressions table, in batches, committing after each write. SIGTERM or Ctrl-C: write, commit, exit."""
    from pipelines.impression_sink import run_impression_sink

    settings = settings_of(ctx)
    stats = run_impression_sink(settings, group_id=group_id, batch_rows=batch_rows, flush_s=flush_s,
                                metrics_port=metrics_port, stop_when_caught_up=stop_when_caught_up or None)
    typer.echo(json.dumps(asdict(stats)))
