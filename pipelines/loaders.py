"""Loaders from MovieLens layouts to the canonical tables.

- ``ml-100k``: ``u.data`` (user, item, rating, unix time; tabs), ``u.item`` and ``u.user`` (pipes).
- ``ml-csv``: ``ratings.csv``, ``movies.csv`` and optional ``tags.csv`` (ml-latest, ml-25m).

Ratings become RATING events with the rating as ``value``. Genres become the item's category
(the first genre listed, in u.genre order) and its tags (all genres, plus the most used user tags
for the CSV layout). MovieLens has no price, margin, quality or stock: those fields get the neutral
values of :mod:`recsys.schema` that no business rule reads as a signal. Rows that cannot be parsed
are written to ``rejects`` with the reason, never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from pipelines.canonical import CanonicalWriter, Manifest, rejects_table, validate_events
from recsys import schema as S

log = logging.getLogger(__name__)

LAYOUTS = ("ml-100k", "ml-csv")
#: Category names: MovieLens 100K's genres in u.genre order, then genres only the CSV sets have.
CATEGORIES: tuple[str, ...] = (*S.ML_GENRES, "IMAX")
_GENRE_ALIASES = {"Children": "Children's", "(no genres listed)": "unknown"}
_CATEGORY_ID = {name: i for i, name in enumerate(CATEGORIES)}
_MAX_USER_TAGS = 10


class LoaderError(RuntimeError):
    """The input cannot be loaded; the message names the path and the fix."""


def detect_layout(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise LoaderError(f"{path} does not exist: pass the folder that holds u.data or ratings.csv")
    if not path.is_dir():
        raise LoaderError(f"{path} is a file: pass the MovieLens folder that contains it")
    if (path / "u.data").is_file():
        return "ml-100k"
    if (path / "ratings.csv").is_file():
        return "ml-csv"
    raise LoaderError(
        f"{path} is not a MovieLens folder: expected u.data, u.item, u.user (ml-100k) "
        "or ratings.csv, movies.csv (ml-latest, ml-25m)"
    )


def load_movielens(path: Path, out_dir: Path, layout: str = "auto") -> Manifest:
    """Load a MovieLens folder into a canonical dataset at ``out_dir``."""
    path = Path(path)
    if layout == "auto":
        layout = detect_layout(path)
    elif layout not in LAYOUTS:
        raise LoaderError(f"unknown layout {layout!r}: choose auto, {', '.join(LAYOUTS)}")
    else:
        detect_layout(path)  # the same checks for a missing or wrong folder
    loader = _load_100k if layout == "ml-100k" else _load_csv
    with CanonicalWriter(out_dir, source=f"movielens:{layout}", params={"path": path.name}) as writer:
        loader(path, writer)
    return writer.manifest


# ---- shared helpers ---------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.is_file():
        raise LoaderError(f"{path} is missing: the {path.parent.name} folder is incomplete")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise LoaderError(f"{path} cannot be read ({exc.strerror}): check its permissions") from exc
    return path


class _BadRows:
    """Collects rows that pyarrow's CSV parser cannot split into the expected columns."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def __call__(self, row: pacsv.InvalidRow) -> str:
        self.rows.append(row.text or "")
        return "skip"  # recorded above, then written to rejects

    def table(self, table_name: str) -> pa.Table:
        reasons = ["wrong number of fields"] * len(self.rows)
        return rejects_table(table_name, reasons, self.rows)


def _read_delimited(
    path: Path,
    names: list[str] | None,
    delimiter: str,
    bad: _BadRows,
    encoding: str = "utf8",
    block_size: int = 1 << 24,
) -> Iterator[pd.DataFrame]:
    """Stream a delimited file as string columns, in batches of bounded size.

    With ``names=None`` the first line is the header. Every column is read as text and converted
    by the caller, so one odd value becomes one reject instead of a failed type inference.
    """
    skip = 0
    if names is None:
        with open(path, "rb") as fh:
            header = fh.readline().decode(encoding, errors="replace")
        names = [n.strip().strip('"') for n in header.rstrip("\r\n").split(delimiter)]
        skip = 1
    read = pacsv.ReadOptions(column_names=names, skip_rows=skip, encoding=encoding, block_size=block_size)
    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=bad,
                               quote_char='"' if delimiter == "," else False)
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield batch.to_pandas()
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path} cannot be parsed as {delimiter!r}-separated text: {exc}") from exc


