"""Benchmark: the closed loop of issue 13 (arms, impressions, promotion, the offline log), in one run.

Run after `make demo` (the stack up with its stream consumer, the models in the BentoML store):
``python -m benchmarks.loop`` -> ``benchmarks/results/loop.json``, ``loop.md`` and ``loop.png``.
It copies the served index and ranker twice into a temporary BentoML home (two model sets with
different tags, the first the champion) and starts two `bentoml serve` processes on free loopback
ports over it (the second over a copy with the same tags), both with a three-arm experiment (``popularity``, ``blend``, ``ranker``, a third
of the users each): one with impression logging on, one with it off. Then, in phases, each bounded
in requests and in time:

1. **hit path**: the same users, served from the cache, at concurrency 1, alternately against the
   service with impressions and the one without (rounds on/off, off/on, ...); the median of each
   service's per-round p99s is ``hit_p99_ms_with_impressions`` / ``..._without_impressions``;
   the share of answers flagged ``cached`` must reach ``benchmarks.serving.MIN_HIT_RATIO``.
2. **arms**: the user simulator (:mod:`pipelines.simulator`, what ``recsys simulate`` runs) at a
   steady rate for a fixed number of requests against the service with impressions; per arm
   ``ctr_{arm}`` = clicks / impressions, an impression being one item shown in an answer, with its
   95% Wilson interval (:func:`models.experiment_stats.wilson`).
3. **promotion and offline log, side by side**: in a thread, events sent through ``/events`` at a
   steady rate, each timed from its acceptance (the ``event_timestamp`` the service stamps) to the
   first poll of the dataset's offline events table that finds its ``event_id``
   (``event_to_offline_*``; the demo's own stream consumer appends them); meanwhile the champion
   pointer is moved to the second model set and back, each time timed to the first answer
   (a cache miss) that carries the new versions (``promotion_to_served_s``: the slower of the two).
   Last, the service's own impression counters (``impressions_sent``, ``impressions_dropped``).

Users of the phases are disjoint (the stream deletes the cached answer of a user with a new event,
which would turn hits into misses). The temporary home goes at the end; the demo's own pointer and
store are never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import redis

from benchmarks._common import RESULTS, write_results
from benchmarks.loop_stats import ARMS, ctr_keys, disjoint, goals, median_p99, offline_latencies, promotion_keys
from benchmarks.serving import active_users, checked_hit_ratio, phase, service
from bentos.cache import cache_key
from bentos.experiments import Experiment
from bentos.reload import identity
from models.champion import ModelSet, write_champion
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL
from recsys import schema as S
from recsys.config import Settings, load_settings
from recsys.logs import configure_logging

log = logging.getLogger("benchmarks.loop")

EXPERIMENT = "bench-loop"
#: the longest wait for one promotion to reach the answers (the issue's goal is 30 s)
PROMOTION_MAX_S = 90.0
#: between two /recommend polls of a promotion, and two looks at the offline table
POLL_S = 0.1
OFFLINE_POLL_S = 0.5
#: how long past the flush period after the last event the offline table is still watched
OFFLINE_GRACE_S = 60.0


# ---- set-up -------------------------------------------------------------------------------------

def prepare_store(home: Path) -> tuple[ModelSet, ModelSet]:
    """Two model sets in the BentoML home ``home``, each a copy of what the demo serves (its
    champion, else its latest index and ranker) under new tags; the first made champion."""
    from bentos.factory import served_models
    from models.tracking import save_to_bentoml

    served = served_models()  # the demo's own store ($BENTOML_HOME): read, never written
    if served.index_dir is None:
        raise SystemExit("no item_index in the BentoML store: run `make demo` (or `recsys train`) first")
    sets = []
    for run in ("bench-loop-a", "bench-loop-b"):
        tags = {BENTO_INDEX_MODEL: save_to_bentoml(BENTO_INDEX_MODEL, served.index_dir, run, bentoml_home=home)}
        if served.ranker_dir is not None:
            tags[BENTO_RANKER_MODEL] = save_to_bentoml(BENTO_RANKER_MODEL, served.ranker_dir, run, bentoml_home=home)
        sets.append(ModelSet(tags, reason=f"benchmarks.loop {run}"))
    write_champion(sets[0], home)
    return sets[0], sets[1]


def write_experiment(path: Path) -> Experiment:
    """The three-arm experiment, a third of the users each, written as JSON to ``path``."""
    body = {"name": EXPERIMENT, "salt": "benchmarks-loop",
            "arms": [{"name": arm, "share": 1 / len(ARMS), "mode": arm} for arm in ARMS]}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return Experiment.model_validate(body)


# ---- phases -------------------------------------------------------------------------------------

def hit_path(bases: dict[str, str], client: redis.Redis, users: list[int], rounds: int) -> dict[str, Any]:
    """Phase 1 (module docstring). ``bases``: "on" and "off" (impressions) -> base URL."""
    client.delete(*[cache_key(u) for u in users])
    asyncio.run(phase(bases["on"], users, 1))  # one miss each fills the cache both services read
    time.sleep(2.0)  # cache writes happen off the response path: let them land
    for base in bases.values():  # warm-up (connections, first calls), and any answer not cached yet is now
        asyncio.run(phase(base, users, 1))
    latencies: dict[str, list[list[float]]] = {"on": [], "off": []}
    ratios: dict[str, list[float]] = {"on": [], "off": []}
    errors = 0
    for r in range(rounds):
        for name in (("on", "off") if r % 2 == 0 else ("off", "on")):  # the order alternates too
            found, _, failed, answers = asyncio.run(phase(bases[name], users, 1))
            ratios[name].append(checked_hit_ratio(bases[name], answers))
            latencies[name].append(found)
            errors += failed
            log.info("hit round %d/%d, impressions %s: p99 %.2f ms", r + 1, rounds, name, np.percentile(found, 99))
    out: dict[str, Any] = {"hit_users": len(users), "hit_rounds": rounds, "hit_errors": errors}
    for name, label in (("on", "with"), ("off", "without")):
        out[f"hit_p99_ms_{label}_impressions"] = round(median_p99(latencies[name]), 3)
        out[f"hit_p50_ms_{label}_impressions"] = round(statistics.median(
            float(np.percentile(r, 50)) for r in latencies[name]), 3)
        out[f"hit_p99_ms_{label}_impressions_rounds"] = [round(float(np.percentile(r, 99)), 3)
                                                         for r in latencies[name]]
        out[f"hit_ratio_{label}_impressions"] = round(min(ratios[name]), 4)
    log.info("hit p99: %.2f ms with impressions, %.2f ms without (medians of %d rounds)",
             out["hit_p99_ms_with_impressions"], out["hit_p99_ms_without_impressions"], rounds)
    return out


def arms(settings: Settings, base: str, users: list[int], requests: int, rate: float) -> dict[str, Any]:
    """Phase 2: the simulator against ``base``; CTR per arm (:func:`ctr_keys`)."""
    from pipelines.ground_truth import dataset_ground_truth
    from pipelines.simulator import SimulationConfig, Simulator, summarize_line

    config = SimulationConfig(requests=requests, seconds=3 * requests / rate, rate=rate, users=tuple(users))
    summary = Simulator(base, dataset_ground_truth(settings.dataset_path), config,
                        settings.api_key.get_secret_value()).run(progress=True).summary
    log.info("simulation: %s", summarize_line(summary))
    if summary.group_by != "arm":
        raise SystemExit(f"the answers of {base} carried no arm: the experiment did not load (see its serve log)")
    return {"simulated_requests": summary.requests, "simulated_failed_requests": summary.failed_requests,
            "simulated_seconds": round(summary.seconds, 2), "simulated_rate": rate,
            "simulated_events_sent": summary.events_sent, **ctr_keys(summary.groups)}


def promotion(base: str, client: redis.Redis, home: Path, users: list[int], target: ModelSet) -> tuple[float | None, int]:
    """Point the champion at ``target``; seconds until an answer (a cache miss: the user's entry
    deleted first) carries its versions (None: not within :data:`PROMOTION_MAX_S`), and how many
    requests failed meanwhile."""
    wanted = identity({"index": target.tags[BENTO_INDEX_MODEL],
                       "ranker": target.tags.get(BENTO_RANKER_MODEL, "absent")})
    failed, n = 0, 0
    with httpx.Client(base_url=base, timeout=10) as http:
        write_champion(target, home)
        promoted = time.monotonic()
        while time.monotonic() - promoted < PROMOTION_MAX_S:
            user = users[n % len(users)]
            n += 1
            client.delete(cache_key(user))
            try:
                reply = http.post("/recommend", json={"user_id": user, "k": 10})
            except httpx.HTTPError as exc:
                reply = httpx.Response(599, text=repr(exc))  # counted as failed, like a 5xx
            if reply.status_code != 200:
                failed += 1
                log.warning("/recommend failed during the promotion: %d %s", reply.status_code, reply.text[:300])
            elif identity(reply.json()["model_versions"]) == wanted:
                return time.monotonic() - promoted, failed
            time.sleep(POLL_S)
    log.error("no answer of %s within %.0f s of its promotion", wanted, PROMOTION_MAX_S)
    return None, failed


class OfflineWatch:
    """Looks for event ids in the offline events table's live files, reading each new or
    rewritten file once; ``seen`` is the time of the look that first found each id."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.known = self._files()  # what was there before: none of our events can be in it
        self.seen: dict[str, float] = {}

    def _files(self) -> dict[str, int]:
        out = {}
        for path in self.folder.glob("live-*.parquet"):
            try:
                out[path.name] = path.stat().st_mtime_ns
            except FileNotFoundError:  # replaced between the listing and the stat
                continue
        return out

    def look(self, wanted: Mapping[str, float]) -> None:
        now = time.time()
        for name, mtime in self._files().items():
            if self.known.get(name) == mtime:
                continue
            try:
                ids = pq.read_table(self.folder / name, columns=[S.COL_EVENT_ID]).column(0).to_pylist()
            except (FileNotFoundError, OSError):
                continue  # replaced while read: the next look reads the new one
            self.known[name] = mtime
            self.seen.update({i: now for i in ids if i in wanted and i not in self.seen})


