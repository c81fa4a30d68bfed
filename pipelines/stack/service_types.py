"""What a service of the local stack is (:class:`Service`) and how one reports (:class:`ServiceStatus`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | stopped | external | stale
    endpoint: str
    healthy: bool
    pid: int | None = None
    log_path: Path | None = None
    #: one line more: a stream worker's group lag, or what a service still needs before it can start
    detail: str = ""


@dataclass(frozen=True)
class Service:
    """One service of the stack; ``is_local`` is false for an endpoint configured to point elsewhere."""

    name: str
    port: int
    endpoint: str
    is_local: bool
    command: Callable[[], list[str]]
    healthy: Callable[[], bool]
    after_start: Callable[[], None] | None = None
    start_timeout_s: float = 30.0
    #: added to this process's environment; a None value removes the variable
    env: Callable[[], dict[str, str | None]] | None = None
    #: how long ``down`` waits after SIGTERM before it sends SIGKILL
    stop_timeout_s: float = 15.0
    #: SIGTERM the leader only (it stops its own children: the stream's flush process must outlive
    #: the consumer's last flush), instead of the whole process group
    stop_leader_first: bool = False
    #: the name the environment variable of its port is derived from (RECSYS_<NAME>_PORT)
    port_setting: str = ""

    @property
    def port_variable(self) -> str:
        return f"RECSYS_{(self.port_setting or self.name).upper()}_PORT"
