"""The local services' processes: whether a pid is alive, reaping our children, stopping a process
group (or its leader first, which stops its own children)."""

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


def send_stop(pid: int, leader_only: bool = False) -> None:
    """SIGTERM to the process group led by ``pid`` (or to ``pid`` alone, which then stops its children)."""
    if not alive(pid):
        return
    try:
        if leader_only:
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def wait_stopped(name: str, pid: int, timeout_s: float = 15.0) -> None:
    """Wait up to ``timeout_s`` for ``pid`` to exit; then SIGKILL its process group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        reap(pid)
        time.sleep(0.1)
    if alive(pid):
        log.warning("%s (pid %d) did not exit %.0f s after SIGTERM; sending SIGKILL", name, pid, timeout_s)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(pid)


def stop_group(name: str, pid: int, timeout_s: float = 15.0, leader_only: bool = False) -> None:
    """SIGTERM the process group led by ``pid`` (``leader_only``: ``pid`` alone); SIGKILL the group if
    ``pid`` has not exited after ``timeout_s``."""
    send_stop(pid, leader_only)
    wait_stopped(name, pid, timeout_s)
