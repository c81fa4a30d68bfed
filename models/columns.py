"""Feature columns to NumPy, shared by the models' encoders (the ranker's and the two towers'):
numbers with NaN for what is missing, the log1p transform, and what counts as a list value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def floats(values: Sequence[Any] | np.ndarray | pd.Series | None, n: int | None = None) -> np.ndarray:
    """Numbers as float64 with NaN for None/NaN/NaT and text; ``None`` (a missing column) is ``n``
    NaNs."""
    if values is None:
        return np.full(n or 0, np.nan)
    try:  # the common case (numbers and None) in C: pandas' coercion below costs 0.1 ms a column
        out = np.array(values, dtype=np.float64)
        if out.shape == (len(out),):
            return out
    except (TypeError, ValueError):  # text, pd.NA, NaT: pandas coerces them (NaN when not numbers)
        pass
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """``log1p`` (of the value floored at 0) or ``identity``."""
    return np.log1p(np.maximum(x, 0.0)) if kind == "log1p" else x


def is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))
