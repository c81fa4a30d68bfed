"""A deterministic synthetic e-commerce clickstream: the platform's embedded default dataset.

What it models, all from one seed and an explicit end time (so the output is reproducible):

- a catalogue of ``n_items`` items in ``n_categories`` categories with tags, prices, margins,
  quality scores and stock (a share out of stock), and a share of brand-new items with no events;
- item popularity that follows a Zipf law with exponent ``zipf_exponent`` over popularity ranks;
- users with a lognormal activity level and two preferred categories; a view lands in a preferred
  category with probability ``personalization``. Preferred categories are drawn in proportion to
  their Zipf mass, so the overall item popularity stays exactly Zipf;
- sessions of views, each view continuing down the funnel VIEW -> CLICK -> ADD_TO_CART ->
  PURCHASE with the configured conditional probabilities;
- injected bots (bursts of over 100 views within a minute), power users (over 10,000 events) and
  a share of malformed rows, which validation moves to ``rejects`` with a reason.

Users are generated in chunks with a chunk-keyed random stream, so memory stays bounded at any
size and the output does not depend on how fast the machine is. The users' preferred categories
are exposed (:func:`preferred_categories`) for the ground truth in ``pipelines/ground_truth.py``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipelines.canonical import CanonicalWriter, Manifest, validate_events
from recsys import schema as S

log = logging.getLogger(__name__)

DEVICES = ("mobile", "desktop", "tablet")
LOCATIONS = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "CA")
REFERRERS = ("direct", "search", "social", "email")
OCCUPATIONS = ("engineer", "student", "teacher", "artist", "doctor", "sales", "retired", "other")
DEFAULT_END = datetime(2026, 11, 1, tzinfo=timezone.utc)
_US = 1_000_000  # microseconds per second


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the synthetic dataset. The defaults are the demo's dataset, sized to keep `make demo` short."""

    n_users: int = 10_000
    n_items: int = 5_000
    n_categories: int = 20
    tags_per_category: int = 8
    days: int = 30
    end: datetime = DEFAULT_END
    seed: int = 42
    zipf_exponent: float = 1.0
    personalization: float = 0.7
    mean_sessions: float = 5.0
    mean_views_per_session: float = 5.0
    p_click: float = 0.3
    p_add_to_cart: float = 0.3
    p_purchase: float = 0.5
    out_of_stock_share: float = 0.05
    new_item_share: float = 0.01
    bot_share: float = 0.002
    bot_burst_events: int = 150
    power_user_share: float = 0.0005
    power_user_events: int = 12_000
    malformed_share: float = 0.001
    chunk_users: int = 20_000
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_users", "n_items", "n_categories", "tags_per_category", "days", "chunk_users"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("personalization", "p_click", "p_add_to_cart", "p_purchase", "out_of_stock_share",
                     "new_item_share", "bot_share", "power_user_share", "malformed_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be within [0, 1]")
        if self.zipf_exponent <= 0:
            problems.append(f"zipf_exponent={self.zipf_exponent} must be > 0")
        if self.n_categories > self.n_items:
            problems.append(f"n_categories={self.n_categories} must not exceed n_items={self.n_items}")
        if self.bot_burst_events <= 100:
            problems.append(f"bot_burst_events={self.bot_burst_events} must be > 100 (a bot is over 100 a minute)")
        if self.end.tzinfo is None:
            problems.append("end must be timezone-aware (UTC)")
        if problems:
            raise ValueError("invalid generator config: " + "; ".join(problems))

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.days)


@dataclass(frozen=True)
class Catalogue:
    """What the event generator needs to know about items, as arrays indexed by item id - 1."""

    category: np.ndarray  # int64, category of each item
    weight: np.ndarray  # float64, Zipf weight (0 for brand-new items)
    cat_items: list[np.ndarray]  # item ids per category
    cat_cdf: list[np.ndarray]  # cumulative weights within each category
    global_cdf: np.ndarray
    cat_mass_cdf: np.ndarray  # cumulative category mass, to draw preferred categories


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)


