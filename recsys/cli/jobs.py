"""The recurring jobs, declared once (:data:`JOBS`: each a ``recsys`` command line and its period as
a cron expression, in UTC), and how they run: :class:`JobRunner` launches one run as a subprocess
of the ``recsys`` command with its output appended to ``run/jobs/<name>.log`` and skips a run of
a job that is still running (a per-job file lock, so two schedulers or a ``--once`` beside the
scheduler never overlap either); :func:`build_scheduler` puts them on an APScheduler scheduler;
:func:`crontab_lines` writes the same jobs for cron. ``deploy/airflow/recsys_dag.py`` declares
them for Airflow; a test checks that it agrees with :data:`JOBS`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from recsys.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One recurring job: ``recsys ARGS...`` on the cron schedule ``cron`` (UTC)."""

    name: str
    args: tuple[str, ...]
    cron: str
    description: str

    def trigger(self) -> CronTrigger:
        return CronTrigger.from_crontab(self.cron, timezone=timezone.utc)

    def period(self) -> timedelta:
        """The time between two consecutive runs (for a regular schedule, as all of these are)."""
        trigger = self.trigger()
        first = trigger.get_next_fire_time(None, datetime(2026, 1, 1, tzinfo=timezone.utc))
        second = trigger.get_next_fire_time(first, first)
        assert first is not None and second is not None
        return second - first

    @property
    def command_line(self) -> str:
        return "recsys " + shlex.join(self.args)


#: What runs when. Staggered within the hour so the hourly jobs do not all start at once, and in
#: the order their inputs need: the features and trending first, the cache after them.
JOBS: tuple[Job, ...] = (
    Job("retrain", ("retrain",), "30 2 * * *",
        "daily: retrain on the offline log up to now; promote the challenger only if the gate passes"),
    Job("materialize", ("features", "materialize", "--incremental"), "0 * * * *",
        "hourly: offline feature rows since each view's last materialization -> Redis"),
    Job("trending", ("trending", "--top", "0"), "10 * * * *",
        "hourly: Spark recount of the trending window -> Redis"),
    Job("precompute", ("precompute", "--tier", "all", "--ttl", "3600"), "20 * * * *",
        "hourly: the answers of users active in the last 24 h -> the cache, kept 1 h"),
    Job("hot", ("precompute", "--tier", "hot", "--hot-ttl", "7200"), "*/10 * * * *",
        "every 10 minutes: the answers of the most active users (the hot tier) -> the cache, kept 2 h"),
)


def find_job(name: str, jobs: Iterable[Job] = JOBS) -> Job:
    jobs = tuple(jobs)
    for job in jobs:
        if job.name == name:
            return job
    raise KeyError(f"no job named {name!r}: the jobs are {', '.join(j.name for j in jobs)}")


def _subcommands(command: Any) -> Optional[dict[str, Any]]:
    """A group's sub-commands by name; None for a plain command (Typer vendors its own click, so
    this goes by shape, not by class)."""
    return getattr(command, "commands", None)


def missing_reason(job: Job, root: Any) -> Optional[str]:
    """Why ``recsys ARGS`` would not run in this version (None: the command and options exist);
    ``root`` is the ``recsys`` command as click sees it (``typer.main.get_command(app)``)."""
    command, path = root, ["recsys"]
    for arg in job.args:
        if _subcommands(command) is not None and not arg.startswith("-"):
            path.append(arg)
            sub = _subcommands(command).get(arg)  # type: ignore[union-attr]
            if sub is None:
                return f"`{' '.join(path)}` is not a command of this version"
            command = sub
        elif arg.startswith("--"):
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            if arg.split("=")[0] not in known:
                return f"`{' '.join(path)}` has no option {arg.split('=')[0]}"
    if _subcommands(command) is not None:
        return f"`{' '.join(path)}` is a group of commands, not a command"
    return None


Status = Literal["ok", "failed", "skipped", "missing"]


@dataclass(frozen=True)
class JobOutcome:
    job: str
    status: Status
    returncode: Optional[int]
    seconds: float
    log: Path
    detail: str = ""


