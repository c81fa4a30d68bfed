"""Pieces every `recsys` sub-command module shares: errors, settings, time parsing."""

from __future__ import annotations

from datetime import datetime, timezone

import typer

from recsys.config import Settings


class CliError(typer.Exit):
    """Print a one-line error to stderr and exit non-zero."""

    def __init__(self, message: str, code: int = 2) -> None:
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
        super().__init__(code)


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings the root callback built from flags, environment and YAML."""
    return ctx.ensure_object(dict)["settings"]


def parse_time(value: str | None, flag: str = "--as-of") -> datetime | None:
    """An ISO time as UTC (a naive time is read as UTC); a clear error otherwise."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CliError(f"{flag} {value!r} is not an ISO time: use e.g. 1998-04-22T23:10:38Z") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def reference_time_of(ctx: typer.Context) -> datetime:
    """The platform's "now" for the active dataset (``--as-of`` or its latest event), or a CLI error."""
    from pipelines.canonical import DatasetError, reference_time

    settings = settings_of(ctx)
    try:
        return reference_time(settings.dataset_path, settings.as_of)
    except DatasetError as exc:
        raise CliError(str(exc)) from exc