def build_catalogue(cfg: GeneratorConfig) -> tuple[pa.Table, Catalogue]:
    """The items table and the sampling structures; item ids are 1..n_items."""
    rng = _rng(cfg.seed, 0)
    n = cfg.n_items
    ids = np.arange(1, n + 1, dtype=np.int64)
    # popularity rank is a random permutation of ids, so id order says nothing about popularity
    rank = rng.permutation(n) + 1
    weight = rank.astype(np.float64) ** -cfg.zipf_exponent
    new = rng.random(n) < cfg.new_item_share
    weight[new] = 0.0
    category = rng.integers(0, cfg.n_categories, n).astype(np.int64)
    category[: cfg.n_categories] = np.arange(cfg.n_categories)  # every category has an item

    start_us = int(cfg.start.timestamp() * _US)
    end_us = int(cfg.end.timestamp() * _US)
    created = start_us - rng.integers(0, 365 * 86_400 * _US, n)
    created[new] = end_us - rng.integers(0, 2 * 86_400 * _US, int(new.sum()))

    k = cfg.tags_per_category
    n_tags = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(n_tags)])
    tag_local = rng.integers(0, k, int(offsets[-1]))
    tag_cat = np.repeat(category, n_tags)
    tag_strings = pc.binary_join_element_wise(
        "c", pc.cast(pa.array(tag_cat), pa.string()), "-t", pc.cast(pa.array(tag_local), pa.string()), ""
    )
    tags = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tag_strings)

    price = np.round(np.exp(rng.normal(3.0, 1.0, n)), 2)
    margin = np.round(rng.beta(2.0, 5.0, n), 3)
    quality = np.round(np.clip(rng.normal(3.8, 0.8, n), 0.0, 5.0), 2)
    inventory = rng.integers(1, 500, n)
    inventory[rng.random(n) < cfg.out_of_stock_share] = 0
    id_str = pc.cast(pa.array(ids), pa.string())
    items = pa.table(
        {
            S.COL_ITEM: ids,
            "title": pc.binary_join_element_wise("Item ", id_str, ""),
            S.COL_CATEGORY: category,
            "tags": tags,
            "price": price,
            "margin": margin,
            "quality_score": quality,
            "inventory": inventory.astype(np.int64),
            S.COL_CREATED_AT: pa.array(created, S.TS_TYPE),
            "image_url": pc.binary_join_element_wise("https://img.example.com/items/", id_str, ".jpg", ""),
        },
        schema=S.ITEMS_SCHEMA,
    )

    cat_items, cat_cdf, cat_mass = [], [], np.zeros(cfg.n_categories)
    order = np.argsort(category, kind="stable")
    bounds = np.searchsorted(category[order], np.arange(cfg.n_categories + 1))
    for c in range(cfg.n_categories):
        members = order[bounds[c] : bounds[c + 1]]
        cat_items.append(ids[members])
        cat_cdf.append(np.cumsum(weight[members]))
        cat_mass[c] = weight[members].sum()
    catalogue = Catalogue(category, weight, cat_items, cat_cdf, np.cumsum(weight), np.cumsum(cat_mass))
    return items, catalogue


def _users_table(cfg: GeneratorConfig) -> pa.Table:
    rng = _rng(cfg.seed, 1)
    n = cfg.n_users
    start_us = int(cfg.start.timestamp() * _US)
    gender = np.array(["F", "M", None], dtype=object)[rng.choice(3, n, p=[0.48, 0.48, 0.04])]
    zips = pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 100_000, n)), pa.string()), 5, "0")
    return pa.table(
        {
            S.COL_USER: np.arange(1, n + 1, dtype=np.int64),
            "age": rng.integers(16, 75, n).astype(np.int64),
            "gender": pa.array(gender, pa.string()),
            "occupation": pa.array(np.array(OCCUPATIONS)[rng.integers(0, len(OCCUPATIONS), n)]),
            "zip_code": zips,
            S.COL_CREATED_AT: pa.array(start_us - rng.integers(0, 365 * 86_400 * _US, n), S.TS_TYPE),
        },
        schema=S.USERS_SCHEMA,
    )


