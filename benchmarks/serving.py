"""Benchmark: /recommend with the ranker beside the strategy blend, in one run.

Run after `make demo` (the stack up, the models in the BentoML store):
``python -m benchmarks.serving`` -> ``benchmarks/results/serving.json``. It starts its own
`bentoml serve` processes on free loopback ports, one after the other (never two measured at once
on the shared cores), from the same data and Redis:

- ``ranker_*``: the store as it is, the ranker at full precision (``RECSYS_RANKER_PRECISION=full``);
- ``quantized_*``: the same with the ranker's int8 variant, when the export has one;
- ``blend_*``: a model store holding the index only, so the service scores with the strategy blend.

For each: cache-miss p50/p99 at concurrency 1 (``*_miss_p50_ms_c1``, ``*_miss_p99_ms_c1``),
requests/s at concurrency 8 (``*_miss_rps_c8``, with its p99), cache-hit p50/p99 at concurrency 1
(``*_hit_p99_ms_c1``) with ``*_hit_ratio`` (the share of hit-phase answers whose ``cached`` flag
is true: below :data:`MIN_HIT_RATIO` the run fails, since the phase did not measure hits), the
``scoring`` stage's mean and p99 over the c1 miss phase from the service's own /metrics
(``*_scoring_mean_ms``, ``*_scoring_p99_ms``: the p99 interpolated within the histogram's bucket,
as Prometheus' histogram_quantile does), every stage's mean (``*_stage_mean_ms_*``), the served
``*_model_versions`` and the load average when the variant's phases ended.

A closed-loop generator on loopback: ``c`` clients each send the next request when the previous
answer arrives. Misses: distinct users whose cache entry was deleted first (the same users for
every variant); hits: the same users again. Every phase is bounded in requests and in time. The
generator shares the cores with the service: read c1 for latency, c8 for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pyarrow.dataset as pads
import redis

from benchmarks._common import write_results
from bentos.cache import cache_key
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from models.ranker.export import QUANTIZED_FILE
from pipelines.stack import free_port
from pipelines.stack.services import service_command, service_env
from recsys import schema as S
from recsys.config import Settings, load_settings
from recsys.logs import configure_logging

log = logging.getLogger("benchmarks.serving")

PHASE_MAX_S = 60.0
START_TIMEOUT_S = 300.0
#: below this share of cached answers the "hit" phase did not measure hits: the run fails
MIN_HIT_RATIO = 0.99
_STAGE = re.compile(r'^recsys_stage_seconds_(sum|count)\{stage="([a-z_]+)"\} ([0-9.e+-]+)$')
_BUCKET = re.compile(r'^recsys_stage_seconds_bucket\{le="([0-9.e+Inf-]+)",stage="scoring"\} ([0-9.e+-]+)$')


async def _floor(base: str, n: int) -> list[float]:
    """GET /healthz with one client: this machine's HTTP floor (no handler work), for reference."""
    latencies = []
    async with aiohttp.ClientSession(base) as client:
        for _ in range(n):
            t = time.perf_counter()
            async with client.get("/healthz") as resp:
                await resp.read()
            latencies.append((time.perf_counter() - t) * 1000)
    return latencies


