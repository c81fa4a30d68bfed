"""Helpers for the serving tests: the small FAISS index of the feature workspace, its active
users, and scorers injected into a real engine (pure logic standing in for the ranker: one that
blocks until released, one that sleeps a known time and counts its calls)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.als import Factors
from models.retrieval import RetrievalIndex
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from tests.support.feature_workspace import N_ITEMS, N_USERS, vector


def build_index(folder: Path) -> Path:
    """The workspace's ALS-like vectors (``vector(u)``, ``vector(i, 0.1)``) as a retrieval index."""
    users = np.arange(1, N_USERS + 1)
    items = np.arange(1, N_ITEMS + 1)
    factors = Factors(users, np.array([vector(int(u)) for u in users], np.float32), items,
                      np.array([vector(int(i), 0.1) for i in items], np.float32), datetime(2026, 1, 4, tzinfo=timezone.utc))
    RetrievalIndex.build(factors).save(folder)
    return folder


def personalised_users(settings: Settings, at_least: int = 10) -> list[int]:
    """Users whose latest profile has at least ``at_least`` events (personalised answers), by id."""
    profiles = pd.read_parquet(T.table_path(settings, T.USER_PROFILE))
    latest = profiles.sort_values(S.COL_TS).groupby(S.COL_USER).tail(1)
    return sorted(int(u) for u in latest.loc[latest["n_events"] >= at_least, S.COL_USER])


class GateScorer:
    """A ranker that blocks until :attr:`gate` is set (at most ``max_wait_s``, so a failing test
    never hangs), then scores every candidate 0; counts the calls that started."""

    version = "gated"

    def __init__(self, max_wait_s: float = 60.0) -> None:
        self.gate = threading.Event()
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self.calls = 0

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        with self._lock:
            self.calls += 1
        self.gate.wait(self.max_wait_s)
        return np.zeros(len(item_ids))


class SleepScorer:
    """A ranker that sleeps ``seconds`` per call and counts its calls (scores: 0)."""

    version = "sleepy"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()  # calls come from several ranker threads at once
        self.calls = 0

    def score(self, user: Mapping[str, Any], items: Mapping[str, Sequence[Any]], item_ids: np.ndarray,
              strategy_scores: np.ndarray, context: Mapping[str, Any]) -> np.ndarray:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        return np.zeros(len(item_ids))


def wait_until(condition: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout_s`` (a margin for a
    loaded machine, not a latency claim)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
