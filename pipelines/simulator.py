"""The user simulator: synthetic users played against the running service over HTTP.

Each request picks a user of the synthetic dataset (seeded), asks ``/recommend`` for ``k`` items,
and lets the user click and buy among the answer with the ground truth's probabilities
(:mod:`pipelines.ground_truth`, the preferences the dataset's events were drawn from): per shown
item a click with :meth:`~pipelines.ground_truth.GroundTruth.click_probability`, then the
generator's funnel (ADD_TO_CART with ``p_add_to_cart``, PURCHASE with ``p_purchase`` after it).
Every CLICK, ADD_TO_CART and PURCHASE goes back through ``/events``, with the answer's
``request_id`` and the item's 1-based ``position`` when the answer carries a ``request_id``.

Requests are paced at a fixed rate and stop after a number of requests or of seconds, whichever
comes first. The summary counts requests, impressions (items shown), clicks and purchases, the
CTR (clicks per impression) overall and per group: per answer ``arm`` when answers carry one,
else per ``strategy`` of the slot; and the CTR the ground truth expected of what was shown.
A failed request or event is counted and the run goes on; an unreachable service, or a key the
service refuses, stops the run with an error that says what to fix.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import httpx
import numpy as np
from tqdm.auto import tqdm

from pipelines.generator import DEVICES
from pipelines.ground_truth import GroundTruth

log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The simulation cannot run (service unreachable, key refused); the message says what to do."""


@dataclass(frozen=True)
class SimulationConfig:
    """How long, how fast and how the simulated users ask. ``requests`` or ``seconds`` (or both:
    whichever is reached first) bounds the run; ``rate`` is requests per second (0: unpaced)."""

    requests: Optional[int] = 200
    seconds: Optional[float] = None
    rate: float = 20.0
    k: int = 10
    seed: int = 0
    users: Optional[tuple[int, ...]] = None  # only these users (default: every user of the dataset)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.requests is None and self.seconds is None:
            problems.append("give requests or seconds (or both) to bound the run")
        if self.requests is not None and self.requests < 1:
            problems.append(f"requests={self.requests} must be >= 1")
        if self.seconds is not None and not self.seconds > 0:
            problems.append(f"seconds={self.seconds} must be > 0")
        if self.rate < 0:
            problems.append(f"rate={self.rate} must be >= 0 (0: as fast as the service answers)")
        if not 1 <= self.k <= 100:
            problems.append(f"k={self.k} must be within [1, 100] (the service's bound)")
        if self.users is not None and not self.users:
            problems.append("users must not be empty (leave it out to use every user)")
        if problems:
            raise ValueError("invalid simulation config: " + "; ".join(problems))


@dataclass(frozen=True)
class Interaction:
    """One shown item and what the simulated user did with it."""

    request: int
    user_id: int
    item_id: int
    position: int  # 1-based
    strategy: str
    arm: Optional[str]
    click_probability: float
    clicked: bool
    purchased: bool


@dataclass
class GroupStats:
    impressions: int = 0
    clicks: int = 0
    purchases: int = 0
    expected_clicks: float = 0.0

    def add(self, shown: Interaction) -> None:
        self.impressions += 1
        self.clicks += shown.clicked
        self.purchases += shown.purchased
        self.expected_clicks += shown.click_probability

    def to_dict(self) -> dict[str, Any]:
        n = max(self.impressions, 1)
        return {"impressions": self.impressions, "clicks": self.clicks, "purchases": self.purchases,
                "ctr": self.clicks / n, "expected_ctr": self.expected_clicks / n}


@dataclass
class SimulationSummary:
    """What a run did; :meth:`to_dict` is the JSON the command writes."""

    base_url: str
    seed: int
    requests: int = 0
    failed_requests: int = 0
    events_sent: int = 0
    events_failed: int = 0
    with_request_id: int = 0  # answers that carried a request_id (their events carry it back)
    seconds: float = 0.0
    group_by: str = "strategy"
    overall: GroupStats = field(default_factory=GroupStats)
    groups: dict[str, GroupStats] = field(default_factory=lambda: defaultdict(GroupStats))

    @property
    def ctr(self) -> float:
        return self.overall.clicks / max(self.overall.impressions, 1)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("overall", "groups")}
        out.update(self.overall.to_dict())
        out["per_" + self.group_by] = {name: g.to_dict() for name, g in sorted(self.groups.items())}
        return out


@dataclass
class SimulationResult:
    summary: SimulationSummary
    interactions: list[Interaction]


