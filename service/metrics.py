"""A small Prometheus registry (text exposition format 0.0.4), no dependency.

The service records a few dozen series; a hand-written registry keeps the hot
path to a dict lookup and a bisect per observation, and avoids another pinned
dependency. Updates happen on the event loop thread (and rarely from loader
threads, where the GIL makes the single dict/list updates atomic enough for
counters that only grow).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in self.values.items()
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = float(value)

    def remove(self, *labels: str) -> None:
        self.values.pop(labels, None)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, doc: str, labels: Sequence[str] = (), buckets: Iterable[float] = ()
    ) -> None:
        super().__init__(name, doc, labels)
        self.buckets = tuple(sorted(buckets or LATENCY_BUCKETS))
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket, +Inf, sum

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-1] += value

    def count(self, *labels: str) -> int:
        s = self.series.get(labels)
        return int(sum(s[:-1])) if s else 0

    def render(self) -> list[str]:
        lines = self.header()
        for key, s in self.series.items():
            cum = 0.0
            for bound, n in zip((*self.buckets, math.inf), s[:-1], strict=True):
                cum += n
                le = f'le="{_num(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(cum)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(s[-1])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(cum)}")
        return lines


class ServiceMetrics:
    """Every series the service exports; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "mecs_http_requests_total",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
        )
        self.http_latency = Histogram(
            "mecs_http_request_duration_seconds",
            "HTTP handling time in the server",
            ["endpoint"],
        )
        self.infer_requests = Counter(
            "mecs_inference_requests_total",
            "infer requests by model, version and status",
            ["model", "version", "status"],
        )
        self.infer_latency = Histogram(
            "mecs_inference_duration_seconds",
            "infer request time in the server (body read to response built)",
            ["model", "version"],
        )
        self.samples = Counter(
            "mecs_inference_samples_total", "states corrected", ["model", "version"]
        )
        self.batch_size = Histogram(
            "mecs_batch_size", "samples per forward pass", ["model", "version"], SIZE_BUCKETS
        )
        self.batch_requests = Histogram(
            "mecs_batch_requests", "requests per forward pass", ["model", "version"], SIZE_BUCKETS
        )
        self.forward_latency = Histogram(
            "mecs_forward_duration_seconds", "forward pass time", ["model", "version"]
        )
        self.queue_wait = Histogram(
            "mecs_batch_queue_wait_seconds", "time a request waited for its batch", ["model"]
        )
        self.rejected = Counter(
            "mecs_rejected_inputs_total",
            "infer requests rejected by validation",
            ["model", "reason"],
        )
        self.ood_samples = Counter(
            "mecs_out_of_distribution_samples_total",
            "samples whose input lies far outside the training statistics",
            ["model", "version"],
        )
        self.ood_requests = Counter(
            "mecs_out_of_distribution_requests_total",
            "requests with at least one out-of-distribution sample",
            ["model", "version"],
        )
        self.capped = Counter(
            "mecs_capped_values_total",
            "correction values clipped by the magnitude cap",
            ["model", "version"],
        )
        self.client_degraded = Counter(
            "mecs_client_degraded_steps_total",
            "steps clients ran without a fresh correction, as they report on reconnection",
            ["model"],
        )
        self.overloaded = Counter(
            "mecs_overload_rejections_total", "requests refused with 503 (queue full)", ["model"]
        )
        self.auth_failures = Counter(
            "mecs_auth_failures_total", "requests refused by authentication", ["reason"]
        )
        self.version_served = Gauge(
            "mecs_model_version_served", "default version answered for each model", ["model"]
        )
        self.versions_loaded = Gauge(
            "mecs_model_versions_loaded", "versions held in memory per model", ["model"]
        )
        self.loads = Counter(
            "mecs_model_loads_total", "model version loads by outcome", ["model", "outcome"]
        )

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
