"""The stream consumer as services of the stack: ``stream-0`` .. ``stream-{N-1}``, each one
``recsys stream run`` process in the stream's consumer group, with its own pid file, log and
metrics port (``stream_port + i``); healthy while its metrics endpoint answers.

A worker runs with this process's settings (:mod:`.settings_env`), so ``recsys --dataset X stack
up`` starts workers on dataset X. ``down`` sends SIGTERM to the worker alone: it finishes its
batch, appends its outboxes offline through its flush process and commits, then exits; its flush
process must live until then, so it is not signalled with the group.
"""

from __future__ import annotations

import re
import sys

from pipelines.stack.health import http_healthy
from pipelines.stack.service_types import Service
from pipelines.stack.settings_env import settings_env
from recsys.config import Settings

#: The name that selects every stream worker (``--only stream``).
STREAM = "stream"
_WORKER = re.compile(rf"^{STREAM}-(\d+)$")
#: SIGTERM to exit: the last offline append may start Spark in the flush process.
STOP_TIMEOUT_S = 180.0


def worker_name(index: int) -> str:
    return f"{STREAM}-{index}"


def worker_index(name: str) -> int | None:
    """``stream-3`` -> 3; None for a name that is not a stream worker's."""
    match = _WORKER.match(name)
    return int(match.group(1)) if match else None


def stream_command(port: int) -> list[str]:
    """One consumer of the group, serving its metrics on ``port``."""
    return [sys.executable, "-m", "recsys.cli", "stream", "run", "--metrics-port", str(port)]


def stream_services(settings: Settings, workers: int) -> dict[str, Service]:
    """Workers ``stream-0`` .. ``stream-{workers-1}`` (Kafka and Redis must be up to start them)."""
    services = {}
    for i in range(workers):
        port = settings.stream_port + i
        services[worker_name(i)] = Service(
            name=worker_name(i),
            port=port,
            endpoint=f"http://127.0.0.1:{port}/metrics",
            is_local=True,
            command=lambda port=port: stream_command(port),  # type: ignore[misc]
            env=lambda: settings_env(settings),
            healthy=lambda port=port: http_healthy(f"http://127.0.0.1:{port}/metrics"),  # type: ignore[misc]
            start_timeout_s=180.0,  # imports Feast and joins the group; two cores may be busy
            stop_timeout_s=STOP_TIMEOUT_S,
            stop_leader_first=True,
            port_setting=STREAM,
        )
    return services
