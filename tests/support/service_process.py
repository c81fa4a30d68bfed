"""A real `bentoml serve` process for tests: :func:`serve` starts one on a free loopback port
with :func:`service_env` (the isolated settings, the test API key, a test BentoML home), waits
until /readyz answers and stops the whole process group; :class:`Server` calls its endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from pipelines.stack import free_port
from recsys.config import Settings
from recsys.schema import recs_cache_key
from tests.support.settings import REPO

API_KEY = "test-key-123"


class Server:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def call(self, path: str, body: Any = None, key: str | None = None, raw: bytes | None = None,
             method: str = "POST") -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json", **({"x-api-key": key} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
                status, headers = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            payload, status, headers = err.read(), err.code, dict(err.headers)
        try:
            return status, headers, json.loads(payload)
        except ValueError:
            return status, headers, payload.decode()


def service_env(settings: Settings, bentoml_home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RECSYS_HOME": str(settings.home), "RECSYS_DATA_DIR": str(settings.data_path),
            "RECSYS_DATASET": settings.dataset, "RECSYS_FEAST_PROJECT": settings.feast_project,
            "REDIS_URL": settings.effective_redis_url, "KAFKA_BOOTSTRAP_SERVERS": settings.effective_kafka_bootstrap,
            "RECSYS_API_KEY": API_KEY, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True", **extra}


def clear_cached_answers(redis_url: str) -> int:
    """Delete every cached answer (``recs:*``) in the Redis at ``redis_url``; returns how many.
    The test modules share one Redis, and a cached answer keeps the model versions that computed
    it: without this, a server would answer from another module's models."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=recs_cache_key(0).replace("0", "*"), count=1_000))
    return int(client.delete(*keys)) if keys else 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `bentoml serve` and every process it started. Its workers run in sessions of their
    own, so the process group does not reach them, and a worker stuck in its start-up ignores the
    arbiter's SIGTERM: left alone it would outlive the test (and hold a model in memory)."""
    import psutil

    workers: list[psutil.Process] = []
    with suppress(psutil.Error):
        workers = psutil.Process(proc.pid).children(recursive=True)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        with suppress(psutil.Error):
            worker.kill()


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[Server]:
    """A `bentoml serve` with ``env`` on a free port, ready; it starts and ends with no cached
    answer in its Redis (:func:`clear_cached_answers`)."""
    port = free_port()
    clear_cached_answers(env["REDIS_URL"])
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "bentos.service:Recommender",
                                 "--port", str(port), "--host", "127.0.0.1"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, proc, log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None or "Application startup failed" in log.read_text(errors="replace"):
                raise RuntimeError(f"bentoml serve failed to start: {log.read_text()[-3000:]}")
            try:
                if server.call("/readyz", method="GET")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            # every thread's stack of the stuck worker (the service registers faulthandler on
            # SIGUSR1; the arbiter may exit on it, which the teardown below tolerates)
            with suppress(OSError):
                os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(2)
            raise RuntimeError(f"bentoml serve not ready in 180 s: {log.read_text()[-12000:]}")
        yield server
    finally:
        stop(proc)
        with suppress(OSError, RedisConnectionError):  # a test may end with its Redis stopped
            clear_cached_answers(env["REDIS_URL"])
