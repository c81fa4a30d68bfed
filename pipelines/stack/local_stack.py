"""The local stack's life cycle (:class:`LocalStack`): start, stop and inspect its services, with a pid
file and a log for each under one run directory."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from pipelines.stack.errors import StackError
from pipelines.stack.lag import GroupLag, group_lag
from pipelines.stack.ports import port_free
from pipelines.stack.processes import alive, send_stop, stop_group, wait_stopped
from pipelines.stack.service_types import Service, ServiceStatus
from pipelines.stack.services import APP_SERVICES, SERVICES, service_definitions
from pipelines.stack.settings_env import child_environment
from pipelines.stack.stream_service import STREAM, worker_index, worker_name
from recsys.config import Settings

log = logging.getLogger(__name__)

#: What a service still lacks before it can start (empty: nothing), e.g. the stream's dataset.
Requirement = Callable[[Settings], list[str]]


class LocalStack:
    """Start, stop and inspect the local services described by ``settings``.

    ``requires`` maps an application service (``stream``, ``service``) to the check of what it
    needs (data, a Feast registry): with a check, a plain ``up()`` also starts that service when
    nothing is missing, and otherwise says what is (a status row's ``detail``; an error when the
    service was named). Without one, an application service starts only when named.
    """

    def __init__(self, settings: Settings, requires: Mapping[str, Requirement] | None = None) -> None:
        self.settings = settings
        self.run_dir = settings.run_path
        self.requires = dict(requires or {})

    # paths
    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    # which services
    def _started_workers(self) -> list[str]:
        found = sorted(i for p in self.run_dir.glob(f"{STREAM}-*.pid") if (i := worker_index(p.stem)) is not None)
        return [worker_name(i) for i in found]

    def _services(self) -> dict[str, Service]:
        started = [worker_index(n) or 0 for n in self._started_workers()]
        workers = max([self.settings.stream_workers, *(i + 1 for i in started)])
        return service_definitions(self.settings, self.run_dir, workers)

    def _expand(self, names: Sequence[str], up: bool) -> list[str]:
        """Names as given, ``stream`` replaced by its workers: those configured for ``up``, else those
        started (with a pid file: after ``up --workers M``, M of them, whatever the configured
        count), or the configured ones when none is. Unknown names fail with the choices."""
        services = self._services()
        configured = [worker_name(i) for i in range(self.settings.stream_workers)]
        workers = configured if up else (self._started_workers() or configured)
        expanded = [w for n in names for w in (workers if n == STREAM else [n])]
        unknown = [n for n in expanded if n not in services]
        if unknown:
            raise StackError(f"unknown service(s) {unknown}: choose from {[*SERVICES, *APP_SERVICES, *configured]}")
        return list(dict.fromkeys(expanded))

    def _started_apps(self) -> list[str]:
        return [a for a in APP_SERVICES if a != STREAM and self.pid_file(a).exists()] + self._started_workers()

    def _missing(self, family: str) -> str:
        """What ``family`` (``stream`` for every worker) still needs, in one line ("" when nothing)."""
        check = self.requires.get(family)
        missing = check(self.settings) if check is not None else []
        return f"{family} not started: needs {'; '.join(missing)}" if missing else ""

    # pid bookkeeping
    def _read_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    # public API
    def up(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        """Start every selected service that is not already running; idempotent. Stream workers
        start last, together, once Redis and Kafka answer; ``stream`` (named, or by default with a
        ``stream`` requirement) also stops workers beyond ``settings.stream_workers``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        named = list(only) if only else [*SERVICES, *(a for a in APP_SERVICES if a in self.requires)]
        services = self._services()
        rows, workers = [], []
        for name in self._expand(named, up=True):
            if worker_index(name) is not None:
                workers.append(services[name])
                continue
            blocked = self._missing(name)
            if blocked:
                if only:
                    raise StackError(blocked)
                rows.append(self._status_one(services[name], detail=blocked))
            else:
                rows.append(self._up_one(services[name]))
        if STREAM in named:
            extra = [services[n] for n in self._started_workers() if (worker_index(n) or 0) >= self.settings.stream_workers]
            if extra:  # SIGTERM: each flushes offline and commits before it exits, as in `down`
                log.info("stopping %s: beyond %d stream worker(s)", ", ".join(s.name for s in extra),
                         self.settings.stream_workers)
                self._stop_together(extra)
        if workers:
            rows.extend(self._up_workers(workers, explicit=bool(only)))
        return rows

    def _up_workers(self, workers: list[Service], explicit: bool) -> list[ServiceStatus]:
        blocked = self._missing(STREAM)
        if not blocked:
            services = self._services()
            down = [f"{n} at {services[n].endpoint}" for n in ("redis", "kafka") if not services[n].healthy()]
            blocked = f"{STREAM} not started: needs {' and '.join(down)} running (recsys stack up)" if down else ""
        if blocked:
            if explicit:
                raise StackError(blocked)
            log.warning("%s", blocked)
            return [self._status_one(w, detail=blocked) for w in workers]
        launched = [(w, self._launch(w)) for w in workers]
        for svc, proc in launched:
            if proc is not None:
                self._await_healthy(svc, proc)
        return self._with_lag([self._status_one(w) for w in workers])

    def _up_one(self, svc: Service) -> ServiceStatus:
        proc = self._launch(svc)
        if proc is not None:
            self._await_healthy(svc, proc)
        return self._status_one(svc)

    def _launch(self, svc: Service) -> subprocess.Popen[bytes] | None:
        """Start ``svc`` unless it runs (or is external); returns the new process."""
        if not svc.is_local:
            return None
        pid = self._read_pid(svc.name)
        if pid is not None and alive(pid):
            if svc.after_start is not None and svc.healthy():
                svc.after_start()  # topics may be gone if the broker was restarted by hand
            log.info("%s already running (pid %d)", svc.name, pid)
            return None
        if pid is not None:
            self.pid_file(svc.name).unlink(missing_ok=True)  # stale: the process died
        if not port_free(svc.port):
            raise StackError(
                f"port {svc.port} for {svc.name} is busy (another process listens there): stop it, "
                f"or choose another port with {svc.port_variable}"
            )
        command = svc.command()  # raises StackError if the binary is missing
        (self.run_dir / svc.name).mkdir(parents=True, exist_ok=True)
        with open(self.log_file(svc.name), "ab") as log_fh:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir / svc.name,
                env=child_environment(dict(os.environ), svc.env()) if svc.env else None,
                start_new_session=True,  # own process group: `down` kills workers too
            )
        self.pid_file(svc.name).write_text(f"{proc.pid}\n")
        return proc

    def _await_healthy(self, svc: Service, proc: subprocess.Popen[bytes]) -> None:
        log_path = self.log_file(svc.name)
        deadline = time.monotonic() + svc.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file(svc.name).unlink(missing_ok=True)
                raise StackError(f"{svc.name} exited with code {proc.returncode} while starting: see {log_path}")
            if svc.healthy():
                break
            time.sleep(0.2)
        else:
            self._stop_pid(svc, proc.pid)
            raise StackError(f"{svc.name} did not become healthy within {svc.start_timeout_s:.0f}s: see {log_path}")
        if svc.after_start is not None:
            svc.after_start()
        log.info("%s started (pid %d) at %s", svc.name, proc.pid, svc.endpoint)

    def down(self, only: Sequence[str] | None = None) -> list[str]:
        """Stop the services this stack started (those with a pid file). Returns their names. The
        applications first, stream workers all at once: they hold connections to the others."""
        services = self._services()
        names = self._expand(list(only) if only else [*SERVICES, *self._started_apps()], up=False)
        selected = [services[n] for n in reversed(names)]
        stopped = self._stop_together([s for s in selected if worker_index(s.name) is not None])
        for svc in selected:
            pid = self._read_pid(svc.name)
            if worker_index(svc.name) is None and pid is not None:
                self._stop_pid(svc, pid)
                stopped.append(svc.name)
        return stopped

    def _stop_together(self, services: list[Service]) -> list[str]:
        """SIGTERM every one of ``services`` that has a pid file, then wait for each."""
        running = [(svc, pid) for svc in services if (pid := self._read_pid(svc.name)) is not None]
        for svc, pid in running:
            send_stop(pid, leader_only=svc.stop_leader_first)
        for svc, pid in running:
            wait_stopped(svc.name, pid, svc.stop_timeout_s)
            self.pid_file(svc.name).unlink(missing_ok=True)
        return [svc.name for svc, _ in running]

    def _stop_pid(self, svc: Service, pid: int) -> None:
        stop_group(svc.name, pid, svc.stop_timeout_s, leader_only=svc.stop_leader_first)
        self.pid_file(svc.name).unlink(missing_ok=True)

    def status(self, only: Sequence[str] | None = None) -> list[ServiceStatus]:
        """Every selected service (default: the infrastructure, the applications started, and those
        with a requirement), with the stream group's lag on each stream worker's row."""
        default = [*SERVICES, *self._started_apps(), *(a for a in APP_SERVICES if a in self.requires)]
        services = self._services()
        rows = []
        for name in self._expand(list(only) if only else default, up=False):
            svc = services[name]
            row = self._status_one(svc)
            if row.state == "stopped":
                row = self._status_one(svc, detail=self._missing(STREAM if worker_index(name) is not None else name))
            rows.append(row)
        return self._with_lag(rows)

    def group_lag(self) -> GroupLag | None:
        """The stream group's lag on the events topic, from Kafka's committed and end offsets."""
        s = self.settings
        return group_lag(s.effective_kafka_bootstrap, s.stream_group_id, s.events_topic)

    def _with_lag(self, rows: list[ServiceStatus]) -> list[ServiceStatus]:
        if not any(worker_index(r.name) is not None for r in rows):
            return rows
        lag = self.group_lag()
        text = f"group lag {lag.total:,}" if lag is not None else "group lag unknown (Kafka does not answer)"
        return [replace(r, detail="; ".join(filter(None, [text, r.detail]))) if worker_index(r.name) is not None else r
                for r in rows]

    def _status_one(self, svc: Service, detail: str = "") -> ServiceStatus:
        if not svc.is_local:
            return ServiceStatus(svc.name, "external", svc.endpoint, svc.healthy(), detail=detail)
        pid = self._read_pid(svc.name)
        if pid is None:
            return ServiceStatus(svc.name, "stopped", svc.endpoint, False, detail=detail)
        if not alive(pid):
            return ServiceStatus(svc.name, "stale", svc.endpoint, False, pid, self.log_file(svc.name), detail)
        return ServiceStatus(svc.name, "running", svc.endpoint, svc.healthy(), pid, self.log_file(svc.name), detail)