def _role_masks(cfg: GeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Which user ids (index = id - 1) are bots and which are power users (disjoint)."""
    rng = _rng(cfg.seed, 2)
    n = cfg.n_users
    n_bots = int(round(n * cfg.bot_share))
    n_power = int(round(n * cfg.power_user_share))
    chosen = rng.permutation(n)[: n_bots + n_power]
    bots = np.zeros(n, dtype=bool)
    power = np.zeros(n, dtype=bool)
    bots[chosen[:n_bots]] = True
    power[chosen[n_bots:]] = True
    return bots, power


def _chunk_events(cfg: GeneratorConfig, cat: Catalogue, lo: int, hi: int, bots: np.ndarray, power: np.ndarray,
                  chunk: int, prefs_only: bool = False) -> pd.DataFrame | np.ndarray:
    """Raw events of users lo+1..hi (one chunk), before validation; with ``prefs_only``, only the
    users' preferred categories, (users, 2), drawn from the same stream (no events drawn)."""
    rng = _rng(cfg.seed, 3, chunk)
    users = np.arange(lo + 1, hi + 1, dtype=np.int64)
    n = len(users)
    start_us = int(cfg.start.timestamp() * _US)
    span_us = int(cfg.days * 86_400 * _US)
    is_bot, is_power = bots[lo:hi], power[lo:hi]

    # sessions per user: lognormal activity; power users get enough sessions for their quota
    activity = rng.lognormal(-0.5, 1.0, n)
    n_sessions = np.maximum(rng.poisson(cfg.mean_sessions * activity), 1)
    per_session_power = 20
    n_sessions[is_power] = cfg.power_user_events // per_session_power + 1
    n_sessions[is_bot] = 0
    s_user = np.repeat(users, n_sessions)
    s_index = np.arange(len(s_user)) - np.repeat(np.cumsum(n_sessions) - n_sessions, n_sessions)
    s_power = np.repeat(is_power, n_sessions)
    # sessions start early enough to end before cfg.end (a power user's session lasts ~15 min)
    s_start = start_us + rng.integers(0, span_us - 2 * 3600 * _US, len(s_user))
    s_views = np.where(s_power, per_session_power, 1 + rng.poisson(cfg.mean_views_per_session - 1, len(s_user)))
    s_device = rng.integers(0, len(DEVICES), len(s_user))
    s_location = rng.integers(0, len(LOCATIONS), len(s_user))
    s_referrer = rng.integers(0, len(REFERRERS), len(s_user))

    # views: item from a preferred category (personalization) or from the whole catalogue
    prefs = _draw(cat.cat_mass_cdf, rng.random((n, 2)))
    if prefs_only:
        return prefs
    v_session = np.repeat(np.arange(len(s_user)), s_views)
    v_user = s_user[v_session]
    v_pref = prefs[v_user - lo - 1, rng.integers(0, 2, len(v_user))]
    personal = rng.random(len(v_user)) < cfg.personalization
    v_item = np.empty(len(v_user), dtype=np.int64)
    glob = ~personal
    v_item[glob] = _draw(cat.global_cdf, rng.random(int(glob.sum()))) + 1
    for c in np.unique(v_pref[personal]):
        sel = personal & (v_pref == c)
        v_item[sel] = cat.cat_items[c][_draw(cat.cat_cdf[c], rng.random(int(sel.sum())))]
    gaps = rng.exponential(45.0, len(v_user)) * _US
    first_in_session = np.r_[True, v_session[1:] != v_session[:-1]]
    gap_cum = np.cumsum(gaps)
    session_base = np.maximum.accumulate(np.where(first_in_session, gap_cum - gaps, 0))
    v_ts = s_start[v_session] + (gap_cum - session_base).astype(np.int64)

    # funnel: each step a few seconds after the previous one
    click = rng.random(len(v_user)) < cfg.p_click
    cart = click & (rng.random(len(v_user)) < cfg.p_add_to_cart)
    buy = cart & (rng.random(len(v_user)) < cfg.p_purchase)
    quantity = rng.integers(1, 4, len(v_user)).astype(np.float64)
    parts = [(np.ones(len(v_user), bool), "VIEW", 0)]
    parts += [(click, "CLICK", 5), (cart, "ADD_TO_CART", 20), (buy, "PURCHASE", 60)]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "type", "value", "ts", "session")}
    for mask, etype, delay_s in parts:
        cols["user"].append(v_user[mask])
        cols["item"].append(v_item[mask])
        cols["type"].append(np.full(int(mask.sum()), S.EVENT_TYPES.index(etype), np.int8))
        cols["value"].append(quantity[mask] if etype in ("ADD_TO_CART", "PURCHASE") else np.full(int(mask.sum()), np.nan))
        cols["ts"].append(v_ts[mask] + delay_s * _US)
        cols["session"].append(v_session[mask])

    # bots: bursts of views on random items, all within one minute
    bot_users = users[is_bot]
    if len(bot_users):
        b = cfg.bot_burst_events
        burst_user = np.repeat(bot_users, b)
        burst_start = np.repeat(start_us + rng.integers(0, span_us, len(bot_users)), b)
        cols["user"].append(burst_user)
        cols["item"].append(rng.integers(1, cfg.n_items + 1, len(burst_user)))
        cols["type"].append(np.zeros(len(burst_user), np.int8))
        cols["value"].append(np.full(len(burst_user), np.nan))
        cols["ts"].append(burst_start + np.sort(rng.integers(0, 59 * _US, (len(bot_users), b)), axis=1).ravel())
        cols["session"].append(np.full(len(burst_user), -1))  # bots have no session

    user_arr = np.concatenate(cols["user"])
    session_arr = np.concatenate(cols["session"])
    sess_ok = session_arr >= 0
    safe_session = np.where(sess_ok, session_arr, 0)
    device = np.where(sess_ok, s_device[safe_session], 0) if len(s_user) else np.zeros(len(user_arr), np.int64)
    location = np.where(sess_ok, s_location[safe_session], 0) if len(s_user) else np.zeros(len(user_arr), np.int64)
    referrer = np.where(sess_ok, s_referrer[safe_session], 0) if len(s_user) else np.zeros(len(user_arr), np.int64)
    session_no = np.where(sess_ok, s_index[safe_session], -1) if len(s_user) else np.full(len(user_arr), -1)

    frame = pd.DataFrame(
        {
            S.COL_USER: user_arr,
            S.COL_ITEM: np.concatenate(cols["item"]),
            "_type": np.concatenate(cols["type"]),
            S.COL_VALUE: np.concatenate(cols["value"]),
            "_ts": np.minimum(np.concatenate(cols["ts"]), int(cfg.end.timestamp() * _US) - 1),
            "_session": session_no,
            "_device": device,
            "_location": location,
            "_referrer": referrer,
        }
    )
    frame.sort_values([S.COL_USER, "_ts"], inplace=True, kind="stable", ignore_index=True)
    return frame


