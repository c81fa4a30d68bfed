"""The recurring jobs of the recommendation platform as Airflow DAGs, one per job (an Airflow DAG
has one schedule): the same jobs, periods and commands as ``recsys/cli/jobs.py`` (``JOBS``), which
``recsys schedule run`` runs without Airflow. A test reads this file's ``JOBS`` (without importing
Airflow) and checks it agrees with that declaration: change both together.

Copy this file into Airflow's ``dags/`` folder on a worker where the project is installed, and set
the Airflow Variable ``recsys_home`` to the checkout (the folder holding ``.venv`` and
``feature_repo/``). Each task runs ``recsys ...`` there; one active run per DAG (``max_active_runs``)
skips overlaps as the local scheduler does; schedules are in UTC.
"""

from __future__ import annotations

import shlex
from datetime import datetime, timedelta, timezone

#: name -> (cron schedule in UTC, the ``recsys`` command's arguments)
JOBS = {
    "retrain": ("30 2 * * *", ["retrain"]),
    "materialize": ("0 * * * *", ["features", "materialize", "--incremental"]),
    "trending": ("10 * * * *", ["trending", "--top", "0"]),
    "precompute": ("20 * * * *", ["precompute", "--tier", "all", "--ttl", "3600"]),
    "hot": ("*/10 * * * *", ["precompute", "--tier", "hot", "--hot-ttl", "7200"]),
}


def _dags() -> dict[str, object]:
    from airflow import DAG
    from airflow.operators.bash import BashOperator

    dags = {}
    for name, (schedule, args) in JOBS.items():
        with DAG(dag_id=f"recsys_{name}", schedule=schedule, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
                 catchup=False, max_active_runs=1, tags=["recsys"],
                 default_args={"retries": 1, "retry_delay": timedelta(minutes=5)}) as dag:
            BashOperator(task_id=name,
                         bash_command="cd {{ var.value.recsys_home }} && .venv/bin/recsys " + shlex.join(args))
        dags[dag.dag_id] = dag
    return dags


# Airflow finds DAGs among a module's globals
globals().update(_dags())
