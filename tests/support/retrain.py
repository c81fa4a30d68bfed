"""Datasets for the retrain and gate tests: a small synthetic one (:func:`small_dataset`) and a copy
whose history before a time has its item ids shuffled across events (:func:`degraded_copy`)."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.canonical import table_path
from pipelines.generator import GeneratorConfig, generate
from recsys import schema as S
from recsys.config import Settings

END = datetime(2026, 1, 10, tzinfo=timezone.utc)


def small_dataset(settings: Settings, n_users: int = 150, n_items: int = 60, days: int = 10) -> Settings:
    """A synthetic dataset ending at :data:`END` (no bots, no power users: a clean signal)."""
    generate(GeneratorConfig(n_users=n_users, n_items=n_items, n_categories=5, days=days, end=END, bot_share=0.0,
                             power_user_share=0.0), settings.dataset_path, progress=False)
    return settings


def degraded_copy(settings: Settings, dataset: str, before: datetime, seed: int = 0) -> Settings:
    """A copy of the active dataset named ``dataset`` whose events before ``before`` have their
    item ids permuted across those events (the history says nothing about taste any more); the
    events from ``before`` on are untouched."""
    target = settings.with_overrides(dataset=dataset)
    shutil.copytree(settings.dataset_path, target.dataset_path)
    folder = table_path(target.dataset_path, "events")
    files = sorted(folder.rglob("*.parquet"))
    for path in files:
        table = pq.read_table(path)
        items = table.column(S.COL_ITEM).to_numpy().copy()
        old = table.column(S.COL_TS).to_numpy() < np.datetime64(before.replace(tzinfo=None), "us")
        items[old] = np.random.default_rng(seed).permutation(items[old])
        table = table.set_column(table.schema.get_field_index(S.COL_ITEM), S.COL_ITEM, pa.array(items, pa.int64()))
        pq.write_table(table, path, coerce_timestamps="us")
    return target
