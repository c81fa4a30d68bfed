"""The local stack's life cycle (:class:`LocalStack`): start, stop and inspect its services, with a pid
file and a log for each under one run directory."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.stack.errors import StackError
from pipelines.stack.ports import port_free
from pipelines.stack.processes import alive, stop_group
from pipelines.stack.services import APP_SERVICES, SERVICES, Service, ServiceStatus, service_definitions
from recsys.config import Settings

log = logging.getLogger(__name__)


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

    def _services(self) -> dict[str, Service]:
        return service_definitions(self.settings, self.run_dir)

    def _select(self, only: Sequence[str] | None, default: Sequence[str] = SERVICES) -> list[Service]:
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

    # public API
    def up(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        """Start every local service that is not already running; idempotent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return [self._up_one(svc) for svc in self._select(only)]

    def _up_one(self, svc: Service) -> ServiceStatus:
        if not svc.is_local:
            return self._status_one(svc)
        pid = self._read_pid(svc.name)
        if pid is not None and alive(pid):
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
        stop_group(name, pid, timeout_s)
        self.pid_file(name).unlink(missing_ok=True)

    def status(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        return [self._status_one(svc) for svc in self._select(only, default=self._with_started_apps())]

    def _status_one(self, svc: Service) -> ServiceStatus:
        if not svc.is_local:
            return ServiceStatus(svc.name, "external", svc.endpoint, svc.healthy())
        pid = self._read_pid(svc.name)
        if pid is None:
            return ServiceStatus(svc.name, "stopped", svc.endpoint, False)
        if not alive(pid):
            return ServiceStatus(svc.name, "stale", svc.endpoint, False, pid, self.log_file(svc.name))
        return ServiceStatus(svc.name, "running", svc.endpoint, svc.healthy(), pid, self.log_file(svc.name))
