"""The recurring jobs: the declaration (periods, TTLs), the Airflow DAG agreeing with it, `recsys
schedule run --list` and `--once` running a real command, and APScheduler triggering a job
(overlapping runs skipped)."""

from __future__ import annotations

import ast
import fcntl
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import typer
from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from typer.testing import CliRunner

from recsys.cli.jobs import JOBS, Job, JobRunner, build_scheduler, crontab_lines, find_job, missing_reason
from recsys.cli.main import app
from recsys.config import Settings
from tests.support.service_process import service_env
from tests.support.settings import REPO

ROOT = typer.main.get_command(app)


def test_the_declared_jobs_periods_and_ttls() -> None:
    periods = {job.name: job.period() for job in JOBS}
    assert periods == {"retrain": timedelta(days=1), "materialize": timedelta(hours=1),
                       "trending": timedelta(hours=1), "precompute": timedelta(hours=1),
                       "hot": timedelta(minutes=10)}
    assert find_job("precompute").args == ("precompute", "--tier", "all", "--ttl", "3600")  # 1 h
    assert find_job("hot").args == ("precompute", "--tier", "hot", "--hot-ttl", "7200")  # 2 h
    assert find_job("materialize").args == ("features", "materialize", "--incremental")
    assert all(missing_reason(job, ROOT) is None for job in JOBS), [missing_reason(j, ROOT) for j in JOBS]


def test_the_airflow_dag_declares_the_same_jobs() -> None:
    """Read, never imported: the tests run without Airflow."""
    tree = ast.parse((REPO / "deploy" / "airflow" / "recsys_dag.py").read_text())
    literal = next(node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                   and getattr(node.targets[0] if isinstance(node, ast.Assign) else node.target, "id", "") == "JOBS")
    dag_jobs = ast.literal_eval(literal)
    assert {name: (cron, tuple(args)) for name, (cron, args) in dag_jobs.items()} == \
        {job.name: (job.cron, job.args) for job in JOBS}


def test_the_docs_show_the_same_cron_lines(stack_settings: Settings) -> None:
    docs = (REPO / "docs" / "operations.md").read_text()
    for job in JOBS:
        assert f"{job.cron}  " in docs and job.command_line in docs, job.name
    lines = crontab_lines(stack_settings)
    assert lines[0] == "CRON_TZ=UTC" and len(lines) == len(JOBS) + 1
    assert lines[-1].startswith("*/10 * * * *  cd ") and "flock -n" in lines[-1]


@pytest.mark.parametrize(("args", "reason"), [
    (("nonexistent",), "`recsys nonexistent` is not a command of this version"),
    (("precompute", "--colour", "red"), "`recsys precompute` has no option --colour"),
    (("features",), "`recsys features` is a group of commands, not a command"),
])
def test_a_missing_command_is_reported(args: tuple[str, ...], reason: str, tmp_path: Path) -> None:
    job = Job("x", args, "0 * * * *", "")
    assert missing_reason(job, ROOT) == reason
    runner = JobRunner(Settings(home=REPO, run_dir=tmp_path), root=ROOT)
    outcome = runner.run(job)
    assert (outcome.status, outcome.detail, outcome.returncode) == ("missing", reason, None)


def test_list_shows_every_job() -> None:
    result = CliRunner().invoke(app, ["schedule", "run", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == [job.name for job in JOBS]
    assert "*/10 * * * *  every 10 min  recsys precompute --tier hot --hot-ttl 7200" in lines[-1]
    assert all(line.endswith("ok") for line in lines)


def test_once_of_an_unknown_job_names_the_jobs() -> None:
    result = CliRunner().invoke(app, ["schedule", "run", "--once", "nightly"])
    assert result.exit_code == 2 and "no job named 'nightly': the jobs are retrain, materialize" in result.output


@pytest.fixture
def job_env(feature_ws: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The environment of the workspace's settings, with a run directory of the test's own, for
    the `recsys` subprocesses the jobs start (they inherit it)."""
    for name, value in service_env(feature_ws, tmp_path / "bentoml", RECSYS_RUN_DIR=str(tmp_path / "run")).items():
        monkeypatch.setenv(name, value)
    return feature_ws.with_overrides(run_dir=tmp_path / "run")


def test_once_runs_the_real_command_with_its_log(job_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the command line, a cheap real command in place of the declared ones (each of those
    starts Spark or loads models: a minute on a loaded CI machine)."""
    import recsys.cli.schedule as schedule

    monkeypatch.setattr(schedule, "JOBS", (*JOBS, Job("info", ("data", "info"), "0 * * * *", "")))
    result = CliRunner().invoke(app, ["schedule", "run", "--once", "info"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("info: ok; log ")
    log = (job_env.run_path / "jobs" / "info.log").read_text()
    assert "start info: recsys data info" in log and '"source": "synthetic"' in log and "exit 0" in log


def test_a_run_still_going_is_skipped(job_env: Settings) -> None:
    runner = JobRunner(job_env, root=ROOT)
    runner.log_dir.mkdir(parents=True, exist_ok=True)
    with open(runner.log_dir / "trending.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in another process would
        outcome = runner.run(find_job("trending"))
    assert outcome.status == "skipped" and not outcome.log.exists()  # nothing was started


def test_the_scheduler_triggers_a_job_and_skips_overlaps(job_env: Settings) -> None:
    """A job on a one-minute cron, rescheduled through APScheduler to every 0.2 s: it runs (a real
    `recsys data info`, a few seconds), and the triggers that fall while it runs are skipped."""
    runner = JobRunner(job_env, root=ROOT)
    probe = Job("probe", ("data", "info"), "* * * * *", "")
    scheduler = build_scheduler([probe], runner, BackgroundScheduler)
    skipped = threading.Event()
    scheduler.add_listener(lambda _: skipped.set(), EVENT_JOB_MAX_INSTANCES)
    scheduler.start()
    try:
        scheduler.reschedule_job("probe", trigger=IntervalTrigger(seconds=0.2))
        deadline = time.monotonic() + 120  # a Python start and a manifest read; generous on a loaded CI machine
        while not runner.outcomes and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        scheduler.shutdown(wait=True)
    assert runner.outcomes and runner.outcomes[0].status == "ok", runner.outcomes
    assert skipped.is_set()  # triggers during the run found one instance running
    assert '"source": "synthetic"' in (runner.log_dir / "probe.log").read_text()