def _finish_chunk(cfg: GeneratorConfig, frame: pd.DataFrame, first_id: int, chunk: int) -> pd.DataFrame:
    """Turn a sorted chunk into raw canonical rows, then corrupt a share of them on purpose."""
    rng = _rng(cfg.seed, 4, chunk)
    n = len(frame)
    event_id = pc.binary_join_element_wise("e", pc.cast(pa.array(np.arange(first_id, first_id + n)), pa.string()), "")
    session = pc.if_else(
        pa.array(frame["_session"].to_numpy() >= 0),
        pc.binary_join_element_wise(pc.cast(pa.array(frame[S.COL_USER].to_numpy()), pa.string()),
                                    pc.cast(pa.array(frame["_session"].to_numpy()), pa.string()), "-"),
        pa.nulls(n, pa.string()),
    )
    context = pa.StructArray.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array(frame["_device"].to_numpy(np.int32)), pa.array(DEVICES)).cast(pa.string()),
            pa.DictionaryArray.from_arrays(pa.array(frame["_location"].to_numpy(np.int32)), pa.array(LOCATIONS)).cast(pa.string()),
            pa.DictionaryArray.from_arrays(pa.array(frame["_referrer"].to_numpy(np.int32)), pa.array(REFERRERS)).cast(pa.string()),
        ],
        fields=list(S.CONTEXT_TYPE),
    )
    out = pd.DataFrame(
        {
            S.COL_EVENT_ID: event_id.to_numpy(zero_copy_only=False),
            S.COL_USER: frame[S.COL_USER].to_numpy(),
            S.COL_ITEM: frame[S.COL_ITEM].to_numpy(),
            S.COL_EVENT_TYPE: np.array(S.EVENT_TYPES, dtype=object)[frame["_type"].to_numpy()],
            S.COL_VALUE: frame[S.COL_VALUE].to_numpy(),
            S.COL_TS: pd.to_datetime(frame["_ts"].to_numpy(), unit="us", utc=True),
            S.COL_SESSION: session.to_numpy(zero_copy_only=False),
            S.COL_CONTEXT: context.to_pandas(),
        }
    )
    bad = np.flatnonzero(rng.random(n) < cfg.malformed_share)
    if len(bad):
        # each bad value stays representable in its column's dtype, so no column becomes object
        kind = rng.integers(0, 5, len(bad))
        out.loc[bad[kind == 0], S.COL_USER] = -1
        out.loc[bad[kind == 1], S.COL_ITEM] = cfg.n_items + 1_000_000
        out.loc[bad[kind == 2], S.COL_EVENT_TYPE] = "UNKNOWN"
        out.loc[bad[kind == 3], S.COL_TS] = pd.NaT
        out.loc[bad[kind == 4], S.COL_VALUE] = -1.0
    return out


