"""Validation of the towers, on the validation frame only (the test split is never read here):
:class:`ValidationSet` (:func:`build_validation`), recall@k of an exact top-k over the whole
catalogue (:func:`validation_recall`, the protocol's definitions from :mod:`models.protocol`) and
the AUC of each validation positive against sampled items (:func:`validation_auc`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.protocol import hit_matrix, recall_ndcg, top_k
from models.two_tower.features import TwoTowerEncoder, catalogue_frame
from recsys import schema as S
from recsys.arrays import positions

#: (inputs of one tower) -> float32 (n, D) vectors
Vectors = Callable[[dict[str, np.ndarray]], np.ndarray]
AUC_ROWS = 10_000  # validation rows sampled for the AUC: it is a check, not a benchmark
_USER_CHUNK = 512  # users scored per (users x catalogue) block: bounded memory


@dataclass
class ValidationSet:
    """What the validation metrics score, encoded once:

    - ``users`` (n_users,) and ``user_inputs``: each validation user's features at their first
      validation row (the time retrieval would run for them);
    - ``catalogue`` (n_items,) sorted item ids (training and validation items) and
      ``item_inputs``: their latest features, aged at the validation frame's first time;
    - ``targets``: per user, catalogue positions of their validation items minus their training
      items; ``exclude``: positions of their training items (not ranked, as in the protocol);
    - ``auc_user_inputs``, ``auc_item_inputs`` (r rows), ``auc_negative_inputs`` (r * K rows,
      row i's K negatives together) and ``auc_negative_valid`` (r, K): False where the sampled
      item is the row's own.
    """

    users: np.ndarray
    user_inputs: dict[str, np.ndarray]
    catalogue: np.ndarray
    item_inputs: dict[str, np.ndarray]
    targets: list[np.ndarray]
    exclude: list[np.ndarray]
    auc_user_inputs: dict[str, np.ndarray]
    auc_item_inputs: dict[str, np.ndarray]
    auc_negative_inputs: dict[str, np.ndarray]
    auc_negative_valid: np.ndarray


def build_validation(train: pd.DataFrame, valid: pd.DataFrame, encoder: TwoTowerEncoder, auc_negatives: int,
                     seed: int) -> ValidationSet:
    """The :class:`ValidationSet` of ``valid`` (rows = positives), with ``train``'s items
    excluded per user. Users without a validation item outside their training items are not
    scored."""
    valid = valid.sort_values(S.COL_TS, kind="stable").reset_index(drop=True)
    items = catalogue_frame(train, valid)
    catalogue = items[S.COL_ITEM].to_numpy(np.int64)
    as_of = pd.to_datetime(valid[S.COL_TS], utc=True).min()

    def per_user(frame: pd.DataFrame) -> dict[int, np.ndarray]:
        pos, _ = positions(catalogue, frame[S.COL_ITEM].to_numpy(np.int64))
        return {int(u): np.unique(p) for u, p in pd.Series(pos).groupby(frame[S.COL_USER].to_numpy())}

    seen, wanted = per_user(train), per_user(valid)
    first = valid.drop_duplicates(S.COL_USER, keep="first")
    users, targets, exclude, rows = [], [], [], []
    for row, user in zip(first.index, first[S.COL_USER].to_numpy(np.int64)):
        train_pos = seen.get(int(user), np.empty(0, np.int64))
        target = np.setdiff1d(wanted[int(user)], train_pos)
        if len(target):
            users.append(user)
            targets.append(target)
            exclude.append(train_pos)
            rows.append(row)
    rng = np.random.default_rng(seed)
    auc_rows = np.sort(rng.choice(len(valid), min(len(valid), AUC_ROWS), replace=False))
    auc = valid.iloc[auc_rows].reset_index(drop=True)
    negative_pos = rng.integers(0, len(catalogue), (len(auc), auc_negatives))
    own, _ = positions(catalogue, auc[S.COL_ITEM].to_numpy(np.int64))
    # each negative is aged at its row's time, as the positive is
    negatives = items.iloc[negative_pos.reshape(-1)].reset_index(drop=True)
    negatives[S.COL_TS] = np.repeat(auc[S.COL_TS].to_numpy(), auc_negatives)
    return ValidationSet(
        users=np.asarray(users, np.int64), user_inputs=encoder.encode_users(valid.loc[rows]),
        catalogue=catalogue, item_inputs=encoder.encode_items(items, as_of=as_of),
        targets=targets, exclude=exclude,
        auc_user_inputs=encoder.encode_users(auc), auc_item_inputs=encoder.encode_items(auc),
        auc_negative_inputs=encoder.encode_items(negatives), auc_negative_valid=negative_pos != own[:, None],
    )


def validation_recall(validation: ValidationSet, user_vectors: Vectors, item_vectors: Vectors,
                      ks: Sequence[int]) -> dict[str, float]:
    """``recall@k`` for each k: exact top-k by dot product over the whole catalogue (training
    items excluded), hits / min(k, targets), averaged over the scored users (NaN when none)."""
    if not len(validation.users):
        return {f"recall@{k}": float("nan") for k in ks}
    users, items = user_vectors(validation.user_inputs), item_vectors(validation.item_inputs)
    k_max = max(ks)
    ranked = np.concatenate([
        top_k(users[start:start + _USER_CHUNK] @ items.T, k_max, validation.exclude[start:start + _USER_CHUNK])
        for start in range(0, len(users), _USER_CHUNK)])
    hits = hit_matrix(ranked, validation.targets)
    n_targets = np.array([len(t) for t in validation.targets])
    return {f"recall@{k}": float(recall_ndcg(hits, n_targets, k)[0].mean()) for k in ks}


def validation_auc(validation: ValidationSet, user_vectors: Vectors, item_vectors: Vectors) -> float:
    """The share of (validation positive, sampled negative) pairs of the same row that the
    towers order correctly (ties count a half); NaN without pairs."""
    valid = validation.auc_negative_valid
    if not valid.any():
        return float("nan")
    users = user_vectors(validation.auc_user_inputs)
    positive = (users * item_vectors(validation.auc_item_inputs)).sum(axis=1)
    negatives = item_vectors(validation.auc_negative_inputs).reshape(*valid.shape, -1)
    negative = np.einsum("nd,nkd->nk", users, negatives)
    wins = (positive[:, None] > negative) + 0.5 * (positive[:, None] == negative)
    return float(wins[valid].mean())
