"""`recsys report experiment NAME`: the A/B experiment report (:mod:`models.experiment_report`)
printed as a table and written as JSON and a PNG plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, settings_of
from recsys.config import Settings

report_app = typer.Typer(help="Reports on what was served: A/B experiments.", no_args_is_help=True)

log = logging.getLogger(__name__)


def declared_baseline(settings: Settings, name: str) -> Optional[str]:
    """The first arm of experiment ``name`` when ``RECSYS_EXPERIMENT_FILE`` declares it, else None
    (the report then takes the first arm by name)."""
    from bentos.experiments import ExperimentError, experiment_of

    try:
        experiment = experiment_of(settings)
    except ExperimentError as exc:
        log.warning("%s: the baseline is the first arm by name", exc)
        return None
    return experiment.arms[0].name if experiment is not None and experiment.name == name else None


@report_app.command("experiment")
def experiment_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment's name (its `name` in the experiment file).")],
    window_s: Annotated[float, typer.Option(
        "--window-s", min=1, help="Seconds after an answer in which a click or purchase of a shown item counts "
                                  "(events without a request_id).")] = 1_800.0,
    baseline: Annotated[Optional[str], typer.Option(
        help="The arm the others are compared with (default: the first arm of the declared experiment, "
             "else the first by name).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder of the JSON and PNG (default: <run_dir>/reports).")] = None,
) -> None:
    """Per arm: answers, users, items shown, clicks, CTR and purchases per user with 95% intervals,
    each arm against the baseline (z-tests); computed with Spark from the offline impressions and
    events tables."""
    from models.experiment_report import ReportError, experiment_report, format_table, write_report

    settings = settings_of(ctx)
    try:
        report = experiment_report(settings, name, window_s=window_s,
                                   baseline=baseline or declared_baseline(settings, name))
    except ReportError as exc:
        raise CliError(str(exc)) from exc
    typer.echo(format_table(report))
    json_path, png_path = write_report(report, out or settings.run_path / "reports")
    typer.echo(f"wrote {json_path} and {png_path}")
