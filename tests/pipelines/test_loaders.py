"""MovieLens loaders: the real ML-100K, a hand-written CSV fixture, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from pipelines.canonical import read_manifest, read_table
from pipelines.loaders import CATEGORIES, LoaderError, detect_layout, load_movielens
from recsys import schema as S


@pytest.fixture(scope="module")
def ml100k(ml100k_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml100k") / "ml-100k"
    load_movielens(ml100k_path, out)
    return out


def test_ml100k_counts(ml100k: Path) -> None:
    manifest = read_manifest(ml100k)
    assert (manifest.users, manifest.items, manifest.events, manifest.rejects) == (943, 1682, 100_000, 0)
    assert manifest.source == "movielens:ml-100k"


def test_ml100k_ratings_and_timestamps_preserved(ml100k: Path, ml100k_path: Path) -> None:
    events = read_table(ml100k, "events")
    raw = pd.read_csv(ml100k_path / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    merged = events.merge(raw, left_on=[S.COL_USER, S.COL_ITEM], right_on=["user", "item"], validate="1:1")
    assert len(merged) == 100_000
    assert (merged[S.COL_VALUE] == merged["rating"]).all()
    assert (merged[S.COL_TS].astype("int64") // 1_000_000 == merged["ts"]).all()  # microseconds
    assert set(events[S.COL_EVENT_TYPE]) == {"RATING"}
    assert events[S.COL_REQUEST_ID].isna().all() and events[S.COL_POSITION].isna().all()  # loaded: no attribution
    # the first line of u.data: "196  242  3  881250949"
    row = events.set_index("event_id").loc["r-196-242-881250949"]
    assert (row[S.COL_USER], row[S.COL_ITEM], row[S.COL_VALUE]) == (196, 242, 3.0)
    assert row[S.COL_TS] == pd.Timestamp(881250949, unit="s", tz="UTC")
    assert str(events[S.COL_TS].dtype) == "datetime64[us, UTC]"


def test_ml100k_genres_mapped(ml100k: Path) -> None:
    items = read_table(ml100k, "items").set_index(S.COL_ITEM)
    toy_story = items.loc[1]  # u.item: Toy Story is Animation|Children's|Comedy
    assert toy_story["title"] == "Toy Story (1995)"
    assert list(toy_story["tags"]) == ["Animation", "Children's", "Comedy"]
    assert toy_story[S.COL_CATEGORY] == CATEGORIES.index("Animation") == 3
    assert toy_story[S.COL_CREATED_AT] == pd.Timestamp("1995-01-01", tz="UTC")
    # neutral values that no business rule reads as a signal
    assert (items["margin"] == S.NEUTRAL_MARGIN).all() and (items["quality_score"] == S.NEUTRAL_QUALITY).all()
    assert (items["inventory"] > 0).all()


def test_ml100k_users_keep_demographics(ml100k: Path) -> None:
    users = read_table(ml100k, "users").set_index(S.COL_USER)
    assert len(users) == 943
    # u.user line 1: "1|24|M|technician|85711"
    assert users.loc[1, ["age", "gender", "occupation", "zip_code"]].tolist() == [24, "M", "technician", "85711"]


MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Unknown Film (2001),(no genres listed)
"""
RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,3.5,964981247
2,1,5.0,964982224
2,3,2.0,964983815
3,99,4.0,964982000
3,1,oops,964982001
3,2,4.5
"""
TAGS = """userId,movieId,tag,timestamp
1,1,pixar,1139045764
2,1,Pixar,1139045765
2,1,fun,1139045766
"""


@pytest.fixture()
def csv_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "movies.csv").write_text(MOVIES)
    (folder / "ratings.csv").write_text(RATINGS)
    (folder / "tags.csv").write_text(TAGS)
    return folder


def test_csv_layout(csv_dir: Path, tmp_path: Path) -> None:
    assert detect_layout(csv_dir) == "ml-csv"
    manifest = load_movielens(csv_dir, tmp_path / "out")
    # 7 rating rows: 4 good, movie 99 unknown, 'oops' rating, one row with 3 fields -> 3 rejects
    assert (manifest.events, manifest.items, manifest.users, manifest.rejects) == (4, 3, 2, 3)
    assert manifest.rejects_by_reason == {
        "item_id not in catalogue": 1,
        "rating outside 0.5..5": 1,
        "wrong number of fields": 1,
    }
    events = read_table(tmp_path / "out", "events").sort_values([S.COL_USER, S.COL_ITEM])
    assert events[S.COL_VALUE].tolist() == [4.0, 3.5, 5.0, 2.0]
    items = read_table(tmp_path / "out", "items").set_index(S.COL_ITEM)
    assert items.loc[2, "title"] == "American President, The (1995)"  # quoted comma kept
    # 'Children' is ml-100k's "Children's"; user tags lower-cased, most used first
    assert list(items.loc[1, "tags"]) == ["Adventure", "Animation", "Children's", "Comedy", "Fantasy", "pixar", "fun"]
    assert items.loc[1, S.COL_CATEGORY] == CATEGORIES.index("Adventure")
    assert items.loc[3, S.COL_CATEGORY] == 0 and list(items.loc[3, "tags"]) == ["unknown"]
    rejects = read_table(tmp_path / "out", "rejects")
    assert "oops" in " ".join(rejects["raw"])  # the original row is kept, not dropped


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"does not exist: pass the folder that holds u.data or ratings.csv"):
        load_movielens(tmp_path / "nope", tmp_path / "out")


def test_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("not movielens")
    with pytest.raises(LoaderError, match=r"is not a MovieLens folder: expected u.data"):
        load_movielens(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_layout_flag(csv_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"unknown layout 'ml-1m'"):
        load_movielens(csv_dir, tmp_path / "out", layout="ml-1m")


def test_incomplete_folder(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "movies.csv").unlink()
    with pytest.raises(LoaderError, match=r"movies.csv is missing"):
        load_movielens(csv_dir, tmp_path / "out")


def test_unparseable_file(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n\xff\xfe\x00bad\n")
    with pytest.raises(LoaderError, match=r"ratings.csv cannot be parsed"):
        load_movielens(csv_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no half-written dataset


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "ratings.csv").chmod(0)
    with pytest.raises(LoaderError, match=r"cannot be read .* check its permissions"):
        load_movielens(csv_dir, tmp_path / "out")
