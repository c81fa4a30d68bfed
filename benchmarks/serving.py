"""Benchmark: /recommend latency and throughput of a running service, cache misses vs hits.

Run after `make demo` (the stack and the service on RECSYS_SERVICE_PORT are up):
``python -m benchmarks.serving`` -> ``benchmarks/results/serving.json`` with ``miss_p50_ms_c1``,
``miss_p95_ms_c1``, ``miss_p99_ms_c1``, ``hit_p50_ms_c1``, ``hit_p99_ms_c1`` and, for c8 and c32,
``miss_rps_cN``, ``miss_p99_ms_cN``, ``hit_rps_cN``, ``hit_p99_ms_cN``, plus the per-stage means
from the service's own /metrics.

A closed-loop generator on loopback: ``c`` clients each send the next request when the previous
answer arrives. Misses: distinct users whose cache entry was deleted first; hits: the same users
again. Every phase is bounded in requests and in time. The generator shares the 2 cores with the
service, so high-concurrency latency is mostly queueing: read c1 for latency, c8 for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import time
from typing import Any

import aiohttp
import httpx
import numpy as np
import pyarrow.dataset as pads
import redis

from benchmarks._common import write_results
from bentos.cache import cache_key
from recsys import schema as S
from recsys.config import Settings, load_settings
from recsys.logs import configure_logging

log = logging.getLogger("benchmarks.serving")

PHASE_REQUESTS = {1: 1000, 8: 1200, 32: 1600}  # c1 needs many samples for a p99 that means something
PHASE_MAX_S = 60.0
_STAGE = re.compile(r'^recsys_stage_seconds_(sum|count)\{stage="([a-z_]+)"\} ([0-9.e+-]+)$')


async def _floor(base: str, n: int = 1000) -> list[float]:
    """GET /healthz with one client: this machine's HTTP floor (no handler work), for reference."""
    latencies = []
    async with aiohttp.ClientSession(base) as client:
        for _ in range(n):
            t = time.perf_counter()
            async with client.get("/healthz") as resp:
                await resp.read()
            latencies.append((time.perf_counter() - t) * 1000)
    return latencies


async def _phase(base: str, users: list[int], concurrency: int) -> tuple[list[float], float, int]:
    """Send one /recommend per user with ``concurrency`` closed-loop clients; (latencies ms, rps, errors)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for u in users:
        queue.put_nowait(u)
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + PHASE_MAX_S
    # aiohttp, not httpx: httpx's client adds a per-request cost of its own (measured side by side),
    # which the service would be charged for
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty() and time.monotonic() < deadline:
                user = queue.get_nowait()
                t = time.perf_counter()
                async with client.post("/recommend", json={"user_id": user, "k": 10}) as resp:
                    await resp.read()
                latencies.append((time.perf_counter() - t) * 1000)
                errors += resp.status != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, len(latencies) / elapsed, errors


def _stage_totals(base: str) -> dict[str, tuple[float, float]]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    totals: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _STAGE.match(line)
        if m:
            kind, stage, value = m.groups()
            totals.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c1 > c0:
            out[f"stage_mean_ms_{stage}"] = round((s1 - s0) / (c1 - c0) * 1000, 3)
    return out


def _users(settings: Settings, n: int) -> list[int]:
    table = pads.dataset(settings.dataset_path / "events").to_table(columns=[S.COL_USER])
    counts = table.column(0).to_pandas().value_counts()
    active = counts[counts >= 20].index.to_numpy()  # personalised users (not cold start)
    rng = np.random.default_rng(0)
    return [int(u) for u in rng.permutation(active)[:n]]


def run(settings: Settings) -> dict[str, Any]:
    base = f"http://127.0.0.1:{settings.service_port}"
    if httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
        raise SystemExit(f"the service at {base} is not ready: run `make demo` (or `recsys stack up --only service`)")
    client = redis.Redis.from_url(settings.effective_redis_url)
    pool = _users(settings, sum(PHASE_REQUESTS.values()))
    numbers: dict[str, Any] = {}
    offset = 0
    asyncio.run(_phase(base, pool[:20], 1))  # warm-up: connections, lazy imports, FAISS pages
    floor = asyncio.run(_floor(base))
    numbers["healthz_p50_ms_c1"], numbers["healthz_p99_ms_c1"] = (float(np.percentile(floor, q)) for q in (50, 99))
    numbers["service_workers"] = settings.service_workers
    for concurrency, n in PHASE_REQUESTS.items():
        users = pool[offset: offset + n]
        offset += n
        if users:
            client.delete(*[cache_key(u) for u in users])
        before = _stage_totals(base)
        miss, miss_rps, miss_err = asyncio.run(_phase(base, users, concurrency))
        after = _stage_totals(base)
        time.sleep(2.0)  # cache writes happen off the response path: let them land before the hit phase
        hit, hit_rps, hit_err = asyncio.run(_phase(base, users, concurrency))
        tag = f"c{concurrency}"
        numbers.update({
            f"miss_p50_ms_{tag}": float(np.percentile(miss, 50)), f"miss_p95_ms_{tag}": float(np.percentile(miss, 95)),
            f"miss_p99_ms_{tag}": float(np.percentile(miss, 99)), f"miss_rps_{tag}": miss_rps,
            f"hit_p50_ms_{tag}": float(np.percentile(hit, 50)), f"hit_p99_ms_{tag}": float(np.percentile(hit, 99)),
            f"hit_rps_{tag}": hit_rps, f"requests_{tag}": len(miss) + len(hit), f"errors_{tag}": miss_err + hit_err,
        })
        if concurrency == 1:
            numbers.update(_stage_means(before, after))
        numbers["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        log.info("c=%d: miss p50 %.1f p99 %.1f ms %.0f rps | hit p50 %.1f p99 %.1f ms %.0f rps", concurrency,
                 numbers[f"miss_p50_ms_{tag}"], numbers[f"miss_p99_ms_{tag}"], miss_rps,
                 numbers[f"hit_p50_ms_{tag}"], numbers[f"hit_p99_ms_{tag}"], hit_rps)
    return numbers


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    configure_logging()
    numbers = run(load_settings())
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in numbers.items()]
    path = write_results("serving", {k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()},
                         rows, notes="Closed loop on loopback; the generator shares the machine with the service. "
                                     "stage_mean_ms_* are the service's own per-stage means over the c1 miss phase; "
                                     "healthz_* is GET /healthz with one client, this machine's HTTP floor.")
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
