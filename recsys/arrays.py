"""Small array and folder helpers every layer may use: id lookups by position, atomic folder swaps."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np


def replace_dir(folder: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a fresh ``<folder>.tmp``, then swap it in for ``folder``, so a
    reader never finds a half-written folder where a whole one should be."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def positions(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pos, known): ``ids[pos[j]] == wanted[j]`` where ``known[j]``; ``ids`` sorted ascending."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    pos = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return pos, ids[pos] == wanted
