"""Helpers shared by the benchmarks: where results go and how they are written."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def provenance() -> dict[str, Any]:
    """Which code and which arguments produced a result: the git commit (``+dirty`` when the
    working tree had uncommitted changes) and the command line after the module name."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit + ("+dirty" if dirty else ""), "arguments": sys.argv[1:]}


def machine() -> dict[str, Any]:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # the machines are shared: a high load means the numbers are upper bounds
            "load_average_1m_at_end": round(os.getloadavg()[0], 2)}


def write_results(name: str, numbers: dict[str, Any], table_rows: list[tuple[str, str]], notes: str = "",
                  folder: Path | None = None) -> Path:
    """Write results/NAME.json (numbers, the code and arguments that produced them, machine facts)
    and results/NAME.md (a short table); ``folder`` instead of results/ (a smoke run's --out)."""
    out = Path(folder) if folder is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    source = provenance()
    path.write_text(json.dumps({**numbers, **source, "machine": machine()}, indent=2) + "\n")
    lines = [f"# {name}", "", f"commit `{source['git_commit']}`, arguments `{' '.join(source['arguments']) or '(none)'}`",
             "", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in table_rows]]
    if notes:
        lines += ["", notes]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path


def run_child(code: str) -> dict[str, Any]:
    """Run Python code in a fresh interpreter; it must print one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
