"""The synthetic generator: determinism, the statistics it promises, and nothing lost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.canonical import read_manifest, read_table
from pipelines.generator import GeneratorConfig, generate
from recsys import schema as S

CFG = GeneratorConfig(n_users=2_000, n_items=1_000, n_categories=10, chunk_users=700, bot_share=0.005,
                      power_user_share=0.001, malformed_share=0.01)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "synthetic"
    generate(CFG, out, progress=False)
    return out


@pytest.fixture(scope="module")
def events(dataset: Path) -> pd.DataFrame:
    return read_table(dataset, "events")


def test_same_seed_same_output(dataset: Path, tmp_path: Path) -> None:
    generate(CFG, tmp_path / "again", progress=False)
    for table in ("events", "items", "users", "rejects"):
        assert pq.read_table(dataset / table).equals(pq.read_table(tmp_path / "again" / table)), table


def test_other_seed_other_output(dataset: Path, tmp_path: Path) -> None:
    generate(replace(CFG, seed=7), tmp_path / "other", progress=False)
    assert not pq.read_table(dataset / "events").equals(pq.read_table(tmp_path / "other" / "events"))


def test_ids_and_times_in_range(dataset: Path, events: pd.DataFrame) -> None:
    assert events[S.COL_USER].between(1, CFG.n_users).all()
    assert events[S.COL_ITEM].between(1, CFG.n_items).all()
    assert events[S.COL_TS].min() >= pd.Timestamp(CFG.start) and events[S.COL_TS].max() < pd.Timestamp(CFG.end)
    assert events[S.COL_EVENT_ID].is_unique
    # generated events are not answers to anyone: no attribution (tables version 2 has the columns)
    assert events[S.COL_REQUEST_ID].isna().all() and events[S.COL_POSITION].isna().all()
    assert read_manifest(dataset).schema_version == S.TABLES_VERSION == 2
    items = read_table(dataset, "items")
    assert items[S.COL_ITEM].tolist() == list(range(1, CFG.n_items + 1))
    assert (items["inventory"] == 0).mean() == pytest.approx(CFG.out_of_stock_share, abs=0.02)


def test_popularity_follows_zipf(dataset: Path, events: pd.DataFrame) -> None:
    bots = set(read_manifest(dataset).params["bot_user_ids"])
    views = events[(events[S.COL_EVENT_TYPE] == "VIEW") & ~events[S.COL_USER].isin(bots)]
    counts = np.sort(views[S.COL_ITEM].value_counts().to_numpy())[::-1][:100]
    slope = np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0]
    assert -slope == pytest.approx(CFG.zipf_exponent, abs=0.1)


def test_steeper_exponent_is_measured(tmp_path: Path) -> None:
    cfg = replace(CFG, zipf_exponent=1.4, n_users=1_000, bot_share=0.0, power_user_share=0.0, malformed_share=0.0)
    generate(cfg, tmp_path / "steep", progress=False)
    views = read_table(tmp_path / "steep", "events").query("event_type == 'VIEW'")
    counts = np.sort(views[S.COL_ITEM].value_counts().to_numpy())[::-1][:50]
    slope = np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0]
    assert -slope == pytest.approx(1.4, abs=0.1)


def test_funnel_ratios(dataset: Path, events: pd.DataFrame) -> None:
    bots = set(read_manifest(dataset).params["bot_user_ids"])
    counts = events[~events[S.COL_USER].isin(bots)][S.COL_EVENT_TYPE].value_counts()
    # a few rejected (malformed) rows shift these by well under the tolerance
    assert counts["CLICK"] / counts["VIEW"] == pytest.approx(CFG.p_click, abs=0.01)
    assert counts["ADD_TO_CART"] / counts["CLICK"] == pytest.approx(CFG.p_add_to_cart, abs=0.02)
    assert counts["PURCHASE"] / counts["ADD_TO_CART"] == pytest.approx(CFG.p_purchase, abs=0.03)


def test_bots_are_exactly_the_fast_users(dataset: Path, events: pd.DataFrame) -> None:
    params = read_manifest(dataset).params
    assert len(params["bot_user_ids"]) == round(CFG.n_users * CFG.bot_share) == 10
    per_minute = (
        events.set_index(S.COL_TS).sort_index().groupby(S.COL_USER)[S.COL_EVENT_ID].rolling("60s").count()
    )
    fast = set(per_minute[per_minute > 100].index.get_level_values(0))
    assert fast == set(params["bot_user_ids"])


def test_power_users_have_over_10k_events(dataset: Path, events: pd.DataFrame) -> None:
    params = read_manifest(dataset).params
    per_user = events[S.COL_USER].value_counts()
    assert set(per_user[per_user > 10_000].index) == set(params["power_user_ids"])
    assert len(params["power_user_ids"]) == 2


def test_malformed_rows_counted_not_lost(dataset: Path, events: pd.DataFrame) -> None:
    manifest = read_manifest(dataset)
    rejects = read_table(dataset, "rejects")
    assert manifest.rejects == len(rejects) > 0
    assert sum(manifest.rejects_by_reason.values()) == manifest.rejects
    assert set(manifest.rejects_by_reason) == {
        "negative user_id", "item_id not in catalogue", "unknown event_type",
        "missing or unparseable event_timestamp", "negative value",
    }
    # event ids are numbered e1..eN over every generated row: good and rejected together
    ids = set(events[S.COL_EVENT_ID]) | {json.loads(r)[S.COL_EVENT_ID] for r in rejects["raw"]}
    assert ids == {f"e{i}" for i in range(1, len(ids) + 1)}
    assert manifest.rejects / (manifest.events + manifest.rejects) == pytest.approx(CFG.malformed_share, abs=0.003)


def test_new_items_have_no_events(dataset: Path, events: pd.DataFrame) -> None:
    items = read_table(dataset, "items")
    new = items[items[S.COL_CREATED_AT] >= pd.Timestamp(CFG.end) - pd.Timedelta(days=2)]
    assert len(new) > 0
    non_bot = events[~events[S.COL_USER].isin(read_manifest(dataset).params["bot_user_ids"])]
    assert not non_bot[S.COL_ITEM].isin(new[S.COL_ITEM]).any()


def test_invalid_config_names_the_fields() -> None:
    with pytest.raises(ValueError, match=r"n_users=0 must be >= 1.*p_click=1.5 must be within \[0, 1\]"):
        GeneratorConfig(n_users=0, p_click=1.5)
