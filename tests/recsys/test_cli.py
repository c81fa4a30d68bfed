"""The `recsys` command line as a user runs it: a real subprocess, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def recsys(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300,
    )


@pytest.mark.parametrize("command", [[], ["stack"], ["data"], ["stack", "up"], ["data", "generate"],
                                     ["data", "load"], ["demo"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = recsys(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_load_missing_path_is_one_clear_line(tmp_path: Path) -> None:
    result = recsys("data", "load", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not exist: pass the folder that holds u.data or ratings.csv" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_wrong_layout(tmp_path: Path) -> None:
    result = recsys("data", "load", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a MovieLens folder" in result.stderr


def test_bad_as_of() -> None:
    result = recsys("--as-of", "yesterday", "data", "info")
    assert result.returncode == 2 and "--as-of 'yesterday' is not an ISO time" in result.stderr


def test_generate_then_info(tmp_path: Path) -> None:
    env = {"RECSYS_DATA_DIR": str(tmp_path)}
    result = recsys("data", "generate", "--users", "50", "--items", "40", "--end", "2026-01-01T00:00:00Z", env=env)
    assert result.returncode == 0, result.stderr
    info = recsys("data", "info", env=env)
    assert info.returncode == 0, info.stderr
    body = json.loads(info.stdout)
    assert body["users"] == 50 and body["items"] == 40
    assert body["reference_time"] == body["max_event_ts"]  # default "now" = the latest event
    pinned = recsys("--as-of", "2025-12-25T00:00:00", "data", "info", env=env)
    assert json.loads(pinned.stdout)["reference_time"] == "2025-12-25T00:00:00+00:00"


def test_info_without_data_says_what_to_run(tmp_path: Path) -> None:
    result = recsys("data", "info", env={"RECSYS_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "run `recsys data generate`" in result.stderr


def test_generate_rejects_bad_sizes(tmp_path: Path) -> None:
    result = recsys("data", "generate", "--users", "0", env={"RECSYS_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "--users" in result.stderr


# ---- the demo: its ranker flag, step timings and ranker summary (pure logic) -------------------


def test_demo_help_shows_the_ranker_on_by_default() -> None:
    result = recsys("demo", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "--ranker" in result.stdout and "--no-ranker" in result.stdout
    assert "[default: ranker]" in result.stdout


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--ranker"], True), (["--no-ranker"], False)])
def test_demo_trains_the_ranker_unless_no_ranker(flags: list[str], expected: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the flag's parsing only: run_demo (the whole stack) is replaced by a recorder
    from typer.testing import CliRunner

    import recsys.cli.demo as demo
    from recsys.cli.main import app

    calls: list[dict] = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["demo", *flags])
    assert result.exit_code == 0, result.output
    assert calls == [{"n_users": 10_000, "n_items": 5_000, "ranker": expected, "experiment": True}]


def test_the_demo_serves_its_experiment_unless_told_otherwise(tmp_path: Path) -> None:
    from bentos.experiments import experiment_of
    from recsys.cli.demo import DEMO_EXPERIMENT, serving_settings
    from tests.support.settings import isolated_settings

    settings = isolated_settings(tmp_path, experiment_file=None)
    # by default the demo's own file, which declares the three arms the loop compares
    declared = experiment_of(serving_settings(settings, experiment=True))
    assert declared is not None and [a.mode for a in declared.arms] == ["ranker", "blend", "popularity"]
    assert serving_settings(settings, experiment=True).experiment_file == DEMO_EXPERIMENT
    assert serving_settings(settings, experiment=False).experiment_file is None  # --no-experiment
    own = settings.with_overrides(experiment_file=tmp_path / "mine.yaml")  # the user's own wins
    assert serving_settings(own, experiment=True).experiment_file == tmp_path / "mine.yaml"


def test_timed_step_prints_and_records_its_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli.demo import timed_step

    seconds: dict[str, float] = {}
    with timed_step(6, 7, "training: Spark ALS, FAISS index", seconds):
        pass
    out = capsys.readouterr().out
    assert out.startswith("[6/7] training: Spark ALS, FAISS index\n")
    assert list(seconds) == ["6. training"] and seconds["6. training"] >= 0.0
    assert out.endswith(f"  ({seconds['6. training']:.1f} s)\n")


def test_ranker_summary_names_rows_device_configuration_run_and_tag(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from models.ranker.config import RankerConfig
    from models.ranker.examples import ExampleConfig
    from models.ranker.fit import FitResult
    from models.ranker.job import RankerTrainResult
    from models.ranker.training import RankerTraining
    from recsys.cli.demo import ranker_summary

    def result(config: RankerConfig, examples: ExampleConfig) -> RankerTrainResult:
        fit = FitResult(None, None, config, {}, "CPU", 202_120, 1_661)
        training = RankerTraining(fit, None, None, label_users=[(2_000, 3_932)])  # type: ignore[arg-type]
        return RankerTrainResult(training, tmp_path, datetime(2026, 11, 1, tzinfo=timezone.utc), run_id="abc123",
                                 bento_tag="ranker:xyz", seconds={"ranker_s": 181.4}, examples=examples)

    line = ranker_summary(result(RankerConfig(cv_folds=1), ExampleConfig()))
    assert line == ("202,120 rows (1,661 positive) on CPU in 181 s; 2,000 of 3,932 label users (cap 2,000), 8 epochs, "
                    "1 cv fold, 150 hard + 10 random negatives per user; differs from `recsys train ranker`'s "
                    "defaults: cv folds 1 (default 5); MLflow run abc123, BentoML model ranker:xyz")
    defaults = ranker_summary(result(RankerConfig(), ExampleConfig()))
    assert "8 epochs, 5 cv folds" in defaults and defaults.endswith(
        "; `recsys train ranker`'s defaults; MLflow run abc123, BentoML model ranker:xyz")


def test_the_demo_samples_a_median_user_of_a_ranker_arm(tmp_path: Path) -> None:
    from bentos.experiments import experiment_of
    from recsys.cli.demo import sample_user, serving_settings
    from tests.support.settings import isolated_settings

    plain = isolated_settings(tmp_path, experiment_file=None)
    users = list(range(100, 200))  # most active first: the median is user 150
    assert sample_user(plain, users) == 150
    demo = serving_settings(plain, experiment=True)
    chosen = sample_user(demo, users)
    declared = experiment_of(demo)
    assert declared is not None and declared.assign(chosen).mode == "ranker"
    # the first from the median on that the ranker arm holds
    assert all(declared.assign(u).mode != "ranker" for u in range(150, chosen))
