"""`recsys schedule`: the recurring jobs of :mod:`recsys.cli.jobs` listed, run once, run on their
schedule (APScheduler, in the foreground until Ctrl-C) or printed as crontab lines."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Optional

import typer

from recsys.cli.common import CliError, settings_of
from recsys.cli.jobs import JOBS, Job, JobRunner, build_scheduler, crontab_lines, find_job, missing_reason

schedule_app = typer.Typer(help="The recurring jobs (retrain, materialize, trending, precompute, hot tier).",
                           no_args_is_help=True)
log = logging.getLogger(__name__)


def _root(ctx: typer.Context) -> Any:
    return ctx.find_root().command


def _format_period(job: Job) -> str:
    seconds = int(job.period().total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def list_lines(root: Any) -> list[str]:
    """One line per job: name, cron (UTC), period, command, and whether it exists in this version."""
    lines = []
    for job in JOBS:
        reason = missing_reason(job, root)
        state = "ok" if reason is None else f"MISSING: {reason}"
        lines.append(f"{job.name:<12} {job.cron:<13} every {_format_period(job):<7} {job.command_line:<46} {state}")
    return lines


@schedule_app.command("run")
def run_cmd(
    ctx: typer.Context,
    once: Annotated[Optional[str], typer.Option("--once", metavar="JOB", help="Run this job now, once, and exit.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the jobs, their schedule and command, and exit.")] = False,
) -> None:
    """Run the recurring jobs on their schedule (UTC), each as a `recsys` subprocess with its log in
    run/jobs/; a run of a job still going is skipped. Ctrl-C stops the scheduler."""
    root = _root(ctx)
    if list_:
        for line in list_lines(root):
            typer.echo(line)
        return
    runner = JobRunner(settings_of(ctx), root=root)
    if once is not None:
        try:
            job = find_job(once, JOBS)
        except KeyError as exc:
            raise CliError(str(exc.args[0])) from exc
        outcome = runner.run(job)
        typer.echo(f"{job.name}: {outcome.status}" + (f" (exit {outcome.returncode})" if outcome.returncode else "")
                   + (f": {outcome.detail}" if outcome.detail else "") + f"; log {outcome.log}")
        if outcome.status == "missing":
            raise CliError(f"job {job.name}: {outcome.detail}")
        if outcome.status != "ok":
            raise typer.Exit(outcome.returncode or 1)
        return
    ready = [job for job in JOBS if missing_reason(job, root) is None]
    for job in JOBS:
        if job not in ready:
            typer.secho(f"not scheduled: {job.name}: {missing_reason(job, root)}", err=True, fg=typer.colors.YELLOW)
    if not ready:
        raise CliError("no job can run in this version")
    scheduler = build_scheduler(ready, runner)
    typer.echo(f"scheduling {', '.join(j.name for j in ready)} (UTC); logs in {runner.log_dir}; Ctrl-C to stop")
    try:
        scheduler.start()  # blocks
    except (KeyboardInterrupt, SystemExit):
        scheduler.shutdown(wait=False)


@schedule_app.command("cron")
def cron_cmd(ctx: typer.Context) -> None:
    """Print the same jobs as crontab lines (for `crontab -e`), for hosts that run cron instead."""
    for line in crontab_lines(settings_of(ctx)):
        typer.echo(line)
