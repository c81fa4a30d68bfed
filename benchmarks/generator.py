"""Benchmark: synthetic generator throughput and peak memory at 1M and 10M events, and the
cold start of the local stack.

Run: ``python -m benchmarks.generator`` -> ``benchmarks/results/generator.json`` with
``events_per_s_1m``, ``peak_rss_mb_1m``, ``events_per_s_10m``, ``peak_rss_mb_10m``, ``stack_up_cold_s``.
Each size runs in its own interpreter so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks._common import run_child, write_results
from recsys.logs import configure_logging

log = logging.getLogger(__name__)

# users/items sized for ~1M and ~10M events (about 44 events per synthetic user)
SIZES = {"1m": (23_000, 100_000), "10m": (230_000, 1_000_000)}

CHILD = """
import json, resource, tempfile, time
from pipelines.generator import GeneratorConfig, generate
with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    m = generate(GeneratorConfig(n_users={users}, n_items={items}), tmp + "/ds", progress=False)
    s = time.perf_counter() - t
print(json.dumps({{"events": m.events + m.rejects, "seconds": s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def bench_generator(label: str) -> dict[str, float]:
    users, items = SIZES[label]
    result = run_child(CHILD.format(users=users, items=items))
    log.info("%s: %d rows in %.1fs, peak %.0f MB", label, result["events"], result["seconds"], result["peak_rss_mb"])
    return {f"events_{label}": result["events"], f"events_per_s_{label}": round(result["events"] / result["seconds"]),
            f"peak_rss_mb_{label}": round(result["peak_rss_mb"], 1)}


def bench_stack_up_cold() -> float:
    from pipelines.stack import LocalStack, free_port
    from recsys.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(run_dir=Path(tmp), redis_port=free_port(), kafka_port=free_port(), mlflow_port=free_port())
        stack = LocalStack(settings)
        t = time.perf_counter()
        stack.up()
        seconds = time.perf_counter() - t
        stack.down()
    return round(seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    configure_logging()
    numbers: dict[str, float] = {}
    for label in args.sizes:
        numbers.update(bench_generator(label))
    numbers["stack_up_cold_s"] = bench_stack_up_cold()
    rows = [(k, f"{v:,}" if isinstance(v, int) else str(v)) for k, v in numbers.items()]
    path = write_results("generator", numbers, rows,
                         notes="Generator: default GeneratorConfig except users/items; rows include rejected ones. "
                               "Stack: redis + kafka + mlflow from an empty run dir until all are healthy.")
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
