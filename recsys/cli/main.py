"""The ``recsys`` command line: the one front door that imports every room.

Heavy modules (Spark, TensorFlow, Feast) are imported inside the commands that need them, so
``recsys --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, parse_time, settings_of
from recsys.cli.features import features_app
from recsys.cli.report import report_app
from recsys.cli.serving import precompute_cmd, serve
from recsys.cli.schedule import schedule_app
from recsys.cli.simulate import simulate_cmd
from recsys.cli.stack import stack_app
from recsys.cli.stream import events_app, stream_app, trending_cmd
from recsys.cli.models import register as register_model_commands
from recsys.config import load_settings
from recsys.logs import configure_logging

app = typer.Typer(
    name="recsys",
    help="Recommendation platform around a Feast feature store: local stack, data, features, "
    "training and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create the canonical tables: synthetic data or MovieLens.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.command("serve")(serve)
app.command("precompute")(precompute_cmd)
app.add_typer(events_app, name="events")
app.add_typer(stream_app, name="stream")
app.command("trending")(trending_cmd)
app.command("simulate")(simulate_cmd)
app.add_typer(schedule_app, name="schedule")
app.add_typer(report_app, name="report")
register_model_commands(app)  # train, index, evaluate

log = logging.getLogger("recsys")


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="YAML config file (also RECSYS_CONFIG).")] = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="The platform's 'now' (ISO time). Default: the dataset's latest event.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Active dataset name under data/canonical.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    configure_logging(verbose)
    if config is not None:
        os.environ["RECSYS_CONFIG"] = str(config)
    try:
        settings = load_settings(as_of=parse_time(as_of), dataset=dataset)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc).splitlines()[0] if isinstance(exc, FileNotFoundError) else str(exc)) from exc
    ctx.ensure_object(dict)["settings"] = settings


# ---- data -------------------------------------------------------------------------------------


@data_app.command("generate")
def data_generate(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, help="Number of users (ids 1..N).")] = 10_000,
    items: Annotated[int, typer.Option(min=1, help="Number of items (ids 1..M).")] = 5_000,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    end: Annotated[Optional[str], typer.Option(help="End of the history (ISO time); fixed default.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same data.")] = 42,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of item popularity.")] = 1.0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: the active dataset's).")] = None,
) -> None:
    """Generate the synthetic clickstream (the embedded default dataset)."""
    from pipelines.generator import DEFAULT_END, GeneratorConfig, generate

    settings = settings_of(ctx)
    try:
        cfg = GeneratorConfig(n_users=users, n_items=items, days=days, seed=seed, zipf_exponent=zipf,
                              end=parse_time(end) or DEFAULT_END)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    target = out or settings.dataset_path
    manifest = generate(cfg, target)
    _print_manifest(target, manifest)


@data_app.command("load")
def data_load(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="MovieLens folder (u.data... or ratings.csv...).")],
    layout: Annotated[str, typer.Option(help="auto, ml-100k or ml-csv.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: data/canonical/<folder name>).")] = None,
) -> None:
    """Load a MovieLens dataset into the canonical tables."""
    from pipelines.loaders import LoaderError, load_movielens

    settings = settings_of(ctx)
    target = out or settings.data_path / "canonical" / Path(path).name
    try:
        manifest = load_movielens(path, target, layout=layout)
    except LoaderError as exc:
        raise CliError(str(exc)) from exc
    _print_manifest(target, manifest)
    typer.echo(f"use it with: recsys --dataset {target.name} ... (or RECSYS_DATASET={target.name})")


@data_app.command("info")
def data_info(ctx: typer.Context) -> None:
    """Show the active dataset's manifest (what its writer wrote), the reference time, and under
    ``live`` what was appended since: the events the stream logged and the items added through
    the service."""
    from pipelines.canonical import DatasetError, read_manifest, reference_time
    from pipelines.live_log import live_summary

    settings = settings_of(ctx)
    try:
        manifest = read_manifest(settings.dataset_path)
        now = reference_time(settings.dataset_path, settings.as_of)
    except DatasetError as exc:
        raise CliError(str(exc)) from exc
    info = {k: v for k, v in asdict(manifest).items() if k != "params"}
    info["reference_time"] = now.isoformat()
    info["path"] = str(settings.dataset_path)
    info["live"] = live_summary(settings.dataset_path).as_dict()
    typer.echo(json.dumps(info, indent=2))


def _print_manifest(path: Path, manifest: object) -> None:
    m = asdict(manifest)  # type: ignore[call-overload]
    typer.echo(
        f"{path}: {m['events']:,} events, {m['items']:,} items, {m['users']:,} users, "
        f"{m['rejects']:,} rejected rows (see {path / 'rejects'})"
    )
    if m["rejects_by_reason"]:
        for reason, n in sorted(m["rejects_by_reason"].items()):
            typer.echo(f"  rejected: {n:>7,}  {reason}")


# ---- the main job -----------------------------------------------------------------------------


@app.command("demo")
def demo(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, help="Synthetic users.")] = 10_000,
    items: Annotated[int, typer.Option(min=1, help="Synthetic items.")] = 5_000,
    ranker: Annotated[bool, typer.Option(
        "--ranker/--no-ranker",
        help="Train the TensorFlow ranker the service scores with (--no-ranker: skip it, the service "
             "serves the ranker already in the BentoML store, or blends the strategies without one).")] = True,
    experiment: Annotated[bool, typer.Option(
        "--experiment/--no-experiment",
        help="Serve the demo's A/B experiment (deploy/experiments/demo.yaml: ranker, blend and popularity "
             "arms) unless RECSYS_EXPERIMENT_FILE names another; --no-experiment: every user gets the ranker.")] = True,
) -> None:
    """The main job, end to end on the synthetic default: stack up, data, features, stream, ALS, the
    FAISS index and the TensorFlow ranker, the service, and what to look at next."""
    from recsys.cli.demo import run_demo

    try:
        run_demo(settings_of(ctx), n_users=users, n_items=items, ranker=ranker, experiment=experiment)
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc

