"""`recsys serve` and `recsys precompute`: the online path from the command line."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from recsys.cli.common import CliError, reference_time_of, settings_of

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
) -> None:
    """Active users of the last 24 h -> recommendations -> the Redis cache (hot users kept longer)."""
    from bentos.factory import build_engine
    from bentos.precompute import PrecomputeConfig, active_users, precompute
    from models.retrieval import index_path

    if tier not in ("all", "hot"):
        raise CliError(f"--tier {tier!r}: choose all or hot")
    settings = settings_of(ctx)
    now = reference_time_of(ctx)
    engine = build_engine(settings, index_path(settings))
    try:
        users = active_users(settings, now, hours)
        stats = precompute(engine, users, PrecomputeConfig(window_hours=hours), tier=tier)  # type: ignore[arg-type]
    finally:
        engine.close()
    typer.echo(f"{stats.active_users:,} active users, {stats.hot_users:,} hot; cached {stats.written:,}, "
               f"skipped {stats.degraded:,} degraded answers")