def _ratings_to_events(df: pd.DataFrame, writer: CanonicalWriter, known_items: np.ndarray | None) -> pd.DataFrame:
    """Raw string columns user,item,rating,ts -> validated RATING events; returns the good ones."""
    seconds = pd.to_numeric(df["ts"], errors="coerce")
    raw = pd.DataFrame(
        {
            S.COL_EVENT_ID: "r-" + df["user"].str.strip() + "-" + df["item"].str.strip() + "-" + df["ts"].str.strip(),
            S.COL_USER: df["user"],
            S.COL_ITEM: df["item"],
            S.COL_EVENT_TYPE: S.EventType.RATING.value,
            S.COL_VALUE: df["rating"],
            S.COL_TS: pd.to_datetime(seconds, unit="s", utc=True, errors="coerce"),
            S.COL_SESSION: None,
            S.COL_CONTEXT: None,
        }
    )
    events, rejects = validate_events(raw, known_items=known_items)
    writer.add_events(events)
    writer.add_rejects(rejects)
    return events.select([S.COL_USER, S.COL_ITEM, S.COL_TS]).to_pandas()


def _first_seen(events: list[pd.DataFrame], key: str) -> pd.Series:
    frame = pd.concat(events, ignore_index=True) if events else pd.DataFrame({key: [], S.COL_TS: []})
    return frame.groupby(key)[S.COL_TS].min()


def _item_frame(ids: pd.Series, titles: pd.Series, genre_lists: list[list[str]],
                created_at: pd.Series) -> pd.DataFrame:
    categories = [(_CATEGORY_ID.get(g[0], 0) if g else 0) for g in genre_lists]
    return pd.DataFrame(
        {
            S.COL_ITEM: ids.astype("int64").to_numpy(),
            "title": titles.to_numpy(),
            S.COL_CATEGORY: np.asarray(categories, dtype=np.int64),
            "tags": genre_lists,
            "price": S.NEUTRAL_PRICE,
            "margin": S.NEUTRAL_MARGIN,
            "quality_score": S.NEUTRAL_QUALITY,
            "inventory": S.NEUTRAL_INVENTORY,
            S.COL_CREATED_AT: created_at.to_numpy(),
            "image_url": None,
        }
    )


def _to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    for col in (S.COL_CREATED_AT,):
        if col in df:
            df[col] = pd.to_datetime(df[col], utc=True).dt.as_unit("us")
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


# ---- ml-100k ----------------------------------------------------------------------------------


def _load_100k(path: Path, writer: CanonicalWriter) -> None:
    items_bad, users_bad, data_bad = _BadRows(), _BadRows(), _BadRows()

    item_names = ["item", "title", "release", "video_release", "url", *[f"g{i}" for i in range(len(S.ML_GENRES))]]
    items_raw = pd.concat(
        list(_read_delimited(_require(path / "u.item"), item_names, "|", items_bad, encoding="latin-1")),
        ignore_index=True,
    )
    item_ids = pd.to_numeric(items_raw["item"], errors="coerce")
    bad_item = item_ids.isna() | (item_ids < 0)
    if bad_item.any():
        writer.add_rejects(rejects_table("items", ["missing or non-numeric item_id"] * int(bad_item.sum()),
                                         items_raw.loc[bad_item].apply("|".join, axis=1).tolist()))
    items_raw = items_raw.loc[~bad_item]
    known_items = np.sort(item_ids[~bad_item].astype(np.int64).to_numpy())

    seen: list[pd.DataFrame] = []
    for df in _read_delimited(_require(path / "u.data"), ["user", "item", "rating", "ts"], "\t", data_bad):
        seen.append(_ratings_to_events(df, writer, known_items))
    first_event = min((f[S.COL_TS].min() for f in seen if len(f)), default=pd.Timestamp("1970-01-01", tz="UTC"))

    flags = items_raw[[f"g{i}" for i in range(len(S.ML_GENRES))]].to_numpy() == "1"
    genres = [[S.ML_GENRES[i] for i in np.flatnonzero(row)] for row in flags]
    release = pd.to_datetime(items_raw["release"], format="%d-%b-%Y", utc=True, errors="coerce")
    created = release.fillna(first_event)  # no release date: known since the data begins
    writer.add_items(_to_arrow(_item_frame(item_ids[~bad_item], items_raw["title"], genres, created), S.ITEMS_SCHEMA))

    users_raw = pd.concat(
        list(_read_delimited(_require(path / "u.user"), ["user", "age", "gender", "occupation", "zip"], "|", users_bad)),
        ignore_index=True,
    )
    user_ids = pd.to_numeric(users_raw["user"], errors="coerce")
    bad_user = user_ids.isna() | (user_ids < 0)
    if bad_user.any():
        writer.add_rejects(rejects_table("users", ["missing or non-numeric user_id"] * int(bad_user.sum()),
                                         users_raw.loc[bad_user].apply("|".join, axis=1).tolist()))
    users_raw, user_ids = users_raw.loc[~bad_user], user_ids[~bad_user].astype("int64")
    first_seen = _first_seen(seen, S.COL_USER)
    users = pd.DataFrame(
        {
            S.COL_USER: user_ids.to_numpy(),
            "age": pd.to_numeric(users_raw["age"], errors="coerce").astype("Int64").to_numpy(),
            "gender": users_raw["gender"].to_numpy(),
            "occupation": users_raw["occupation"].to_numpy(),
            "zip_code": users_raw["zip"].to_numpy(),
            S.COL_CREATED_AT: user_ids.map(first_seen).fillna(first_event).to_numpy(),
        }
    )
    writer.add_users(_to_arrow(users, S.USERS_SCHEMA))
    for table_name, bad in (("items", items_bad), ("events", data_bad), ("users", users_bad)):
        writer.add_rejects(bad.table(table_name))


