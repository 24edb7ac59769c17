"""Read a ``/metrics`` scrape the way Prometheus does, not by string matching.

Exposition details (``2`` or ``2.0``, ``le="4"`` or ``le="4.0"``) are the library's to
choose; a test asserts the parsed value of a series.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def _key(labels: dict[str, str]) -> frozenset[tuple[str, str]]:
    out = {}
    for name, value in labels.items():
        out[name] = str(float(value)) if name == "le" else value
    return frozenset(out.items())


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, _key(s.labels))] = s.value
    return samples


def metric_value(text: str, name: str, **labels: str | float) -> float | None:
    """The value of one sample (``None`` when the series does not exist)."""
    key = _key({k: str(v) for k, v in labels.items()})
    return scrape(text).get((name, key))
