"""Logging set-up for entry points (the CLI, benchmarks, jobs). Library code only logs."""

from __future__ import annotations

import logging
import warnings

#: Third-party loggers that are chatty at INFO (kafka-python logs every connection).
_NOISY = ("kafka", "py4j", "urllib3", "feast", "mlflow", "bentoml", "tensorflow", "absl", "faiss", "httpx")


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Feast warns on every Spark source that the Spark store is "alpha"; once is enough for us
    warnings.filterwarnings("ignore", message="The spark .* is an experimental feature", category=RuntimeWarning)