# ---- ml-latest / ml-25m CSV -------------------------------------------------------------------


def _split_genres(value: str) -> list[str]:
    return [_GENRE_ALIASES.get(g, g) for g in value.split("|") if g]


def _load_csv(path: Path, writer: CanonicalWriter) -> None:
    movies_bad, ratings_bad, tags_bad = _BadRows(), _BadRows(), _BadRows()
    movies = pd.concat(list(_read_delimited(_require(path / "movies.csv"), None, ",", movies_bad)), ignore_index=True)
    missing = {"movieId", "title", "genres"} - set(movies.columns)
    if missing:
        raise LoaderError(f"{path / 'movies.csv'} lacks columns {sorted(missing)}: is it a MovieLens movies.csv?")
    movie_ids = pd.to_numeric(movies["movieId"], errors="coerce")
    bad_movie = movie_ids.isna() | (movie_ids < 0)
    if bad_movie.any():
        writer.add_rejects(rejects_table("items", ["missing or non-numeric item_id"] * int(bad_movie.sum()),
                                         movies.loc[bad_movie].apply(",".join, axis=1).tolist()))
    movies, movie_ids = movies.loc[~bad_movie], movie_ids[~bad_movie].astype("int64")
    known_items = np.sort(movie_ids.to_numpy())

    seen: list[pd.DataFrame] = []
    ratings_file = _require(path / "ratings.csv")
    for df in _read_delimited(ratings_file, None, ",", ratings_bad):
        if not {"userId", "movieId", "rating", "timestamp"} <= set(df.columns):
            raise LoaderError(f"{ratings_file} lacks userId,movieId,rating,timestamp: is it a MovieLens ratings.csv?")
        df = df.rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts"})
        seen.append(_ratings_to_events(df, writer, known_items))
    first_event = min((f[S.COL_TS].min() for f in seen if len(f)), default=pd.Timestamp("1970-01-01", tz="UTC"))

    user_tags: dict[int, list[str]] = {}
    if (path / "tags.csv").is_file():
        tags = pd.concat(list(_read_delimited(_require(path / "tags.csv"), None, ",", tags_bad)), ignore_index=True)
        tags["item"] = pd.to_numeric(tags.get("movieId"), errors="coerce")
        tags["tag"] = tags.get("tag", pd.Series(dtype=str)).str.strip().str.lower()
        tags = tags.dropna(subset=["item"]).query("tag != ''")
        counts = tags.groupby(["item", "tag"]).size().rename("n").reset_index()
        counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True])
        for item, group in counts.groupby("item"):
            user_tags[int(item)] = group["tag"].head(_MAX_USER_TAGS).tolist()

    genres = [_split_genres(g) for g in movies["genres"]]
    tag_lists = [g + [t for t in user_tags.get(int(i), []) if t not in g] for g, i in zip(genres, movie_ids)]
    items = _item_frame(movie_ids, movies["title"], genres, pd.Series(first_event, index=movies.index))
    items["tags"] = tag_lists
    first_item = _first_seen(seen, S.COL_ITEM)  # the CSV sets have no release date
    items[S.COL_CREATED_AT] = movie_ids.map(first_item).fillna(first_event).to_numpy()
    writer.add_items(_to_arrow(items, S.ITEMS_SCHEMA))

    first_seen = _first_seen(seen, S.COL_USER)
    users = pd.DataFrame(
        {
            S.COL_USER: first_seen.index.astype("int64"),
            "age": pd.array([pd.NA] * len(first_seen), dtype="Int64"),
            "gender": None,
            "occupation": None,
            "zip_code": None,
            S.COL_CREATED_AT: first_seen.to_numpy(),
        }
    )
    writer.add_users(_to_arrow(users, S.USERS_SCHEMA))
    for table_name, bad in (("items", movies_bad), ("events", ratings_bad), ("tags", tags_bad)):
        writer.add_rejects(bad.table(table_name))
