"""The local services' processes: whether a pid is alive, reaping our children, stopping a process group."""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of this process counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_group(name: str, pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL it if it has not exited after ``timeout_s``."""
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        reap(pid)
        time.sleep(0.1)
    if alive(pid):
        log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", name, pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(pid)
