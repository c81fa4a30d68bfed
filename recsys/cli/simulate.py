"""`recsys simulate`: synthetic users against the running service (:mod:`pipelines.simulator`),
with the summary printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from recsys.cli.common import CliError, settings_of
from recsys.config import Settings

DEFAULT_REQUESTS = 200


def default_summary_path(settings: Settings) -> Path:
    return settings.run_path / "simulation.json"


def run_simulation(settings: Settings, requests: Optional[int] = None, seconds: Optional[float] = None,
                   rate: float = 20.0, k: int = 10, seed: int = 0, users: Optional[list[int]] = None,
                   url: Optional[str] = None, api_key: Optional[str] = None, out: Optional[Path] = None,
                   progress: bool = True) -> dict:
    """Run one simulation against the service of ``settings`` (or ``url``) on the active dataset's
    ground truth; write the summary JSON to ``out`` and return it. Bad input is a ValueError and an
    unreachable service a SimulationError, each naming the fix."""
    from pipelines.ground_truth import dataset_ground_truth
    from pipelines.simulator import SimulationConfig, Simulator, summarize_line, user_ids

    if requests is None and seconds is None:
        requests = DEFAULT_REQUESTS
    config = SimulationConfig(requests=requests, seconds=seconds, rate=rate, k=k, seed=seed, users=user_ids(users))
    truth = dataset_ground_truth(settings.dataset_path)
    simulator = Simulator(url or f"http://127.0.0.1:{settings.service_port}", truth, config,
                          api_key or settings.api_key.get_secret_value())
    summary = simulator.run(progress=progress).summary
    payload = summary.to_dict()
    target = out or default_summary_path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    typer.echo(summarize_line(summary))
    typer.echo(f"summary written to {target}")
    return payload


def simulate_cmd(
    ctx: typer.Context,
    requests: Annotated[Optional[int], typer.Option(
        min=1, help=f"Stop after this many requests (default {DEFAULT_REQUESTS} unless --seconds is given).")] = None,
    seconds: Annotated[Optional[float], typer.Option(
        min=0.001, help="Stop after this many seconds (with --requests: whichever comes first).")] = None,
    rate: Annotated[float, typer.Option(min=0.0, help="Requests per second (0: as fast as answers come).")] = 20.0,
    k: Annotated[int, typer.Option(min=1, max=100, help="Items asked per request.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed: the users picked, their clicks and purchases.")] = 0,
    user: Annotated[Optional[list[int]], typer.Option(
        "--user", help="Only these users of the dataset (repeatable; default: all of them).")] = None,
    url: Annotated[Optional[str], typer.Option(help="The service (default: the local stack's).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Key for /events (default: RECSYS_API_KEY).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Summary JSON (default: run/simulation.json).")] = None,
) -> None:
    """Play synthetic users against the running service: /recommend, then clicks and purchases drawn
    from the synthetic dataset's ground-truth preferences, sent back through /events."""
    from pipelines.canonical import DatasetError
    from pipelines.simulator import SimulationError

    try:
        run_simulation(settings_of(ctx), requests=requests, seconds=seconds, rate=rate, k=k, seed=seed,
                       users=user, url=url, api_key=api_key, out=out)
    except (ValueError, DatasetError, SimulationError) as exc:
        raise CliError(str(exc)) from exc
