"""The service's Prometheus series, on prometheus-client.

Each app owns its own ``CollectorRegistry`` (tests and benchmarks run several apps in
one process, and a module-level default registry would merge their counts). The
``*_created`` series are off: scrapers of this service want counts and histograms,
and every labelled child would otherwise add a timestamp line to each scrape.

The nine series every infer call updates (HTTP and inference counts and
latencies, batch sizes, forward and queue times) are :class:`FastCounter` and
:class:`FastHistogram`: plain numbers updated on the event loop thread, handed
to prometheus-client as metric families when ``/metrics`` is scraped (a custom
collector on the same registry; exposition, parsing and names stay the
library's). prometheus-client's own ``inc``/``observe`` take a lock and make
four to six Python calls each; on the infer path that was 60 of the server's
430 Python calls per request (``bench/profile_calls.py``). The rare series
(rejections, loads, versions) stay prometheus-client objects.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

_disable_created_metrics()

#: the Prometheus text exposition format that ``render`` writes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class FastCounter:
    """A labelled counter of plain floats (event loop thread only), exposed on scrape."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], _CounterChild] = {}

    def labels(self, *values: str) -> _CounterChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[self._check(values)] = _CounterChild()
        return child

    def _check(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        return tuple(str(v) for v in values)

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self.children.items()):
            fam.add_metric(values, child.value)
        return fam


class FastHistogram(FastCounter):
    """A labelled histogram of plain counts (event loop thread only), exposed on scrape."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.children: dict[tuple[str, ...], _HistogramChild] = {}  # type: ignore[assignment]

    def labels(self, *values: str) -> _HistogramChild:  # type: ignore[override]
        child = self.children.get(values)
        if child is None:
            child = self.children[self._check(values)] = _HistogramChild(self.bounds)
        return child

    def family(self) -> HistogramMetricFamily:  # type: ignore[override]
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self.children.items()):
            running, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), child.counts, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            fam.add_metric(values, buckets, child.sum)
        return fam


class _FastCollector:
    """Hands the fast series to prometheus-client at scrape time."""

    def __init__(self, metrics: list[FastCounter]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for m in self.metrics:
            yield m.family()


class ServiceMetrics:
    """Every series the service exports; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.http_requests = FastCounter(
            "mecs_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
        )
        self.http_latency = FastHistogram(
            "mecs_http_request_duration_seconds",
            "HTTP handling time in the server",
            ["endpoint"],
            LATENCY_BUCKETS,
        )
        self.infer_requests = FastCounter(
            "mecs_inference_requests",
            "infer requests by model, version and status",
            ["model", "version", "status"],
        )
        self.infer_latency = FastHistogram(
            "mecs_inference_duration_seconds",
            "infer request time in the server (body read to response built)",
            ["model", "version"],
            LATENCY_BUCKETS,
        )
        self.samples = FastCounter(
            "mecs_inference_samples", "states corrected", ["model", "version"]
        )
        self.batch_size = FastHistogram(
            "mecs_batch_size",
            "samples per forward pass",
            ["model", "version"],
            SIZE_BUCKETS,
        )
        self.batch_requests = FastHistogram(
            "mecs_batch_requests",
            "requests per forward pass",
            ["model", "version"],
            SIZE_BUCKETS,
        )
        self.forward_latency = FastHistogram(
            "mecs_forward_duration_seconds",
            "forward pass time",
            ["model", "version"],
            LATENCY_BUCKETS,
        )
        self.queue_wait = FastHistogram(
            "mecs_batch_queue_wait_seconds",
            "time a request waited for its batch",
            ["model"],
            LATENCY_BUCKETS,
        )
        self.rejected = Counter(
            "mecs_rejected_inputs",
            "infer requests rejected by validation",
            ["model", "reason"],
            registry=r,
        )
        self.ood_samples = Counter(
            "mecs_out_of_distribution_samples",
            "samples whose input lies far outside the training statistics",
            ["model", "version"],
            registry=r,
        )
        self.ood_requests = Counter(
            "mecs_out_of_distribution_requests",
            "requests with at least one out-of-distribution sample",
            ["model", "version"],
            registry=r,
        )
        self.capped = Counter(
            "mecs_capped_values",
            "correction values clipped by the magnitude cap",
            ["model", "version"],
            registry=r,
        )
        self.nonfinite_outputs = Counter(
            "mecs_nonfinite_outputs",
            "infer requests answered 500 because the model returned NaN or Inf",
            ["model", "version"],
            registry=r,
        )
        self.client_degraded = Counter(
            "mecs_client_degraded_steps",
            "steps clients ran without a fresh correction, as they report on reconnection",
            ["model"],
            registry=r,
        )
        self.overloaded = Counter(
            "mecs_overload_rejections",
            "requests refused with 503 (queue full)",
            ["model"],
            registry=r,
        )
        self.admission_refused = Counter(
            "mecs_admission_refusals",
            "requests refused with 503 before their body was read (admission full)",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "mecs_auth_failures", "requests refused by authentication", ["reason"], registry=r
        )
        self.version_served = Gauge(
            "mecs_model_version_served",
            "default version answered for each model",
            ["model"],
            registry=r,
        )
        self.version_stage = Gauge(
            "mecs_model_version_stage",
            "1 for the stage of each loaded version (candidate, production, retired); join "
            "with the request series on model and version",
            ["model", "version", "stage"],
            registry=r,
        )
        self._stages: dict[tuple[str, str], str] = {}
        self.shadow_difference = Histogram(
            "mecs_shadow_difference",
            "RMS difference of a candidate's corrections from production's on live "
            "requests, per field, in training-target standard deviations (shadow mode)",
            ["model", "candidate", "field"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.shadow_requests = Counter(
            "mecs_shadow_requests",
            "requests shadowed on a candidate, by outcome (ok, skipped, failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.recorded_samples = Counter(
            "mecs_recorded_samples",
            "samples recorded for mecs monitor (states and corrections served)",
            ["model"],
            registry=r,
        )
        self.versions_loaded = Gauge(
            "mecs_model_versions_loaded", "versions held in memory per model", ["model"], registry=r
        )
        self.loads = Counter(
            "mecs_model_loads", "model version loads by outcome", ["model", "outcome"], registry=r
        )
        self._register_fast()

    def _register_fast(self) -> None:
        """Expose the :class:`FastCounter` and :class:`FastHistogram` series on ``registry``."""
        fast = [m for m in vars(self).values() if isinstance(m, FastCounter)]
        self.registry.register(_FastCollector(fast))

    def cached(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: the hot path pays a dict lookup, not a lock.

        prometheus-client's ``labels()`` validates and locks on every call (about
        3.5 us against 1 us for the child's own update; ``bench/service.py``); label
        values here are bounded (known model names and versions, route templates).
        """
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_stage(self, model: str, version: str, stage: str) -> None:
        """Move a version's stage series to ``stage`` (one series per version)."""
        old = self._stages.get((model, version))
        if old == stage:
            return
        if old is not None:
            with contextlib.suppress(KeyError):
                self.version_stage.remove(model, version, old)
        self._stages[(model, version)] = stage
        self.version_stage.labels(model, version, stage).set(1)

    def forget_version_served(self, model: str) -> None:
        """Drop a model's served-version series (the model was unloaded)."""
        with contextlib.suppress(KeyError):
            self.version_served.remove(model)

    def render(self) -> str:
        """The text exposition of every series."""
        return generate_latest(self.registry).decode()
