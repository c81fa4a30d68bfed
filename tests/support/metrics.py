"""Reading one sample out of a Prometheus text exposition (what a /metrics endpoint serves)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly these ``labels`` (0.0 when the series is absent:
    a counter that was never incremented has not been created yet)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