def preferred_categories(cfg: GeneratorConfig) -> np.ndarray:
    """Each user's two preferred categories, int64 (n_users, 2), row ``u - 1`` for user id ``u``:
    the ones :func:`generate` draws the user's views from (the same random streams, replayed)."""
    _, cat = build_catalogue(cfg)
    bots, power = _role_masks(cfg)
    return np.concatenate([
        _chunk_events(cfg, cat, lo, min(lo + cfg.chunk_users, cfg.n_users), bots, power, chunk, prefs_only=True)
        for chunk, lo in enumerate(range(0, cfg.n_users, cfg.chunk_users))])


def generate(cfg: GeneratorConfig, out_dir: Path, progress: bool = True) -> Manifest:
    """Write the synthetic dataset to ``out_dir`` (canonical layout) and return its manifest."""
    items, catalogue = build_catalogue(cfg)
    bots, power = _role_masks(cfg)
    known_items = np.arange(1, cfg.n_items + 1, dtype=np.int64)
    params = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(cfg).items()}
    params["bot_user_ids"] = (np.flatnonzero(bots) + 1).tolist()
    params["power_user_ids"] = (np.flatnonzero(power) + 1).tolist()
    end_ts = pd.Timestamp(cfg.end)
    next_id = 1
    with CanonicalWriter(out_dir, source="synthetic", params=params) as writer:
        writer.add_items(items)
        writer.add_users(_users_table(cfg))
        chunks = range(0, cfg.n_users, cfg.chunk_users)
        for chunk, lo in enumerate(tqdm(chunks, desc="generating events", unit="chunk", disable=not progress)):
            hi = min(lo + cfg.chunk_users, cfg.n_users)
            frame = _chunk_events(cfg, catalogue, lo, hi, bots, power, chunk)
            raw = _finish_chunk(cfg, frame, next_id, chunk)
            next_id += len(raw)
            events, rejects = validate_events(raw, known_items=known_items, max_ts=end_ts)
            writer.add_events(events)
            writer.add_rejects(rejects)
    return writer.manifest
