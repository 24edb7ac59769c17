"""The coupled forecast: a host model corrected at every step, locally or over HTTP.

    x_{n+1} = host.step(x_n) + dt * c(x_n)

``c`` is either :class:`LocalCorrection` (a :class:`~correction.inference.Corrector`
in this process, with the same guardrails the service applies, so both paths give
the same numbers) or :class:`ServiceCorrection` (a :class:`~service.client.CorrectionClient`;
the whole ensemble goes in one batched request per step). The arithmetic is the
one of :class:`~correction.inference.CorrectedHost`, in float64, so a run over the
service equals the in-process run to float tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from correction.hosts import HostModel
from correction.inference import Corrector

from .client import CorrectionClient
from .guardrails import GuardedCorrector


class CorrectionSource(Protocol):
    """What the forecast loop calls: ``[M, *shape]`` float64 -> correction, same shape."""

    description: str
    version: int | None
    degraded_steps: int
    ood_sample_steps: int
    capped_values: int

    def __call__(self, state: np.ndarray) -> np.ndarray: ...


class LocalCorrection:
    """A corrector in this process, with the service's runtime and guardrails."""

    def __init__(
        self,
        corrector: Corrector,
        cap_std: float | None = 10.0,
        ood_threshold_std: float = 6.0,
        runtime: str = "onnxruntime",
    ) -> None:
        self.corrector = corrector
        # one model, one steady state size: ONNX Runtime's memory arena pays here
        self.forward = GuardedCorrector(corrector, cap_std, ood_threshold_std, runtime, arena=True)
        self.dtype = self.forward.dtype
        self.version = int(corrector.version) if corrector.version is not None else None
        self.description = f"in-process {corrector.name} v{self.version}"
        self.degraded_steps = 0
        self.ood_sample_steps = 0
        self.capped_values = 0

    def __call__(self, state: np.ndarray) -> np.ndarray:
        self.corrector.layout.check_state(state)
        corr, ood, capped = self.forward(np.ascontiguousarray(state, dtype=self.dtype))
        self.ood_sample_steps += int(ood.sum())
        self.capped_values += int(capped.sum())
        return corr.astype(state.dtype)

    def variables(self) -> list[dict[str, Any]]:
        layout = self.corrector.layout
        return [
            {"name": f, "dims": list(layout.field_dims[f]), "units": layout.units.get(f, "1")}
            for f in layout.fields
        ]


class ServiceCorrection:
    """Corrections from the service: one request per step for all members."""

    def __init__(self, client: CorrectionClient, dt: float | None = None) -> None:
        self.client = client
        self.dt = dt
        self.version: int | None = None
        self.description = f"service {client.url} model {client.model}"
        self.ood_sample_steps = 0
        self.capped_values = 0
        self._seen: object = None

    @property
    def degraded_steps(self) -> int:
        return self.client.degraded_steps

    def __call__(self, state: np.ndarray) -> np.ndarray:
        corr = self.client.correct(state, dt=self.dt)
        last = self.client.last_result
        if last is not None and last is not self._seen:  # a fresh answer, not a degraded one
            self._seen = last
            self.version = last.model_version
            self.ood_sample_steps += sum(last.out_of_distribution)
            self.capped_values += last.capped_values
        return corr

    def variables(self) -> list[dict[str, Any]]:
        return self.client.metadata()["parameters"]["variables"]


@dataclass
class ForecastResult:
    """Output states ``[time, member, *shape]`` and the run's figures."""

    states: np.ndarray
    steps: np.ndarray
    versions: np.ndarray
    latencies_s: np.ndarray
    step_wall_s: np.ndarray
    wall_time_s: float
    degraded_steps: int
    ood_sample_steps: int
    capped_values: int
    stats: dict[str, Any] = field(default_factory=dict)


def _percentiles_us(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"p50_us": float("nan"), "p99_us": float("nan")}
    p50, p99 = np.percentile(values, [50, 99]) * 1e6
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def run_forecast(
    host: HostModel,
    x0: np.ndarray,
    steps: int,
    correction: CorrectionSource,
    output_every: int = 1,
    progress: Callable[[int], None] | None = None,
) -> ForecastResult:
    """Step ``x0`` (``[members, *state_shape]``) ``steps`` times with the correction.

    States are kept at step 0, every ``output_every`` steps and at the last step.
    Raises ``FloatingPointError`` naming the step if the forecast leaves the finite
    numbers (the service would refuse such a state anyway).
    """
    if steps < 1 or output_every < 1:
        raise ValueError("steps and output_every must be >= 1")
    x = np.array(x0, dtype=np.float64)
    if tuple(x.shape[1:]) != tuple(host.state_shape):
        raise ValueError(
            f"initial state has shape {list(x.shape)}, host '{host.name}' needs "
            f"[members, {', '.join(map(str, host.state_shape))}]"
        )
    states, kept, versions = [x.copy()], [0], []
    latencies = np.empty(steps)
    walls = np.empty(steps)
    t_start = time.perf_counter()
    with torch.no_grad():
        for n in range(1, steps + 1):
            t0 = time.perf_counter()
            corr = correction(x)
            t1 = time.perf_counter()
            nxt = host.step(torch.from_numpy(x))
            nxt = np.asarray(nxt.numpy() if isinstance(nxt, torch.Tensor) else nxt, np.float64)
            x = nxt + host.dt * corr
            walls[n - 1] = time.perf_counter() - t0
            latencies[n - 1] = t1 - t0
            if n == 1:
                versions.append(correction.version)
            if not np.isfinite(x).all():
                raise FloatingPointError(f"forecast left the finite numbers at step {n}")
            if n % output_every == 0 or n == steps:
                states.append(x.copy())
                kept.append(n)
                versions.append(correction.version)
            if progress is not None:
                progress(n)
    wall = time.perf_counter() - t_start
    result = ForecastResult(
        states=np.stack(states),
        steps=np.asarray(kept),
        versions=np.asarray([-1 if v is None else v for v in versions], dtype=np.int64),
        latencies_s=latencies,
        step_wall_s=walls,
        wall_time_s=wall,
        degraded_steps=correction.degraded_steps,
        ood_sample_steps=correction.ood_sample_steps,
        capped_values=correction.capped_values,
    )
    lat, step = _percentiles_us(latencies), _percentiles_us(walls)
    result.stats = {
        "correction_latency_p50_us": lat["p50_us"],
        "correction_latency_p99_us": lat["p99_us"],
        "step_p50_us": step["p50_us"],
        "step_p99_us": step["p99_us"],
        "wall_time_s": round(wall, 3),
        "degraded_steps": result.degraded_steps,
        "out_of_distribution_sample_steps": result.ood_sample_steps,
        "capped_values": result.capped_values,
    }
    return result
