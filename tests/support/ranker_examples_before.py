"""The ranker's example sampling as it was before it was vectorised (a per-user Python loop), kept
verbatim so `tests/models/test_ranker_examples.py` can prove the vectorised
:func:`models.ranker.examples.sample_examples` returns the very same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.ranker.examples import COL_LABEL, ONE_US, ExampleConfig
from models.ranker.features import COL_RETRIEVED
from models.retrieval import Candidates
from recsys import schema as S


def sample_examples_before(candidates: dict[int, Candidates], positives: pd.DataFrame, seen: dict[int, set[int]],
                           label_time: pd.Series, catalogue: np.ndarray, cfg: ExampleConfig) -> pd.DataFrame:
    """The loop version of ``sample_examples`` (git history of ``models/ranker/examples.py``)."""
    rng = np.random.default_rng(cfg.seed)
    pos_by_user = positives.groupby(S.COL_USER)[S.COL_ITEM].apply(lambda s: set(s.astype(int))).to_dict()
    users, items, labels, found = [], [], [], []
    for user, pos in pos_by_user.items():
        user = int(user)
        retrieved = {int(i) for i in (candidates[user].item_ids if user in candidates else [])}
        pos = pos if cfg.missed_positives else pos & retrieved
        if not pos:
            continue
        hard = [int(i) for i in (candidates[user].item_ids if user in candidates else []) if int(i) not in pos]
        if len(hard) > cfg.n_hard:
            hard = rng.choice(hard, cfg.n_hard, replace=False).tolist()
        taken = pos | set(hard) | seen.get(user, set())
        pool = catalogue[~np.isin(catalogue, list(taken))]
        rand = rng.choice(pool, min(cfg.n_random, len(pool)), replace=False).tolist() if len(pool) else []
        chosen = sorted(pos) + hard + [int(i) for i in rand]
        users += [user] * len(chosen)
        items += chosen
        labels += [1.0] * len(pos) + [0.0] * (len(chosen) - len(pos))
        found += [i in retrieved for i in chosen]
    frame = pd.DataFrame({S.COL_USER: np.asarray(users, np.int64), S.COL_ITEM: np.asarray(items, np.int64),
                          COL_LABEL: np.asarray(labels, np.float32), COL_RETRIEVED: np.asarray(found, bool)})
    frame[S.COL_TS] = frame[S.COL_USER].map(label_time) - ONE_US
    return frame
