"""Benchmark: the ranker's training loop on a GPU beside the same loop on the CPU.

Run: ``python -m benchmarks.ranker_device`` -> ``benchmarks/results/ranker_device.json`` with,
for each side (``gpu_*`` when a GPU is visible, ``cpu_*`` always): ``rows_per_s`` (training rows
per second, median epoch after each fold's first, which holds the compilation), ``heldout_ndcg@10``
(the network alone, scored on the fold's held-out users by :func:`models.ranker.fit_ranker_cv`),
``final_loss``, ``batch``, ``policy`` (the Keras dtype policy during the fit) and
``dense_dtype`` (what a hidden layer computes in); ``gpu_speedup`` = GPU rows/s over CPU rows/s.

Both sides run :func:`models.ranker.fit_ranker_cv` (the production code: a GPU gets mixed
precision and ``gpu_batch_multiplier`` times the batch, the CPU float32) in their own process on
the same synthetic frame. The backend is the environment's ``KERAS_BACKEND`` (TensorFlow by
default, as in production); a machine whose Python has JAX or PyTorch with CUDA but no
TensorFlow build checks the GPU path with ``KERAS_BACKEND=jax``. The frame: ``--users`` users
with one list each of 150 candidates plus 10 random items; a candidate's label is 1 for the
list's 3 highest ``user . item + noise`` (the ALS vectors are the frame's embeddings), so the
network must learn the ALS score and the category match from the features.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from benchmarks._common import write_results

log = logging.getLogger(__name__)

LIST_LEN, N_ITEMS, N_CATEGORIES, RANK, POSITIVES = 160, 50_000, 20, 64, 3


def synthetic_frame(n_users: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A training frame of ``n_users`` lists of :data:`LIST_LEN` rows and its labels (module docstring)."""
    from models.ranker import ITEM_EMBEDDING, USER_EMBEDDING
    from recsys import schema as S

    rng = np.random.default_rng(seed)
    user_vecs = rng.standard_normal((n_users, RANK), dtype=np.float32) / np.sqrt(RANK)
    item_vecs = rng.standard_normal((N_ITEMS, RANK), dtype=np.float32) / np.sqrt(RANK)
    users = np.repeat(np.arange(n_users), LIST_LEN)
    items = np.concatenate([rng.choice(N_ITEMS, LIST_LEN, replace=False) for _ in range(n_users)])
    category = items % N_CATEGORIES
    liked = users % N_CATEGORIES
    score = np.einsum("ij,ij->i", user_vecs[users], item_vecs[items]) + 0.3 * (category == liked)
    score += 0.3 * rng.standard_normal(len(score))
    rank_in_list = np.argsort(np.argsort(-score.reshape(n_users, LIST_LEN), axis=1), axis=1).reshape(-1)
    labels = (rank_in_list < POSITIVES).astype(np.float32)
    frame = pd.DataFrame({S.COL_USER: users + 1, S.COL_ITEM: items + 1,
                          S.COL_TS: pd.Timestamp("2026-01-01 12:00", tz="UTC"),
                          "n_events": rng.poisson(30, len(users)).astype(float), S.COL_CATEGORY: category,
                          "price": rng.gamma(2.0, 10.0, len(users)),
                          "popularity_7d": rng.poisson(5, len(users))})
    frame["top_categories"] = [[int(c)] for c in liked]
    frame[USER_EMBEDDING] = list(user_vecs[users])
    frame[ITEM_EMBEDDING] = list(item_vecs[items])
    return frame, labels


def run_side(users: int, epochs: int, folds: int) -> dict[str, Any]:
    """One side, in this process (the parent starts one process per side)."""
    import keras

    from models.ranker import RankerConfig, fit_ranker_cv

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[tuple[int, float]] = []
            self.started = 0.0
            self.policy = ""
            self.dense_dtype = ""

        def on_train_begin(self, logs: Any = None) -> None:
            self.policy = keras.mixed_precision.dtype_policy().name
            dense = [layer for layer in self.model.inner.layers if isinstance(layer, keras.layers.Dense)]
            self.dense_dtype = str(dense[0].compute_dtype) if dense else ""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.epochs.append((epoch, time.perf_counter() - self.started))

    frame, labels = synthetic_frame(users)
    timer = Timer()
    config = RankerConfig(epochs=epochs, cv_folds=folds)
    started = time.perf_counter()
    result = fit_ranker_cv(frame, labels, RANK, config, progress=False, callbacks=[timer])
    fit_s = time.perf_counter() - started
    steady = [s for e, s in timer.epochs if e > 0] or [s for _, s in timer.epochs]
    rows_per_fold = len(frame) * (folds - 1) / folds if folds > 1 else len(frame)
    ndcg = result.validation.get("blend_ndcg@10", {}).get("0.0")
    return {"device": result.device, "backend": keras.config.backend(), "rows": len(frame),
            "rows_per_s": round(rows_per_fold / float(np.median(steady))), "fit_s": round(fit_s, 1),
            "heldout_ndcg@10": ndcg, "final_loss": round(result.history["loss"][-1], 4),
            "batch": config.users_per_batch * (config.gpu_batch_multiplier if result.device == "GPU" else 1),
            "policy": timer.policy, "dense_dtype": timer.dense_dtype}


def spawn(side: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in a fresh interpreter; ``cpu`` hides every GPU from it."""
    env = dict(os.environ)
    if side == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "benchmarks.ranker_device", "--side", side, "--users", str(args.users),
               "--epochs", str(args.epochs), "--folds", str(args.folds)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2_000, help="Lists (users) in the synthetic frame.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--side", choices=["gpu", "cpu"], help=argparse.SUPPRESS)  # a child's side
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.users, args.epochs, args.folds)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    numbers: dict[str, Any] = {}
    gpu = spawn("gpu", args)
    log.info("first side: %s", gpu)
    if gpu["device"] == "GPU":
        numbers |= {f"gpu_{k}": v for k, v in gpu.items() if k != "device"}
        cpu = spawn("cpu", args)
        log.info("CPU side: %s", cpu)
        numbers["gpu_speedup"] = round(gpu["rows_per_s"] / cpu["rows_per_s"], 2)
    else:
        log.info("no GPU visible to the %s backend: CPU side only", gpu["backend"])
        cpu = gpu
    numbers |= {f"cpu_{k}": v for k, v in cpu.items() if k != "device"}
    rows = [(k, str(v)) for k, v in numbers.items()]
    notes = ("`models.ranker.fit_ranker_cv` on a synthetic frame, one process per side: GPU = mixed_float16 and "
             "gpu_batch_multiplier x the lists per batch; CPU = float32 with every GPU hidden. rows_per_s: median "
             "steady epoch (each fold's first epoch, which compiles, left out). heldout_ndcg@10: the network alone "
             "on each fold's held-out users.")
    log.info("wrote %s", write_results("ranker_device", numbers, rows, notes=notes))


if __name__ == "__main__":
    main()