async def phase(base: str, users: list[int], concurrency: int) -> tuple[list[float], float, int, list[dict]]:
    """One /recommend per user with ``concurrency`` closed-loop clients: (latencies ms, rps,
    errors, the answers' ``cached`` flags and model versions)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for u in users:
        queue.put_nowait(u)
    latencies: list[float] = []
    answers: list[dict] = []
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
                    payload = await resp.read()
                latencies.append((time.perf_counter() - t) * 1000)
                if resp.status != 200:
                    errors += 1
                    continue
                body = json.loads(payload)  # after the clock stopped: parsing is not the service's time
                answers.append({"cached": body.get("cached"), "model_versions": body.get("model_versions"),
                                "degraded": body.get("degraded")})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, len(latencies) / elapsed, errors, answers


def checked_hit_ratio(base: str, answers: list[dict]) -> float:
    """The share of a hit phase's answers flagged ``cached``; below :data:`MIN_HIT_RATIO` the
    phase did not measure hits and the run fails, saying so."""
    ratio = float(np.mean([bool(a["cached"]) for a in answers])) if answers else 0.0
    if ratio < MIN_HIT_RATIO:
        raise SystemExit(f"the hit phase at {base} was not served from the cache: {ratio:.3f} of its answers "
                         f"were cached (need >= {MIN_HIT_RATIO}); is the cache TTL or Redis misconfigured?")
    return ratio


def _metrics(base: str) -> str:
    return httpx.get(f"{base}/metrics", timeout=10).text


def _stage_totals(text: str) -> dict[str, tuple[float, float]]:
    totals: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _STAGE.match(line)
        if m:
            kind, stage, value = m.groups()
            totals.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def _scoring_buckets(text: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m:
            out[float(m.group(1))] = out.get(float(m.group(1)), 0.0) + float(m.group(2))
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The ``q`` quantile (ms) of the observations between two snapshots of a cumulative
    histogram (upper bound -> count), interpolated linearly within its bucket as Prometheus'
    histogram_quantile does; None without observations. Past the last finite bound: that bound."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)) * 1000
        lower, below = bound, count
    return lower * 1000


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, (0.0, 0.0))
        if c1 > c0:
            out[f"stage_mean_ms_{stage}"] = round((s1 - s0) / (c1 - c0) * 1000, 3)
    return out


def active_users(settings: Settings, n: int) -> list[int]:
    """Up to ``n`` users with at least 20 events (personalised, not cold start), in a seeded order."""
    table = pads.dataset(settings.dataset_path / "events").to_table(columns=[S.COL_USER])
    counts = table.column(0).to_pandas().value_counts()
    active = counts[counts >= 20].index.to_numpy()  # personalised users (not cold start)
    rng = np.random.default_rng(0)
    return [int(u) for u in rng.permutation(active)[:n]]


@contextmanager
def service(settings: Settings, env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`bentoml serve` on a free loopback port with ``env`` over this process's environment;
    yields its base URL once /readyz answers, and stops its process group on exit."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(service_command(settings, port), cwd=settings.home, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **service_env(settings), **env})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bentoml serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"bentoml serve not ready in {START_TIMEOUT_S:.0f} s: "
                                 f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def measure(base: str, client: redis.Redis, miss_c1: list[int], miss_c8: list[int]) -> dict[str, Any]:
    """The phases of one variant (module docstring); fails when the hit phase did not hit."""
    asyncio.run(phase(base, miss_c1[:20], 1))  # warm-up: connections, lazy imports, FAISS pages
    client.delete(*[cache_key(u) for u in miss_c1 + miss_c8])
    text = _metrics(base)
    before, buckets_before = _stage_totals(text), _scoring_buckets(text)
    miss, _, miss_err, answers = asyncio.run(phase(base, miss_c1, 1))
    text = _metrics(base)
    after, buckets_after = _stage_totals(text), _scoring_buckets(text)
    time.sleep(2.0)  # cache writes happen off the response path: let them land before the hit phase
    hit, _, hit_err, hit_answers = asyncio.run(phase(base, miss_c1, 1))
    hit_ratio = checked_hit_ratio(base, hit_answers)
    miss8, rps8, miss8_err, _ = asyncio.run(phase(base, miss_c8, 8))
    versions = sorted({json.dumps(a["model_versions"], sort_keys=True) for a in answers})
    scoring_mean = after.get("scoring", (0.0, 0.0))
    scoring_before = before.get("scoring", (0.0, 0.0))
    n_scored = scoring_mean[1] - scoring_before[1]
    p99 = histogram_quantile(0.99, buckets_before, buckets_after)
    return {
        "miss_p50_ms_c1": float(np.percentile(miss, 50)), "miss_p99_ms_c1": float(np.percentile(miss, 99)),
        "miss_requests_c1": len(miss), "miss_degraded_share_c1": float(np.mean([bool(a["degraded"]) for a in answers])),
        "hit_p50_ms_c1": float(np.percentile(hit, 50)), "hit_p99_ms_c1": float(np.percentile(hit, 99)),
        "hit_ratio": round(hit_ratio, 4), "miss_rps_c8": rps8, "miss_p99_ms_c8": float(np.percentile(miss8, 99)),
        "errors": miss_err + hit_err + miss8_err,
        "scoring_mean_ms": round((scoring_mean[0] - scoring_before[0]) / n_scored * 1000, 4) if n_scored else None,
        "scoring_p99_ms": round(p99, 4) if p99 is not None else None, "scoring_calls_c1": int(n_scored),
        **_stage_means(before, after),
        "model_versions": [json.loads(v) for v in versions],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def blend_store(folder: Path) -> Path:
    """A BentoML model store holding the current index only: a service started on it scores with
    the strategy blend (no ranker), with everything else as in the main store."""
    import bentoml

    from models.tracking import save_to_bentoml

    index = bentoml.models.get(f"{BENTO_INDEX_MODEL}:latest")
    save_to_bentoml(BENTO_INDEX_MODEL, Path(index.path), index.info.labels.get("mlflow_run_id", "unknown"),
                    bentoml_home=folder)
    return folder


def has_quantized_ranker() -> bool:
    import bentoml

    try:
        return (Path(bentoml.models.get(f"{BENTO_RANKER_MODEL}:latest").path) / QUANTIZED_FILE).is_file()
    except bentoml.exceptions.NotFound:
        return False


def run(settings: Settings, miss_c1: int, miss_c8: int, variants: list[str], workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.effective_redis_url)
    pool = active_users(settings, miss_c1 + miss_c8)
    users_c1, users_c8 = pool[:miss_c1], pool[miss_c1:]
    if not users_c1 or not users_c8:
        raise SystemExit(f"only {len(pool)} users with >= 20 events: lower --miss-c1/--miss-c8")
    envs: dict[str, dict[str, str]] = {
        "ranker": {"RECSYS_RANKER_PRECISION": "full"},
        "quantized": {"RECSYS_RANKER_PRECISION": "quantized"},
        "blend": {"BENTOML_HOME": str(blend_store(workdir / "bentoml-blend"))} if "blend" in variants else {},
    }
    numbers: dict[str, Any] = {"service_workers": settings.service_workers, "miss_users_c1": len(users_c1),
                               "miss_users_c8": len(users_c8)}
    for variant in variants:
        if variant == "quantized" and not has_quantized_ranker():
            log.warning("the ranker in the store has no %s: no quantized_* keys", QUANTIZED_FILE)
            numbers["quantized_available"] = False
            continue
        with service(settings, envs[variant], workdir / f"serve-{variant}.log") as base:
            if "healthz_p50_ms_c1" not in numbers:
                floor = asyncio.run(_floor(base, 1000))
                numbers["healthz_p50_ms_c1"], numbers["healthz_p99_ms_c1"] = (
                    float(np.percentile(floor, q)) for q in (50, 99))
            found = measure(base, client, users_c1, users_c8)
        numbers.update({f"{variant}_{k}": v for k, v in found.items()})
        log.info("%s: miss p50 %.2f p99 %.2f ms (c1), %.0f rps (c8) | hit p99 %.2f ms, ratio %.3f | scoring mean %s "
                 "p99 %s ms | %s", variant, found["miss_p50_ms_c1"], found["miss_p99_ms_c1"], found["miss_rps_c8"],
                 found["hit_p99_ms_c1"], found["hit_ratio"], found["scoring_mean_ms"], found["scoring_p99_ms"],
                 found["model_versions"])
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--miss-c1", type=int, default=1000, help="Cache-miss requests at concurrency 1 (and hits).")
    parser.add_argument("--miss-c8", type=int, default=1200, help="Cache-miss requests at concurrency 8.")
    parser.add_argument("--variants", nargs="+", default=["ranker", "quantized", "blend"],
                        choices=["ranker", "quantized", "blend"])
    parser.add_argument("--out", type=Path, default=None,
                        help="Write serving.json/.md here instead of benchmarks/results/ (smoke runs).")
    args = parser.parse_args()
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="recsys-bench-serving-") as tmp:
        numbers = run(load_settings(), args.miss_c1, args.miss_c8, args.variants, Path(tmp))
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list) else str(v))
            for k, v in numbers.items()]
    path = write_results("serving", {k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()},
                         rows, folder=args.out,
                         notes="Each variant in its own `bentoml serve` (one worker), started by the benchmark and "
                               "measured alone; closed loop on loopback, the generator sharing the machine. "
                               "ranker = full precision, quantized = the int8 TFLite variant, blend = no ranker in "
                               "the model store. *_scoring_* and *_stage_mean_ms_* are the service's own /metrics "
                               "over the c1 miss phase (p99 interpolated within its histogram bucket); *_hit_ratio "
                               "is the share of hit-phase answers flagged cached; healthz_* is the HTTP floor.")
    log.info("wrote %s", path)


if __name__ == "__main__":
    sys.exit(main())
