"""The ranker's int8 variant: its scores beside full precision on the tiny ranker, the side-by-side
comparison written beside the export, the decision rule (hand-computed cases) and which variant
``load_scorer`` serves for each precision setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.ranker.config import RankerConfig
from models.ranker.export import QUANTIZATION_FILE, QUANTIZED_FILE, export_ranker
from models.ranker.fit import fit_ranker
from models.ranker.precision import QuantizationReport, choose_variant, quantized_is_better
from models.ranker.quantize import compare_precisions
from models.ranker.scorer import RankerScorer, load_scorer
from tests.support.models import tiny_frame, user_and_items

WHEN = {"timestamp": "2026-01-01T12:00Z"}


@pytest.fixture(scope="module")
def ranker_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny frame's ranker with the default hidden layer of 64: its first dense kernel has
    more than the 1,024 weights under which the TFLite converter leaves a tensor in float32, so
    the variant really holds int8 weights."""
    frame, labels = tiny_frame()
    result = fit_ranker(frame, labels, 8, RankerConfig(hidden=(64,), epochs=20, batch_size=32, learning_rate=1e-2,
                                                       category_buckets=8, dropout=0.0), progress=False)
    return export_ranker(result, tmp_path_factory.mktemp("ranker64") / "ranker", {"version": "r64"})


def _report(full_ndcg: float, quantized_ndcg: float, full_p99: float, quantized_p99: float) -> QuantizationReport:
    return QuantizationReport(full_ndcg, quantized_ndcg, full_p99, quantized_p99, lists=10, batch=150, calls=100,
                              max_abs_logit_diff=0.0)


def test_int8_variant_scores_close_to_full_precision(ranker_64: Path) -> None:
    assert (ranker_64 / QUANTIZED_FILE).is_file()
    full, quantized = RankerScorer(ranker_64, "full"), RankerScorer(ranker_64, "quantized")
    assert (full.version, quantized.version) == ("r64", "r64")  # one export: the variant is said beside it
    assert (full.variant, quantized.variant) == ("full", "quantized")
    for user in (1, 2, 3):
        feats, items, ids = user_and_items(user)
        a = full.score(feats, items, ids, np.zeros(len(ids)), WHEN)
        b = quantized.score(feats, items, ids, np.zeros(len(ids)), WHEN)
        # int8 weights (scale = max|w| / 127 per tensor) move each logit by a few hundredths at
        # this size; 0.1 is the tolerance, against logits that span several units
        np.testing.assert_allclose(b, a, atol=0.1)
        assert not np.array_equal(a, b)  # the weights really are int8, not a float32 copy
        liked = ids % 3 == user % 3
        assert b[liked].min() > b[~liked].max()  # the variant keeps the learned preference


