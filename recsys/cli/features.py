"""`recsys features ...`: the feature store from the command line (wraps the real Feast CLI and SDK)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, parse_time, reference_time_of, settings_of

features_app = typer.Typer(help="Feast: offline features, apply, materialize, render the config.",
                           no_args_is_help=True)


@features_app.command("build")
def build(
    ctx: typer.Context,
    days: Annotated[int, typer.Option(min=1, help="Daily snapshots to (re)compute, ending at the reference time.")] = 30,
) -> None:
    """Spark: canonical events and items -> daily user_profile / item_profile snapshots (idempotent)."""
    from pipelines.batch_features import DayRange, run_batch_features
    from recsys.spark import get_spark

    settings = settings_of(ctx)
    now = reference_time_of(ctx)
    written = run_batch_features(get_spark(settings, "batch-features"), settings, now, DayRange.ending_at(now, days))
    for table, rows in written.items():
        typer.echo(f"{table}: {rows:,} rows")


@features_app.command("apply")
def apply_cmd(ctx: typer.Context) -> None:
    """Create missing offline tables, then `feast apply` with the effective config."""
    from pipelines.feature_store import FeatureStoreError, apply

    try:
        apply(settings_of(ctx))
    except FeatureStoreError as exc:
        raise CliError(str(exc)) from exc
    typer.echo("feast apply: registry up to date")


@features_app.command("materialize")
def materialize_cmd(
    ctx: typer.Context,
    start: Annotated[Optional[str], typer.Option(help="Start (ISO). Default: 30 days before the end.")] = None,
    end: Annotated[Optional[str], typer.Option(help="End (ISO). Default: the reference time.")] = None,
    view: Annotated[Optional[list[str]], typer.Option(help="Only these feature views (repeatable).")] = None,
    incremental: Annotated[bool, typer.Option(help="From each view's last materialization instead of --start.")] = False,
) -> None:
    """Load the latest offline values into the online store (Redis)."""
    from pipelines.feature_store import FeatureStoreError, materialize, materialize_incremental

    settings = settings_of(ctx)
    end_ts = parse_time(end) or reference_time_of(ctx)
    try:
        if incremental:
            materialize_incremental(settings, end_ts, view)
        else:
            materialize(settings, parse_time(start) or end_ts - timedelta(days=30), end_ts, view)
    except FeatureStoreError as exc:
        raise CliError(str(exc)) from exc
    typer.echo(f"materialized up to {end_ts.isoformat()}")


@features_app.command("render")
def render(ctx: typer.Context) -> None:
    """Write the effective feature_store.yaml (endpoints from the environment) for `feast -f FILE`."""
    from pipelines.feature_store import render_feature_store_yaml

    typer.echo(str(render_feature_store_yaml(settings_of(ctx))))


@features_app.command("show")
def show(
    ctx: typer.Context,
    user: Annotated[int, typer.Option(min=0, help="User id.")],
    service: Annotated[str, typer.Option(help="Feature service.")] = "retrieval_v1",
) -> None:
    """Print a user's online features (what serving sees now)."""
    from pipelines.feature_store import FeatureStoreError, check_online_store, get_store

    settings = settings_of(ctx)
    try:
        check_online_store(settings)
    except FeatureStoreError as exc:
        raise CliError(str(exc)) from exc
    store = get_store(settings)
    svc = store.get_feature_service(service)
    refs = [f"{p.name}:{f.name}" for p in svc.feature_view_projections for f in p.features
            if p.name.startswith("user")]
    values = store.get_online_features(features=refs, entity_rows=[{"user_id": user}]).to_dict()
    for name, column in values.items():
        typer.echo(f"{name:<24} {column[0]}")