class JobRunner:
    """Runs one job at a time per job name, as ``python -m recsys.cli --dataset D ARGS...`` in the
    project's home, output appended to ``<run>/jobs/<name>.log`` between a start and an end line."""

    def __init__(self, settings: Settings, root: Any = None,
                 env: Optional[dict[str, str]] = None, timeout_s: Optional[float] = None) -> None:
        self.settings = settings
        self.root = root
        self.env = env
        self.timeout_s = timeout_s
        self.log_dir = settings.run_path / "jobs"
        self.outcomes: list[JobOutcome] = []

    def command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", "recsys.cli", "--dataset", self.settings.dataset, *job.args]

    def log_path(self, job: Job) -> Path:
        return self.log_dir / f"{job.name}.log"

    def run(self, job: Job) -> JobOutcome:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        reason = missing_reason(job, self.root) if self.root is not None else None
        if reason is not None:
            log.warning("job %s not run: %s", job.name, reason)
            return self._record(JobOutcome(job.name, "missing", None, 0.0, self.log_path(job), reason))
        with open(self.log_dir / f"{job.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("job %s skipped: its previous run is still going", job.name)
                return self._record(JobOutcome(job.name, "skipped", None, 0.0, self.log_path(job),
                                               "the previous run is still going"))
            return self._record(self._launch(job))

    def _launch(self, job: Job) -> JobOutcome:
        path, started = self.log_path(job), time.monotonic()
        log.info("job %s: %s (log %s)", job.name, job.command_line, path)
        with open(path, "ab") as fh:
            fh.write(f"=== {_now()} start {job.name}: {job.command_line}\n".encode())
            fh.flush()
            try:
                rc = subprocess.run(self.command(job), cwd=self.settings.home, env=self.env or os.environ.copy(),
                                    stdout=fh, stderr=subprocess.STDOUT, timeout=self.timeout_s).returncode
                detail = ""
            except subprocess.TimeoutExpired:
                rc, detail = -9, f"killed after {self.timeout_s} s"
            seconds = time.monotonic() - started
            fh.write(f"=== {_now()} end {job.name}: exit {rc} in {seconds:.1f} s {detail}\n".encode())
        status: Status = "ok" if rc == 0 else "failed"
        (log.info if rc == 0 else log.warning)("job %s %s (exit %s) in %.1f s", job.name, status, rc, seconds)
        return JobOutcome(job.name, status, rc, seconds, path, detail)

    def _record(self, outcome: JobOutcome) -> JobOutcome:
        self.outcomes.append(outcome)
        return outcome


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_scheduler(jobs: Iterable[Job], runner: JobRunner,
                    scheduler_cls: type[BaseScheduler] = BlockingScheduler) -> BaseScheduler:
    """A scheduler with each job on its cron trigger: one thread per job, at most one run of a job
    at a time (an overlapping run is skipped, as is the runner's lock), late runs coalesced."""
    jobs = tuple(jobs)
    scheduler = scheduler_cls(timezone=timezone.utc, executors={"default": ThreadPoolExecutor(max(1, len(jobs)))},
                              job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 600})
    for job in jobs:
        scheduler.add_job(runner.run, job.trigger(), args=[job], id=job.name, name=job.name)
    return scheduler


def crontab_lines(settings: Settings, jobs: Iterable[Job] = JOBS) -> list[str]:
    """The jobs as crontab lines (UTC): each appends to the same log as :class:`JobRunner` and
    takes the same lock with ``flock -n``, so a run still going makes the next one a no-op."""
    home = shlex.quote(str(settings.home))
    logs = shlex.quote(str(settings.run_path / "jobs"))
    lines = ["CRON_TZ=UTC"]
    for job in jobs:
        lines.append(f"{job.cron}  cd {home} && mkdir -p {logs} && flock -n {logs}/{job.name}.lock "
                     f".venv/bin/{job.command_line} >> {logs}/{job.name}.log 2>&1")
    return lines