def test_compare_precisions_writes_the_side_by_side_report(ranker_64: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(ranker_64, tmp_path / "ranker")
    frame, labels = tiny_frame()
    report = compare_precisions(folder, frame, labels, batch=150, calls=20)
    assert report is not None
    written = json.loads((folder / QUANTIZATION_FILE).read_text())
    assert written["lists"] == 12 and written["batch"] == 150 and written["calls"] == 20  # 12 users, one list each
    assert written["use_quantized"] == quantized_is_better(report) and written["ndcg_tolerance"] == 0.002
    assert 0.0 < written["full_ndcg"] <= 1.0 and 0.0 < written["quantized_ndcg"] <= 1.0
    assert written["full_p99_ms"] > 0 and written["quantized_p99_ms"] > 0
    assert 0.0 < written["max_abs_logit_diff"] < 0.1
    # the report says which variant auto serves
    expected = "quantized" if written["use_quantized"] else "full"
    assert load_scorer(folder, "auto").variant == expected


def test_compare_precisions_without_a_variant_writes_nothing(ranker_64: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(ranker_64, tmp_path / "ranker")
    (folder / QUANTIZED_FILE).unlink()
    frame, labels = tiny_frame()
    assert compare_precisions(folder, frame, labels) is None
    assert not (folder / QUANTIZATION_FILE).exists()
    with pytest.raises(ValueError, match="240 frame rows and 3 labels"):  # 12 users x 20 items
        compare_precisions(ranker_64, frame, labels[:3])


@pytest.mark.parametrize(("full_ndcg", "quant_ndcg", "full_p99", "quant_p99", "use"), [
    (0.300, 0.299, 2.0, 1.0, True),    # loses 0.001 <= 0.002, faster
    (0.500, 0.498, 2.0, 1.0, True),    # loses exactly 0.002: within (the bound is included)
    (0.300, 0.2979, 2.0, 1.0, False),  # loses 0.0021 > 0.002
    (0.300, 0.310, 2.0, 1.0, True),    # gains 0.01, faster
    (0.300, 0.300, 1.0, 1.0, False),   # as good but not faster: p99 must be strictly lower
    (0.300, 0.300, 1.0, 1.5, False),   # as good, slower
    (0.300, 0.250, 2.0, 0.1, False),   # 20x faster but loses 0.05
])
def test_decision_rule(full_ndcg: float, quant_ndcg: float, full_p99: float, quant_p99: float, use: bool) -> None:
    assert quantized_is_better(_report(full_ndcg, quant_ndcg, full_p99, quant_p99)) is use


def _folder(tmp_path: Path, variant: bool, report: QuantizationReport | None | str) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    if variant:
        (folder / QUANTIZED_FILE).write_bytes(b"tflite")  # choose_variant only checks that it exists
    if isinstance(report, QuantizationReport):
        (folder / QUANTIZATION_FILE).write_text(json.dumps(report.to_json()))
    elif isinstance(report, str):
        (folder / QUANTIZATION_FILE).write_text(report)
    return folder


YES = _report(0.30, 0.30, 2.0, 1.0)
NO = _report(0.30, 0.29, 2.0, 1.0)


@pytest.mark.parametrize(("variant", "report", "precision", "chosen"), [
    (True, YES, "auto", "quantized"),
    (True, NO, "auto", "full"),         # the comparison says no
    (False, YES, "auto", "full"),       # the variant file is missing
    (True, None, "auto", "full"),       # never compared
    (True, "{not json", "auto", "full"),  # an unreadable comparison is no comparison
    (True, YES, "full", "full"),        # configured: full wins over a favourable comparison
    (True, NO, "quantized", "quantized"),  # configured: quantized wins over the comparison
])
def test_choose_variant(tmp_path: Path, variant: bool, report: QuantizationReport | None | str, precision: str,
                        chosen: str) -> None:
    assert choose_variant(_folder(tmp_path, variant, report), precision)[0] == chosen


def test_choose_variant_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    folder = _folder(tmp_path, False, None)
    with pytest.raises(FileNotFoundError, match=f"RECSYS_RANKER_PRECISION=quantized but .*{QUANTIZED_FILE} is missing"):
        choose_variant(folder, "quantized")
    with pytest.raises(ValueError, match="ranker precision 'int4' is not one of auto, full, quantized"):
        choose_variant(folder, "int4")


def test_load_scorer_reads_the_precision_setting(ranker_64: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(ranker_64, tmp_path / "ranker")
    (folder / QUANTIZATION_FILE).write_text(json.dumps(YES.to_json()))
    monkeypatch.delenv("RECSYS_RANKER_PRECISION", raising=False)
    assert load_scorer(folder).variant == "quantized"  # default auto, the comparison says yes
    monkeypatch.setenv("RECSYS_RANKER_PRECISION", "full")
    scorer = load_scorer(folder)
    assert (scorer.variant, scorer.version) == ("full", "r64")
    monkeypatch.setenv("RECSYS_RANKER_PRECISION", "auto")
    (folder / QUANTIZATION_FILE).write_text(json.dumps(NO.to_json()))
    assert load_scorer(folder).variant == "full"


def test_int8_scorer_is_safe_across_threads(ranker_64: Path) -> None:
    """The service calls the ranker from several threads: each gets its own interpreter, so
    concurrent calls give the same scores as one call alone."""
    from concurrent.futures import ThreadPoolExecutor

    scorer = RankerScorer(ranker_64, "quantized")
    feats, items, ids = user_and_items(2)
    alone = scorer.score(feats, items, ids, np.zeros(len(ids)), WHEN)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: scorer.score(feats, items, ids, np.zeros(len(ids)), WHEN), range(40)))
    for got in results:
        np.testing.assert_array_equal(got, alone)
