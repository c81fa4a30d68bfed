"""`recsys stack ...`: start, stop and inspect the local services, and what the stream needs before
the stack starts it (:func:`stream_missing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from recsys.cli.common import CliError, settings_of
from recsys.config import Settings

if TYPE_CHECKING:
    from pipelines.stack import LocalStack, ServiceStatus

stack_app = typer.Typer(help="Start, stop and inspect the local services (Redis, Kafka, MLflow, the stream "
                             "consumer, the service).", no_args_is_help=True)

OnlyOption = Annotated[Optional[list[str]], typer.Option(
    "--only", help="Limit to these services (repeatable): redis, kafka, mlflow, service, stream (every "
                   "worker) or stream-N.")]


def stream_missing(settings: Settings) -> list[str]:
    """What the stream consumer needs and does not find: the dataset (its items are the catalogue
    it validates against) and the Feast registry with its views (``feast apply``, which also
    creates the offline tables it appends to). Empty when it can start."""
    from pipelines.canonical import DatasetError, read_manifest
    from pipelines.feature_store import registry_path

    missing = []
    try:
        read_manifest(settings.dataset_path)
        if not (settings.dataset_path / "items").is_dir():
            missing.append(f"the dataset's items table at {settings.dataset_path / 'items'}")
    except DatasetError:
        missing.append(f"the dataset at {settings.dataset_path} (`recsys data generate`, or `make demo`)")
    if not registry_path(settings).is_file():
        missing.append(f"the Feast registry at {registry_path(settings)} (`recsys features apply`, or `make demo`)")
    return missing


def platform_stack(settings: Settings) -> LocalStack:
    """The stack with every requirement known: ``up`` also starts the stream once it can run."""
    from pipelines.stack import STREAM, LocalStack

    return LocalStack(settings, requires={STREAM: stream_missing})


def print_status(rows: list[ServiceStatus]) -> None:
    for row in rows:
        pid = f"pid {row.pid}" if row.pid else ""
        health = "healthy" if row.healthy else "unhealthy"
        line = f"{row.name:<9} {row.state:<9} {health:<10} {row.endpoint:<34} {pid:<10} {row.detail}"
        typer.echo(line.rstrip())


@stack_app.command("up")
def stack_up(
    ctx: typer.Context,
    only: OnlyOption = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, max=64,
        help="Stream consumers in the group, each its own process (default: stream_workers, "
             "RECSYS_STREAM_WORKERS).")] = None,
) -> None:
    """Start the local services that are not running yet (idempotent); the stream consumer too once
    the dataset and the Feast registry exist (else it says what is missing)."""
    from pipelines.stack import StackError

    settings = settings_of(ctx)
    if workers is not None:
        settings = settings.with_overrides(stream_workers=workers)
    try:
        rows = platform_stack(settings).up(only)
    except StackError as exc:
        raise CliError(str(exc)) from exc
    print_status(rows)


@stack_app.command("down")
def stack_down(ctx: typer.Context, only: OnlyOption = None) -> None:
    """Stop the services that `stack up` started (never external ones): the stream workers first
    (SIGTERM: each flushes and commits), then the service, MLflow, Kafka and Redis."""
    from pipelines.stack import StackError

    try:
        stopped = platform_stack(settings_of(ctx)).down(only)
    except StackError as exc:
        raise CliError(str(exc)) from exc
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status(ctx: typer.Context, only: OnlyOption = None) -> None:
    """Show each service: running, stopped, stale or external, whether it is healthy, and the
    stream group's lag (events after its committed offsets)."""
    from pipelines.stack import StackError

    try:
        rows = platform_stack(settings_of(ctx)).status(only)
    except StackError as exc:
        raise CliError(str(exc)) from exc
    print_status(rows)
    if any(r.state in {"running", "external"} and not r.healthy for r in rows):
        raise typer.Exit(1)
