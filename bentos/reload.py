"""Hot reload: a service worker notices a promotion and swaps its models without a restart.

:class:`ModelReloader` polls what should be served (:func:`bentos.factory.served_models`: the
champion pointer that ``recsys retrain`` writes) every ``Settings.model_reload_poll_s`` in a
daemon thread. When the served models' tags differ from the engine's, it builds a whole new
engine (index, ranker, catalogue, warm-up) in that thread, off the request path, then hands it to
``swap``: one reference assignment in the service. Requests that already hold the old engine
finish on it; new requests get the new one; the old engine is closed ``grace_s`` later (longer
than a request may run). A failed build keeps the old engine and says so in :meth:`status` (the
service's ``/models``) and in ``recsys_model_reloads_total{result="failed"}``; it is retried at
the next poll if the champion changes again, else after ``retry_failed_s``, so a broken model is
not rebuilt at every poll.

Cached answers carry the versions that computed them; the cache treats an entry whose index or
ranker version differs from the engine's as a miss (:mod:`bentos.cache`), so no answer of the old
models is served after the swap. Each worker process runs its own reloader: with several workers
each converges on its own, within one poll period of the others.

In an experiment whose arms pin model versions, what is built and swapped is the whole
:class:`bentos.arm_engines.EngineSet`: the champion's engine is compared with the pointer, and a
promotion rebuilds every engine, the pinned arms at their same tags (the models they do not pin
follow the champion).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from bentos.cache import MODEL_KEYS
from bentos.factory import ServedModels

log = logging.getLogger(__name__)


def identity(versions: dict[str, str]) -> dict[str, str]:
    """The model tags of a ``model_versions`` dict: what a reload compares."""
    return {k: versions.get(k, "absent") for k in MODEL_KEYS}


class _ReloadMetrics:
    """Created on first use, after BentoML set up prometheus' multiprocess mode in the worker."""

    _counter: Any = None

    def count(self, result: str) -> None:
        if self._counter is None:
            from prometheus_client import Counter

            type(self)._counter = Counter("recsys_model_reloads_total",
                                          "Model reloads after a promotion, by result (ok, failed)", ["result"])
        self._counter.labels(result=result).inc()


RELOADS = _ReloadMetrics()


class Served(Protocol):
    """What is swapped: an engine, or a set of them (:class:`bentos.arm_engines.EngineSet`)."""

    @property
    def model_versions(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class ModelReloader:
    """Polls ``resolve`` and swaps in an engine built by ``build`` when the models changed."""

    def __init__(self, current: Callable[[], Served], resolve: Callable[[], ServedModels],
                 build: Callable[[ServedModels], Served],
                 swap: Callable[[Served], None], poll_s: float, grace_s: float = 30.0,
                 retry_failed_s: float = 300.0) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s={poll_s} must be > 0 (e.g. 10): set RECSYS_MODEL_RELOAD_POLL_S")
        self.current, self.resolve, self.build, self.swap = current, resolve, build, swap
        self.poll_s, self.grace_s, self.retry_failed_s = poll_s, grace_s, retry_failed_s
        self._failed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one check at a time (the poll thread, a test, an endpoint)
        self.reloads = 0
        self.last_reload: str | None = None
        self.last_error: str | None = None
        self._failed: dict[str, str] | None = None  # the models whose build failed

    def check_once(self) -> bool:
        """Resolve the served models; build and swap when they differ. True if it swapped."""
        with self._lock:
            try:
                wanted = self.resolve()
            except Exception as exc:  # noqa: BLE001 - a broken pointer or store keeps what serves
                self._fail(None, f"could not resolve the champion: {exc}")
                return False
            target = identity(wanted.versions)
            if target == identity(self.current().model_versions):
                return False
            if target == self._failed and time.monotonic() - self._failed_at < self.retry_failed_s:
                return False
            log.info("promotion noticed: %s -> %s; loading", identity(self.current().model_versions), target)
            try:
                engine = self.build(wanted)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old models
                self._fail(target, f"loading {target} failed, still serving the previous models: {exc}")
                return False
            old = self.current()
            self.swap(engine)
            self.reloads += 1
            self._failed, self.last_error = None, None
            self.last_reload = datetime.now(timezone.utc).isoformat()
            RELOADS.count("ok")
            log.info("now serving %s", target)
            self._retire(old)
            return True

    def _fail(self, target: dict[str, str] | None, message: str) -> None:
        self._failed, self.last_error, self._failed_at = target, message, time.monotonic()
        RELOADS.count("failed")
        log.error("%s", message)

    def _retire(self, old: Served) -> None:
        """Close the old engine once the requests that hold it are done; then let the collector
        reclaim it (the service froze its objects out of the collector's view at start-up)."""
        def close() -> None:
            old.close()
            gc.unfreeze()
            gc.collect()
            gc.freeze()

        timer = threading.Timer(self.grace_s, close)
        timer.daemon = True
        timer.start()

    def status(self) -> dict[str, Any]:
        """What is served, the last reload and the last failure (None: the last check was fine)."""
        return {"model_versions": dict(self.current().model_versions), "reloads": self.reloads,
                "last_reload": self.last_reload, "last_error": self.last_error, "poll_s": self.poll_s}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="model-reload")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            started = time.monotonic()
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the poll thread must survive anything
                log.exception("model reload check failed")
            log.debug("reload check took %.3f s", time.monotonic() - started)