def offline_log(settings: Settings, base: str, users: list[int], events: int, seconds: float) -> dict[str, Any]:
    """Phase 3's events: ``events`` VIEWs of ``users`` through ``/events`` over ``seconds``, then
    the offline table watched until all are seen or the flush period plus
    :data:`OFFLINE_GRACE_S` has passed since the last (:func:`offline_latencies`)."""
    items = pads.dataset(settings.dataset_path / "items").to_table(columns=[S.COL_ITEM]).column(0).to_numpy()
    rng = np.random.default_rng(1)
    watch = OfflineWatch(settings.dataset_path / "events")
    accepted: dict[str, float] = {}
    refused = 0
    headers = {"x-api-key": settings.api_key.get_secret_value()}
    started = time.monotonic()
    last_look = 0.0
    with httpx.Client(base_url=base, timeout=10, headers=headers) as http:
        for n in range(events):
            while (wait := started + n * seconds / events - time.monotonic()) > 0:
                if time.monotonic() - last_look >= OFFLINE_POLL_S:
                    watch.look(accepted)
                    last_look = time.monotonic()
                time.sleep(min(wait, OFFLINE_POLL_S))
            body = {"user_id": users[n % len(users)], "item_id": int(rng.choice(items)), "event_type": "VIEW"}
            reply = http.post("/events", json=body)
            if reply.status_code == 200 and reply.json().get("status") == "accepted":
                answer = reply.json()
                accepted[answer["event_id"]] = datetime.fromisoformat(answer["event_timestamp"]).timestamp()
            else:
                refused += 1
    deadline = time.monotonic() + settings.stream_offline_flush_s + OFFLINE_GRACE_S
    while len(watch.seen) < len(accepted) and time.monotonic() < deadline:
        watch.look(accepted)
        time.sleep(OFFLINE_POLL_S)
    out = {**offline_latencies(accepted, watch.seen), "events_refused": refused,
           "offline_flush_period_s": settings.stream_offline_flush_s}
    log.info("event -> offline: p50 %s s, p99 %s s, %d of %d not seen", out["event_to_offline_p50_s"],
             out["event_to_offline_p99_s"], out["events_missing_offline"], len(accepted))
    return out


