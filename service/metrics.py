"""The service's Prometheus series, on prometheus-client.

Each app owns its own ``CollectorRegistry`` (tests and benchmarks run several apps in
one process, and a module-level default registry would merge their counts). The
``*_created`` series are off: scrapers of this service want counts and histograms,
and every labelled child would otherwise add a timestamp line to each scrape.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_metrics

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


class ServiceMetrics:
    """Every series the service exports; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.http_requests = Counter(
            "mecs_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "mecs_http_request_duration_seconds",
            "HTTP handling time in the server",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.infer_requests = Counter(
            "mecs_inference_requests",
            "infer requests by model, version and status",
            ["model", "version", "status"],
            registry=r,
        )
        self.infer_latency = Histogram(
            "mecs_inference_duration_seconds",
            "infer request time in the server (body read to response built)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.samples = Counter(
            "mecs_inference_samples", "states corrected", ["model", "version"], registry=r
        )
        self.batch_size = Histogram(
            "mecs_batch_size",
            "samples per forward pass",
            ["model", "version"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "mecs_batch_requests",
            "requests per forward pass",
            ["model", "version"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.forward_latency = Histogram(
            "mecs_forward_duration_seconds",
            "forward pass time",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mecs_batch_queue_wait_seconds",
            "time a request waited for its batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
        self.versions_loaded = Gauge(
            "mecs_model_versions_loaded", "versions held in memory per model", ["model"], registry=r
        )
        self.loads = Counter(
            "mecs_model_loads", "model version loads by outcome", ["model", "outcome"], registry=r
        )

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

    def forget_version_served(self, model: str) -> None:
        """Drop a model's served-version series (the model was unloaded)."""
        with contextlib.suppress(KeyError):
            self.version_served.remove(model)

    def render(self) -> str:
        """The text exposition of every series."""
        return generate_latest(self.registry).decode()
