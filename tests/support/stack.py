"""Helpers of the managed-stream tests: consecutive free ports (a worker per port), the `recsys`
command run with a given Settings, and polling with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipelines.stack import free_port, port_free, settings_env
from pipelines.stack.settings_env import child_environment
from recsys.config import Settings
from tests.support.settings import REPO

_T = TypeVar("_T")


def free_port_run(n: int, tries: int = 50) -> int:
    """A port ``p`` with ``p .. p + n - 1`` all free on loopback right now."""
    for _ in range(tries):
        base = free_port()
        if base + n <= 65_535 and all(port_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError(f"no run of {n} free ports found in {tries} tries")


def recsys_cli(settings: Settings, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`recsys ARGS` in a subprocess whose settings are ``settings``."""
    env = child_environment(dict(os.environ), settings_env(settings))
    return subprocess.run([str(Path(sys.executable).with_name("recsys")), *args], cwd=REPO, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=timeout_s)


def poll(probe: Callable[[], _T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> _T:
    """The first value of ``probe()`` that is not None, or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