def impression_counts(base: str) -> dict[str, int]:
    """The service's own impression counters (/metrics): sent to Kafka, and dropped (any reason)."""
    out = {"impressions_sent": 0.0, "impressions_dropped": 0.0}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        for key in out:
            if line.startswith(f"recsys_{key}_total"):
                out[key] += float(line.rsplit(" ", 1)[1])
    return {k: int(v) for k, v in out.items()}


# ---- the run ------------------------------------------------------------------------------------

def run(settings: Settings, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.effective_redis_url)
    home = workdir / "bentoml"
    first, second = prepare_store(home)
    experiment = write_experiment(workdir / "experiment.json")
    hit_users, event_users, rest = disjoint(active_users(settings, 10**9), [args.hit_users, args.events])
    poll_users = [u for u in rest if experiment.assign(u).name == "ranker"][:50]
    polled = set(poll_users)
    sim_users = [u for u in rest if u not in polled]
    # the service without impressions gets a copy of the home (the same tags, so the same cache entries):
    # BentoML empties a home's Prometheus folder when a service starts there, the other one's counters too
    off_home = shutil.copytree(home, workdir / "bentoml-off")
    common = {"RECSYS_EXPERIMENT_FILE": str(workdir / "experiment.json")}
    numbers: dict[str, Any] = {"service_workers": settings.service_workers, "experiment_arms": list(ARMS),
                               "model_reload_poll_s": settings.model_reload_poll_s}
    with service(settings, {**common, "BENTOML_HOME": str(home), "RECSYS_IMPRESSIONS": "on"},
                 workdir / "serve-impressions-on.log") as base:
        # the service without impressions lives for the hit phase only
        with service(settings, {**common, "BENTOML_HOME": str(off_home), "RECSYS_IMPRESSIONS": "off"},
                     workdir / "serve-impressions-off.log") as off:
            numbers.update(hit_path({"on": base, "off": off}, client, hit_users, args.rounds))
        numbers.update(arms(settings, base, sim_users, args.requests, args.rate))
        with ThreadPoolExecutor(1) as pool:
            events = pool.submit(offline_log, settings, base, event_users, args.events, args.event_seconds)
            took = [promotion(base, client, home, poll_users, target) for target in (second, first)]
            numbers.update(events.result())
        numbers.update(impression_counts(base))
    numbers.update(promotion_keys([t for t, _ in took]), promotion_failed_requests=sum(f for _, f in took))
    numbers.update(goals(numbers, settings.stream_offline_flush_s))
    return numbers


