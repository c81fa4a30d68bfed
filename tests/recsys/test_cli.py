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
