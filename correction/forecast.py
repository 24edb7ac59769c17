"""The coupled forecast: a host model corrected at every step, locally or over HTTP.

    x_{n+1} = host.step(x_n) + dt * c(x_n)

``c`` is any :class:`~correction.corrections.Correction`: in this process
:class:`~correction.guardrails.GuardedCorrection` (the service's forward path and
guardrails), or :class:`~service.remote.RemoteCorrection` (the service over HTTP;
the whole ensemble goes in one batched request per step). The loop is the one
rollout (:func:`correction.rollout.rollout`) in float64, so a run over the service
equals the in-process run to float tolerance by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .corrections import Correction
from .hosts import HostModel
from .rollout import rollout


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


class _Timed(Correction):
    """Times each call of the correction it wraps (the step's correction latency)."""

    def __init__(self, inner: Correction) -> None:
        self.inner, self.last_s = inner, 0.0

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.inner.tendency(x)
        self.last_s = time.perf_counter() - t0
        return y


class _Float64Host:
    """A host whose steps come back as float64 tensors (numpy hosts included)."""

    def __init__(self, host: HostModel) -> None:
        self.host, self.dt = host, host.dt
        self.name, self.state_shape = host.name, host.state_shape
        self.differentiable = False

    def step(self, x: torch.Tensor) -> torch.Tensor:
        nxt = self.host.step(x)
        if not isinstance(nxt, torch.Tensor):
            nxt = torch.from_numpy(np.asarray(nxt))
        return nxt.to(torch.float64)


def _percentiles_us(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"p50_us": float("nan"), "p99_us": float("nan")}
    p50, p99 = np.percentile(values, [50, 99]) * 1e6
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def run_forecast(
    host: HostModel,
    x0: np.ndarray,
    steps: int,
    correction: Correction,
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
    timed = _Timed(correction)
    t_step = [time.perf_counter()]

    def after(n: int, xt: torch.Tensor) -> None:
        now = time.perf_counter()
        walls[n - 1] = now - t_step[0]
        latencies[n - 1] = timed.last_s
        t_step[0] = now
        if n == 1:
            versions.append(correction.version)
        arr = xt.numpy()
        if not np.isfinite(arr).all():
            raise FloatingPointError(f"forecast left the finite numbers at step {n}")
        if n % output_every == 0 or n == steps:
            states.append(arr.copy())
            kept.append(n)
            versions.append(correction.version)
        if progress is not None:
            progress(n)

    t_start = time.perf_counter()
    t_step[0] = t_start
    rollout(_Float64Host(host), timed, torch.from_numpy(x), steps, on_step=after)
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