def plot(numbers: Mapping[str, Any], path: Path) -> None:
    """Per-arm CTR with its 95% interval, as bars with error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ctr = [numbers[f"ctr_{a}"] for a in ARMS]
    below = [c - numbers[f"ctr_{a}_ci_low"] for a, c in zip(ARMS, ctr)]
    above = [numbers[f"ctr_{a}_ci_high"] - c for a, c in zip(ARMS, ctr)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(ARMS, ctr, yerr=[below, above], capsize=6, color=["#bbbbbb", "#88aadd", "#3366aa"])
    ax.set_ylabel("CTR (clicks / items shown), 95% CI")
    ax.set_title(f"CTR per arm ({numbers['simulated_requests']:,} simulated requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="Simulated /recommend requests (all arms).")
    parser.add_argument("--rate", type=float, default=25.0, help="Simulated requests per second.")
    parser.add_argument("--hit-users", type=int, default=1000, help="Users of each cache-hit round.")
    parser.add_argument("--rounds", type=int, default=4, help="Cache-hit rounds per service (alternated).")
    parser.add_argument("--events", type=int, default=200, help="Events sent to time their offline append.")
    parser.add_argument("--event-seconds", type=float, default=60.0, help="...sent over this many seconds.")
    parser.add_argument("--quick", action="store_true",
                        help="A smoke run: 150 requests, 100 hit users, 2 rounds, 20 events over 10 s.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Write loop.json/.md/.png here instead of benchmarks/results/ (smoke runs).")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.hit_users, args.rounds, args.events, args.event_seconds = 150, 100, 2, 20, 10.0
    problems = [f"{name}={getattr(args, name)} must be >= 1" for name in ("requests", "hit_users", "rounds", "events")
                if getattr(args, name) < 1]
    problems += [f"{name}={getattr(args, name)} must be > 0" for name in ("rate", "event_seconds")
                 if not getattr(args, name) > 0]
    if problems:
        parser.error("; ".join(problems))
    configure_logging()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="recsys-bench-loop-") as tmp:
        numbers = run(load_settings(), args, Path(tmp))
    numbers["benchmark_s"] = round(time.monotonic() - started, 1)
    out = args.out if args.out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    plot(numbers, out / "loop.png")
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list) else str(v))
            for k, v in numbers.items()]
    path = write_results("loop", {k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()},
                         rows, folder=out,
                         notes="Two `bentoml serve` (one worker each) over a temporary copy of the served models, "
                               "a three-arm experiment (a third of the users each). hit_*: cache hits at "
                               "concurrency 1, the same users alternately against impressions on and off, medians "
                               "of the per-round p99s. ctr_*: the user simulator's clicks / items shown per arm, "
                               "95% Wilson intervals (impressions of one answer are not independent: the intervals "
                               "are somewhat narrow). promotion_to_served_s: champion pointer written -> first "
                               "answer (a cache miss) with the new versions, the slower of a promotion and its "
                               "undo. event_to_offline_*: /events acceptance -> first poll finding the event in "
                               "the offline events table (the demo's stream consumer). See docs/benchmarks.md.")
    log.info("wrote %s and loop.png", path)


if __name__ == "__main__":
    main()
