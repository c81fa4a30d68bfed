"""Benchmark: recommendation quality on ML-100K under the one protocol (models.protocol).

Run: ``python -m benchmarks.quality`` -> ``benchmarks/results/quality.json`` (popularity_*, als_*,
two_stage_* (ALS candidates re-ranked by the TensorFlow ranker), quantized_* (the same lists re-ranked
by the ranker's int8 variant), served_* (the service's own engine:
bentos.evaluation; it needs Redis, `recsys stack up`): accuracy and the beyond-accuracy
measures coverage@10, novelty@10, ild@10 and arp@10, plus the whole evaluation report),
``quality.md`` (a table), ``quality.png`` (ndcg@k for k = 1..20) and ``quality_beyond.png``
(ndcg@10 against coverage, novelty, diversity and popularity, one point per row). It runs the same
pipeline as ``recsys evaluate`` (tuning ALS on the validation split), in a temporary workspace.
MovieLens is read from ../shared/data/ml-100k or $RECSYS_ML100K.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, write_results
from recsys.logs import configure_logging

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODELS = ("popularity", "als", "two_stage", "quantized", "served")
ACCURACY = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
#: Beyond-accuracy measures of the same top-10 lists (models.beyond_accuracy), with axis labels.
BEYOND = {"coverage@10": "catalogue coverage@10", "novelty@10": "novelty@10 (bits)",
          "ild@10": "intra-list diversity@10 (ALS cosine)", "arp@10": "avg recommended popularity@10"}
METRICS = (*ACCURACY, *BEYOND)
#: Measured by the issue's author on the same split with public implementations.
REFERENCE = {"popularity": (0.096, 0.090), "implicit ALS (tuned)": (0.180, 0.163), "EASE (lambda 100)": (0.183, 0.163)}


def ml100k_path() -> Path:
    path = Path(os.environ.get("RECSYS_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
    if not (path / "u.data").is_file():
        raise SystemExit(f"MovieLens 100K not found at {path}: set RECSYS_ML100K to the folder with u.data")
    return path


def plot_ndcg_curves(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in MODELS:
        model = report["models"].get(name)
        if model and model.get("ndcg_curve"):
            curve = model["ndcg_curve"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("ndcg@k")
    ax.set_title("ML-100K, per-user temporal split (last 20% of each user)")
    ax.set_xticks(range(1, 21))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_beyond_accuracy(report: dict[str, Any], path: Path) -> Path:
    """ndcg@10 against each beyond-accuracy measure, one labelled point per row of the report:
    where a model trades accuracy for coverage, novelty or diversity."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BEYOND), figsize=(4 * len(BEYOND), 3.6))
    for ax, (metric, label) in zip(axes, BEYOND.items()):
        for name in MODELS:
            x, y = report.get(f"{name}_{metric}"), report.get(f"{name}_ndcg@10")
            if x is not None and y is not None:
                ax.scatter([x], [y], s=30)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.margins(0.2)  # room for the labels at the edges
        ax.set_xlabel(label)
        ax.set_ylabel("ndcg@10")
        ax.grid(alpha=0.3)
    fig.suptitle("ML-100K: accuracy against beyond-accuracy measures (top 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if metric.startswith("arp@") else f"{value:.4f}"  # ARP is a count, not a share


def model_table(report: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in MODELS:
        cells = [_cell(m, report.get(f"{name}_{m}")) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    blanks = " |" * (len(METRICS) - 2)
    for name, (recall, ndcg) in REFERENCE.items():
        lines.append(f"| reference: {name} | {recall:.3f} | {ndcg:.3f} |{blanks}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-tune", action="store_true", help="Use the default ALS config (faster).")
    parser.add_argument("--no-two-stage", action="store_true", help="Skip the ranker (two_stage_* stay empty).")
    parser.add_argument("--no-served", action="store_true",
                        help="Skip the service's engine (served_* stay empty; it needs Redis otherwise).")
    args = parser.parse_args()
    configure_logging()
    from bentos.evaluation import check_redis, served
    from models.evaluate import run_evaluation
    from models.holdout import EvaluationConfig
    from models.ranker.two_stage import two_stage
    from recsys.config import Settings

    if not args.no_served:
        check_redis(Settings())  # before minutes of work: names the fix (`recsys stack up`, --no-served)
    config = EvaluationConfig(grid=None) if args.no_tune else EvaluationConfig()
    report = run_evaluation(ml100k_path(), None, config=config, track=False,
                            two_stage=None if args.no_two_stage else two_stage,
                            served=None if args.no_served else served)
    numbers: dict[str, Any] = {f"{name}_{m}": report.get(f"{name}_{m}") for name in MODELS for m in METRICS}
    numbers["als_hyperparameters"] = report["hyperparameters"]["als"]
    numbers["tuned"] = report["hyperparameters"]["tuned"]
    numbers["ndcg_curves"] = {name: (report["models"].get(name) or {}).get("ndcg_curve") for name in MODELS}
    numbers["slices"] = {name: (report["models"].get(name) or {}).get("slices") for name in MODELS}
    numbers["served_serving"] = (report["models"]["served"] or {}).get("serving")  # how answers became lists
    numbers["timings"] = report["timings"]
    numbers["report"] = report  # the whole `recsys evaluate` report, for anything not above
    plot = plot_ndcg_curves(report, RESULTS / "quality.png")
    beyond_plot = plot_beyond_accuracy(report, RESULTS / "quality_beyond.png")
    rows = [(k, "—" if numbers[k] is None else f"{numbers[k]:.4f}") for k in
            (f"{n}_{m}" for n in MODELS for m in ("recall@10", "ndcg@10"))]
    best = report["hyperparameters"]["als"]
    notes = (f"{model_table(report)}\n\nALS: rank {best['rank']}, regParam {best['reg_param']}, alpha {best['alpha']}, "
             f"{best['max_iter']} iterations ({'tuned on the validation split' if numbers['tuned'] else 'defaults'}). "
             f"Protocol: docs/training.md. Full report: quality.json, key `report`; "
             f"ndcg@k curves: {plot.name}; ndcg@10 against the beyond-accuracy measures "
             f"(defined in docs/training.md): {beyond_plot.name}. two_stage: the ALS candidates (models.retrieval) "
             f"re-ranked by the TensorFlow ranker (models.ranker.two_stage); quantized: the same lists re-ranked by its "
             f"int8 variant. served: the service's engine "
             f"(candidate strategies, ranker, business rules, diversification) on the same users, seeded "
             f"from training events only (bentos.evaluation; counts in `served_serving`). "
             f"Total {report['timings']['total_s']}s on this machine.")
    path = write_results("quality", numbers, rows, notes=notes)
    log.info("wrote %s, %s and %s", path, plot, beyond_plot)


if __name__ == "__main__":
    main()
