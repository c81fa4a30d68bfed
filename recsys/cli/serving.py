"""`recsys serve` and `recsys precompute`: the online path from the command line."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, reference_time_of, settings_of
from recsys.cli.models import BentomlHome


def serve(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port (default: RECSYS_SERVICE_PORT, 3000).")] = 0,
) -> None:
    """Run the BentoML service in the foreground (`bentoml serve bentos.service:Recommender`)."""
    from pipelines.stack import service_command, service_env

    settings = settings_of(ctx)
    # replace this process: signals reach bentoml directly
    os.execve(sys.executable, service_command(settings, port or None), {**os.environ, **service_env(settings)})


def precompute_cmd(
    ctx: typer.Context,
    tier: Annotated[str, typer.Option(help="all: every user active in the window; hot: the most active 10%.")] = "all",
    hours: Annotated[int, typer.Option(min=1, help="Activity window, ending at the reference time.")] = 24,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Threads computing batches at once (default: two per core, at most 8).")] = None,
    ttl: Annotated[int, typer.Option(min=1, help="Seconds an ordinary user's cached answer is kept.")] = 1_800,
    hot_ttl: Annotated[int, typer.Option(min=1, help="Seconds a hot user's cached answer is kept.")] = 7_200,
    bentoml_home: BentomlHome = None,
) -> None:
    """Active users of the last 24 h (offline log and stream) -> the service's answers -> the Redis cache."""
    from bentos.precompute import PrecomputeConfig, active_users, default_workers, precompute, precompute_engine

    if tier not in ("all", "hot"):
        raise CliError(f"--tier {tier!r}: choose all or hot")
    settings = settings_of(ctx)
    now = reference_time_of(ctx)
    config = PrecomputeConfig(window_hours=hours, workers=workers or default_workers(), ttl_s=ttl, hot_ttl_s=hot_ttl)
    from bentos.experiments import ExperimentError

    try:
        engine = precompute_engine(settings, config, bentoml_home)
    except ExperimentError as exc:  # the cache must hold each user's arm: no experiment, no guess
        raise CliError(str(exc)) from exc
    try:
        users = active_users(settings, now, hours)
        stats = precompute(engine, users, config, tier=tier)  # type: ignore[arg-type]
    finally:
        engine.close()
    versions = ", ".join(f"{k} {v}" for k, v in sorted(engine.model_versions.items()))
    typer.echo(f"{stats.active_users:,} users active in the {hours} h before {now.isoformat()}, "
               f"{stats.hot_users:,} hot; models: {versions}")
    reasons = ", ".join(f"{n:,} {why}" for why, n in sorted(stats.reasons.items())) or "none"
    typer.echo(f"cached {stats.written:,} answers ({tier}), skipped {stats.degraded:,} degraded ({reasons}), "
               f"{stats.failed:,} not written; {stats.workers} workers, {stats.seconds:.1f} s, "
               f"{stats.users_per_s:,.1f} users/s")