class Simulator:
    """Plays the ground truth's users against the service at ``base_url`` (see the module doc)."""

    def __init__(self, base_url: str, truth: GroundTruth, config: SimulationConfig, api_key: str,
                 client: Optional[httpx.Client] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.truth = truth
        self.config = config
        self.api_key = api_key
        self.users = np.asarray(config.users if config.users is not None else truth.user_ids, dtype=np.int64)
        for user in self.users[:1_000]:  # a clear error for a user the ground truth lacks, early
            truth.category_affinity(int(user))
        self._client = client

    def run(self, progress: bool = True) -> SimulationResult:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        summary = SimulationSummary(self.base_url, cfg.seed)
        interactions: list[Interaction] = []
        client = self._client or httpx.Client(base_url=self.base_url, timeout=cfg.timeout_s)
        try:
            self._check_reachable(client)
            started = time.monotonic()
            bar = tqdm(total=cfg.requests, desc="simulating users", unit="req", disable=not progress)
            with bar:
                while not self._done(summary.requests, started):
                    self._pace(summary.requests, started)
                    shown = self._one_request(client, rng, summary)
                    interactions.extend(shown)
                    bar.update(1)
            summary.seconds = time.monotonic() - started
        finally:
            if self._client is None:
                client.close()
        if any(i.arm is not None for i in interactions):
            summary.group_by = "arm"
        for shown in interactions:
            summary.overall.add(shown)
            summary.groups[(shown.arm or "none") if summary.group_by == "arm" else shown.strategy].add(shown)
        summary.groups = dict(summary.groups)
        log.info("simulated %d requests: %d impressions, %d clicks, CTR %.4f", summary.requests,
                 summary.overall.impressions, summary.overall.clicks, summary.ctr)
        return SimulationResult(summary, interactions)

    # ---- steps ---------------------------------------------------------------------------------

    def _check_reachable(self, client: httpx.Client) -> None:
        try:
            client.get("/readyz")
        except httpx.HTTPError as exc:
            raise SimulationError(f"the service at {self.base_url} is not reachable ({exc}): start it with "
                                  "`recsys stack up --only service` (or `make demo`), or pass --url") from exc

    def _done(self, requests: int, started: float) -> bool:
        cfg = self.config
        return ((cfg.requests is not None and requests >= cfg.requests)
                or (cfg.seconds is not None and time.monotonic() - started >= cfg.seconds))

    def _pace(self, requests: int, started: float) -> None:
        """Request n starts no earlier than n / rate seconds after the first: a steady rate that
        catches up after a slow answer instead of drifting."""
        if self.config.rate > 0:
            wait = started + requests / self.config.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)

    def _one_request(self, client: httpx.Client, rng: np.random.Generator,
                     summary: SimulationSummary) -> list[Interaction]:
        cfg = self.config
        number = summary.requests
        summary.requests += 1
        # every draw of a request is made up front, so a failed request does not shift the next ones
        user = int(self.users[rng.integers(len(self.users))])
        device = DEVICES[int(rng.integers(len(DEVICES)))]
        draws = rng.random((cfg.k, 4))
        try:
            reply = client.post("/recommend", json={"user_id": user, "k": cfg.k, "context": {"device": device}})
            reply.raise_for_status()
            answer = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            summary.failed_requests += 1
            log.warning("/recommend for user %d failed: %s", user, exc)
            return []
        items = answer.get("items", [])[: cfg.k]
        request_id, arm = answer.get("request_id"), answer.get("arm")
        summary.with_request_id += request_id is not None
        ids = [int(i["item_id"]) for i in items]
        p_click = self.truth.click_probability(user, ids)
        shown = []
        for pos, (item, p) in enumerate(zip(items, p_click), start=1):
            u_click, u_cart, u_buy, u_qty = draws[pos - 1]
            clicked = bool(u_click < p)
            carted = clicked and bool(u_cart < self.truth.cfg.p_add_to_cart)
            bought = carted and bool(u_buy < self.truth.cfg.p_purchase)
            quantity = float(1 + int(u_qty * 3))  # 1..3, as the generator's quantities
            base = {"user_id": user, "item_id": int(item["item_id"]), "session_id": f"sim-{cfg.seed}-{user}",
                    "context": {"device": device}}
            if request_id is not None:
                base.update(request_id=request_id, position=pos)
            for kind, happened in (("CLICK", clicked), ("ADD_TO_CART", carted), ("PURCHASE", bought)):
                if happened:
                    body = {**base, "event_type": kind, **({"value": quantity} if kind != "CLICK" else {})}
                    self._send_event(client, body, summary)
            shown.append(Interaction(number, user, int(item["item_id"]), pos, str(item.get("strategy", "unknown")),
                                     None if arm is None else str(arm), float(p), clicked, bought))
        return shown

    def _send_event(self, client: httpx.Client, body: dict[str, Any], summary: SimulationSummary) -> None:
        try:
            reply = client.post("/events", json=body, headers={"x-api-key": self.api_key})
        except httpx.HTTPError as exc:
            summary.events_failed += 1
            log.warning("/events failed: %s", exc)
            return
        if reply.status_code == 401:
            raise SimulationError("the service refused the API key for /events: set RECSYS_API_KEY to the "
                                  "service's key (or pass --api-key)")
        if reply.status_code == 200 and reply.json().get("status") == "accepted":
            summary.events_sent += 1
        else:
            summary.events_failed += 1
            log.warning("/events answered %d: %s", reply.status_code, reply.text[:200])


def summarize_line(summary: SimulationSummary) -> str:
    """One line for a terminal: the counts, the CTR overall and per group."""
    groups = ", ".join(f"{name} {g.clicks / max(g.impressions, 1):.3f} ({g.impressions:,} shown)"
                       for name, g in sorted(summary.groups.items()))
    return (f"{summary.requests:,} requests ({summary.failed_requests:,} failed), "
            f"{summary.overall.impressions:,} impressions, {summary.overall.clicks:,} clicks, "
            f"{summary.overall.purchases:,} purchases; CTR {summary.ctr:.3f} "
            f"(ground truth expected {summary.overall.expected_clicks / max(summary.overall.impressions, 1):.3f}); "
            f"per {summary.group_by}: {groups or 'none'}; {summary.events_sent:,} events sent "
            f"({summary.events_failed:,} failed) in {summary.seconds:.1f} s")


def user_ids(values: Sequence[int] | None) -> Optional[tuple[int, ...]]:
    """A ``--user`` list as the config's tuple (None: every user)."""
    return tuple(int(v) for v in values) if values else None
