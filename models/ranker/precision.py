"""Which variant of an exported ranker to serve: full precision (the SavedModel) or the int8
TensorFlow Lite variant. The rule (:func:`quantized_is_better`) reads the side-by-side comparison
that :mod:`models.ranker.quantize` writes beside the export (:class:`QuantizationReport`), and
:func:`choose_variant` applies the configured precision (``RECSYS_RANKER_PRECISION``:
``auto``, ``full`` or ``quantized``). Pure logic: no TensorFlow here."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from models.ranker.export import QUANTIZATION_FILE, QUANTIZED_FILE

log = logging.getLogger(__name__)

Precision = Literal["auto", "full", "quantized"]
Variant = Literal["full", "quantized"]
PRECISIONS: tuple[str, ...] = ("auto", "full", "quantized")
#: the largest ndcg@10 the quantised variant may lose against full precision, on the same lists
NDCG_TOLERANCE = 0.002


@dataclass(frozen=True)
class QuantizationReport:
    """Full precision against the quantised variant on the same candidate lists: ndcg@10 over
    the lists, and the p99 in ms of one scoring call of ``batch`` candidates (the same inputs,
    the calls of the two variants interleaved so both see the same machine load)."""

    full_ndcg: float
    quantized_ndcg: float
    full_p99_ms: float
    quantized_p99_ms: float
    lists: int
    batch: int
    calls: int
    max_abs_logit_diff: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "use_quantized": quantized_is_better(self), "ndcg_tolerance": NDCG_TOLERANCE}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantizationReport:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def quantized_is_better(report: QuantizationReport, tolerance: float = NDCG_TOLERANCE) -> bool:
    """True when the quantised variant keeps ndcg@10 within ``tolerance`` of full precision
    (it may also gain) AND its scoring p99 is strictly lower."""
    # rounded: 0.5 - 0.498 is 0.0020000000000000018 in floating point, and "within" includes the bound
    loss = round(report.full_ndcg - report.quantized_ndcg, 9)
    return loss <= tolerance and report.quantized_p99_ms < report.full_p99_ms


def read_report(folder: Path) -> QuantizationReport | None:
    """The comparison written beside the export, or None when there is none or it is unreadable
    (logged): the caller then serves full precision."""
    path = Path(folder) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        return QuantizationReport.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s (%r): serving the ranker at full precision", path, exc)
        return None


def check_precision(precision: str) -> Precision:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming it and the fix."""
    if precision not in PRECISIONS:
        raise ValueError(f"ranker precision {precision!r} is not one of {', '.join(PRECISIONS)} "
                         "(set RECSYS_RANKER_PRECISION to one of them)")
    return precision  # type: ignore[return-value]


def choose_variant(folder: Path, precision: str = "auto") -> tuple[Variant, str]:
    """(variant, why) for the export in ``folder``: ``full`` serves the SavedModel; ``quantized``
    the int8 variant and fails (FileNotFoundError) when the export has none; ``auto`` the int8
    variant only when it exists and the comparison beside it says :func:`quantized_is_better`,
    else full precision."""
    precision = check_precision(precision)
    has_variant = (Path(folder) / QUANTIZED_FILE).is_file()
    if precision == "full":
        return "full", "configured: full"
    if precision == "quantized":
        if not has_variant:
            raise FileNotFoundError(f"RECSYS_RANKER_PRECISION=quantized but {Path(folder) / QUANTIZED_FILE} is "
                                    "missing: re-export the ranker (`recsys train ranker`) or use auto/full")
        return "quantized", "configured: quantized"
    if not has_variant:
        return "full", f"auto: no {QUANTIZED_FILE}"
    report = read_report(folder)
    if report is None:
        return "full", f"auto: no readable {QUANTIZATION_FILE}"
    why = (f"ndcg@10 {report.quantized_ndcg:.4f} vs {report.full_ndcg:.4f}, scoring p99 "
           f"{report.quantized_p99_ms:.3f} vs {report.full_p99_ms:.3f} ms")
    return ("quantized", f"auto: {why}") if quantized_is_better(report) else ("full", f"auto: {why}")
