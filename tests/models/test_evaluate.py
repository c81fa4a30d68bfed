"""`recsys evaluate` end to end: its own workspace, the report's keys, and on ML-100K the quality
that the protocol promises (ALS beats popularity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.evaluate import run_evaluation
from models.holdout import EvaluationConfig
from recsys import schema as S

REPO = Path(__file__).resolve().parents[2]


def write_tiny_movielens(folder: Path, n_users: int = 40, n_items: int = 60, per_user: int = 25) -> Path:
    """An ml-100k layout folder with random ratings (seeded), small enough for a fast run."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    lines, t0 = [], 880_000_000
    for user in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), per_user, replace=False)
        for step, item in enumerate(items):
            lines.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{t0 + user * 1000 + step * 60}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    genres = "|".join(["0"] * len(S.ML_GENRES))
    (folder / "u.item").write_text("".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|{genres}\n"
                                           for i in range(1, n_items + 1)), encoding="latin-1")
    (folder / "u.user").write_text("".join(f"{u}|30|F|other|12345\n" for u in range(1, n_users + 1)))
    return folder


def assert_popularity_is_the_most_popular(report: dict) -> None:
    """The popularity row ranks each user's unseen items by n_i, the very count ARP averages and
    novelty takes -log2 of, so with full top-10 lists no row can have a higher ARP or a lower
    novelty (per user, the 10 largest n_i maximise the mean n_i and minimise the mean
    -log2(n_i / N)). The report rounds to 5 decimals, hence the 1e-5."""
    for row in ("als", "two_stage", "served"):
        if report.get(f"{row}_arp@10") is not None:
            assert report["popularity_arp@10"] >= report[f"{row}_arp@10"] - 1e-5
            assert report["popularity_novelty@10"] <= report[f"{row}_novelty@10"] + 1e-5


def test_cli_evaluate_in_its_own_workspace(tmp_path: Path) -> None:
    data = write_tiny_movielens(tmp_path / "tiny-ml")
    out, workspace, demo_data = tmp_path / "report.json", tmp_path / "ws", tmp_path / "demo-data"
    env = {**os.environ, "RECSYS_DATA_DIR": str(demo_data), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "evaluate", "--data", str(data), "--out", str(out),
         "--workspace", str(workspace), "--no-tune", "--no-two-stage"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for model in ("popularity", "als"):
        for key in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
            assert 0.0 <= report[f"{model}_{key}"] <= 1.0
    # beyond accuracy, every row, from the same top-10 lists. Each of the 40 users trains on
    # 25 - floor(0.2 * 25) = 20 distinct items: N = 800 training interactions, at most 40 per item.
    for model in ("popularity", "als"):
        # a user's top 10 alone holds 10 distinct items of the 60
        assert 10 / 60 <= report[f"{model}_coverage@10"] <= 1.0
        # self-information lies between -log2(40/800) = log2(20) and -log2(1/800) = log2(800) bits
        assert np.log2(20) <= report[f"{model}_novelty@10"] <= np.log2(800)
        assert 0.0 <= report[f"{model}_ild@10"] <= 2.0  # 1 - mean cosine, cosine in [-1, 1]
        assert 0.0 <= report[f"{model}_arp@10"] <= 40.0
        assert report[f"{model}_coverage@10"] == report["models"][model]["coverage@10"]
    assert_popularity_is_the_most_popular(report)
    assert report["two_stage_ndcg@10"] is None and report["models"]["two_stage"] is None  # the ranker's room
    # --no-two-stage turns the served row off too (its default follows --two-stage): no Redis needed
    assert report["served_ndcg@10"] is None and report["models"]["served"] is None
    assert all(report[f"two_stage_{key}"] is None for key in ("coverage@10", "novelty@10", "ild@10", "arp@10"))
    assert report["hyperparameters"]["tuned"] is False
    assert report["protocol"]["catalogue"] == 60
    # its own MLflow store and data copy, inside the workspace; nothing in the demo's data dir
    assert report["mlflow"]["tracking_uri"].startswith("sqlite:///") and (workspace / "mlflow.db").is_file()
    # the run's MLflow metrics carry the report's headline keys, beyond accuracy included ("@" is
    # "_at_" in MLflow names: models.tracking)
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["run_id"]).data.metrics
    for model in ("popularity", "als"):
        for key in ("ndcg@10", "coverage@10", "novelty@10", "ild@10", "arp@10"):
            assert logged[f"{model}_{key}".replace("@", "_at_")] == pytest.approx(report[f"{model}_{key}"], abs=1e-5)
    assert (workspace / "data" / "canonical" / "tiny-ml" / "manifest.json").is_file()
    assert not demo_data.exists() and not (tmp_path / "mlruns").exists()


def test_cli_evaluate_served_without_redis_names_the_fix(tmp_path: Path) -> None:
    # --served needs Redis: with nothing listening the command stops before any Spark work
    from pipelines.stack import free_port

    data = write_tiny_movielens(tmp_path / "tiny-ml")
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "evaluate", "--data", str(data), "--out", str(tmp_path / "r.json"),
         "--no-tune", "--no-two-stage", "--served"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "not reachable: check REDIS_URL, or skip the row with --no-served" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_cli_evaluate_bad_path_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "evaluate", "--data", str(tmp_path / "nope"), "--out",
         str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ml100k_als_beats_popularity(ml100k_path: Path, tmp_path: Path) -> None:
    """The protocol on ML-100K with the default ALS config (tuning is `recsys evaluate`'s job;
    the defaults are the grid's best on the validation split)."""
    report = run_evaluation(ml100k_path, tmp_path / "report.json", workspace=tmp_path / "ws",
                            config=EvaluationConfig(grid=None), track=False, progress=False)
    # the author's reference on this protocol: popularity recall@10 0.096, ndcg@10 0.090
    assert report["popularity_ndcg@10"] == pytest.approx(0.090, abs=0.005)
    assert report["popularity_recall@10"] == pytest.approx(0.096, abs=0.005)
    assert report["als_ndcg@10"] > report["popularity_ndcg@10"]
    assert report["als_ndcg@10"] >= 0.155  # the goal for Spark ALS alone
    assert report["models"]["als"]["spark_check"]["ndcg@10"] == pytest.approx(report["als_ndcg@10"], abs=1e-5)
    assert report["protocol"]["scored_users"] == 904 and report["protocol"]["catalogue"] == 1682
    assert len(report["models"]["als"]["ndcg_curve"]) == 20
    slices = report["models"]["als"]["slices"]
    assert slices["users_lt20_train"]["users"] > 0 and slices["long_tail_items"]["users"] > 0
    for model in ("popularity", "als"):
        for key in ("coverage@10", "novelty@10", "ild@10", "arp@10"):
            assert report[f"{model}_{key}"] is not None
    assert_popularity_is_the_most_popular(report)
