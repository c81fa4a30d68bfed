"""A small feature workspace on the real stack, shared by the feature-store and notebook tests.

A synthetic dataset, its daily snapshots, hand-written rows for user 1001 (point-in-time cases),
ALS-like embeddings, the real `feast apply`, then materialize.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import feature_store as fs
from pipelines.batch_features import DayRange, run_batch_features
from pipelines.generator import GeneratorConfig, generate
from recsys import feature_tables as T
from recsys import schema as S
from recsys.config import Settings
from recsys.spark import get_spark

END = datetime(2026, 1, 4, tzinfo=timezone.utc)
T1 = datetime(2025, 6, 1, tzinfo=timezone.utc)
T2 = datetime(2025, 6, 3, tzinfo=timezone.utc)
HAND_USER = 1001
N_USERS, N_ITEMS, DIM = 30, 40, 4


def _write(settings: Settings, table: str, rows: list[dict], partition: str | None = None) -> None:
    folder = T.table_path(settings, table)
    if partition:
        folder = folder / f"{T.SNAPSHOT_DATE}={partition}"
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for col in (S.COL_TS, T.CREATED):
        frame[col] = pd.to_datetime(frame[col], utc=True).dt.as_unit("us")
    schema = T.table_schema(table)
    for f in schema:
        if f.name not in frame:
            frame[f.name] = None
    table_ = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table_, folder / f"part-hand-{uuid.uuid4().hex[:6]}.parquet", coerce_timestamps="us")


def _profile(n_events: int, ts: datetime) -> dict:
    return {S.COL_USER: HAND_USER, S.COL_TS: ts, T.CREATED: ts, "n_events": n_events, "top_categories": [1]}


def vector(entity: int, scale: float = 1.0) -> list[float]:
    return [float(entity) * scale, 1.0, 0.5, -1.0][:DIM]


def build_feature_workspace(stack_settings: Settings, tmp: Path) -> Settings:
    settings = stack_settings.with_overrides(
        data_dir=tmp / "data", dataset="fs", feast_project=f"t{uuid.uuid4().hex[:8]}")
    generate(GeneratorConfig(n_users=N_USERS, n_items=N_ITEMS, n_categories=5, days=3, end=END,
                             bot_share=0.0, power_user_share=0.0), settings.dataset_path, progress=False)
    run_batch_features(get_spark(settings), settings, END, DayRange.ending_at(END, 3))
    T.ensure_tables(settings)
    # user 1001: a profile written at T1 and changed at T2, outside the batch job's days
    _write(settings, T.USER_PROFILE, [_profile(10, T1)], partition=T1.date().isoformat())
    _write(settings, T.USER_PROFILE, [_profile(20, T2)], partition=T2.date().isoformat())
    _write(settings, T.USER_EMBEDDING, [
        {S.COL_USER: HAND_USER, S.COL_TS: T1, T.CREATED: T1, "embedding": [1.0, 0.0, 0.0, 0.0]},
        {S.COL_USER: HAND_USER, S.COL_TS: T2, T.CREATED: T2, "embedding": [2.0, 0.0, 0.0, 0.0]},
        *[{S.COL_USER: u, S.COL_TS: END, T.CREATED: END, "embedding": vector(u)} for u in range(1, N_USERS + 1)],
    ])
    _write(settings, T.ITEM_EMBEDDING, [
        {S.COL_ITEM: i, S.COL_TS: END, T.CREATED: END, "embedding": vector(i, 0.1)} for i in range(1, N_ITEMS + 1)])
    fs.apply(settings)
    fs.materialize(settings, datetime(2024, 1, 1, tzinfo=timezone.utc), END)
    return settings
