"""Forecast-skill and climate evaluation on the l96 benchmarks.

Reference forecasts (docs/architecture.md): the uncorrected host; a cubic polynomial
of the local X fitted by least squares to the increments (the classic
parameterization a learned correction must beat); the learned model(s); and the
*limit*, the two-scale truth model started from (analysis X, true Y). Skill is the
RMSE of X against the truth by lead time and the valid time, the first lead at
which RMSE / climatological std of X exceeds 0.5 (linearly interpolated between
stored leads). As in Brajard et al. (2020) and Farchi et al., the valid time is
computed for each forecast and averaged over the initial times; the valid time of
the mean RMSE curve is reported beside it. Long free runs check stability and
climate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from correction.corrections import Correction, PolynomialCorrection, as_correction
from correction.hosts import HostModel, Lorenz96, Lorenz96TwoScale
from correction.rollout import rollout
from data_pipeline.benchmarks import L96Benchmark

from .metrics import VALID_THRESHOLD, climate_stats, hellinger, valid_time

REPORT_LEADS = (0.2, 1.0, 2.0)


@dataclass
class Benchmark:
    """What evaluation needs from a ``mecs synth`` directory."""

    config: dict[str, Any]
    times: np.ndarray
    truth_x: np.ndarray
    truth_y_times: np.ndarray
    truth_y: Any  # lazy xarray DataArray (time_y, k, j)
    analyses: np.ndarray
    test_start: float

    @classmethod
    def open(cls, path: str | Path) -> Benchmark:
        from correction.storage import open_zarr

        path = Path(path)
        summary = json.loads((path / "config.json").read_text())
        truth = open_zarr(path / "truth.zarr")
        ana = open_zarr(path / "analyses.zarr")
        return cls(
            config=summary["config"],
            times=truth["time"].values,
            truth_x=truth["X"].values.astype(np.float64),
            truth_y_times=truth["time_y"].values,
            truth_y=truth["Y"],
            analyses=ana["X"].values.astype(np.float64),
            test_start=float(summary["test_start"]),
        )

    @property
    def benchmark(self) -> L96Benchmark:
        return L96Benchmark.of(self.config)

    @property
    def host(self) -> Lorenz96:
        return self.benchmark.host()

    @property
    def truth_model(self) -> Lorenz96TwoScale:
        return self.benchmark.truth_model()

    @property
    def dt_out(self) -> float:
        return float(self.config["obs_interval"])


def run_forecasts(
    host: HostModel,
    x0: np.ndarray,
    n_out: int,
    steps_per_out: int,
    correction: Correction | Callable[[torch.Tensor], torch.Tensor] | None = None,
    blowup: float = 1e3,
) -> np.ndarray:
    """Corrected host runs ``[n_init, n_out + 1, K]``; NaN after a run blows up."""
    correction = as_correction(correction)
    out = np.full((x0.shape[0], n_out + 1, x0.shape[1]), np.nan)
    x = torch.from_numpy(x0.astype(np.float64))
    out[:, 0] = x0
    for i in range(1, n_out + 1):
        x = rollout(host, correction, x, steps_per_out)
        arr = x.numpy()
        bad = ~np.isfinite(arr).all(axis=1) | (np.abs(arr).max(axis=1) > blowup)
        if bad.any():
            x = torch.where(torch.from_numpy(bad)[:, None], torch.zeros_like(x), x)
            arr = arr.copy()
            arr[bad] = np.nan
        out[:, i] = arr
        if bad.all():
            break
    return out


def fit_polynomial(increments: str | Path) -> PolynomialCorrection:
    """The cubic of the local X fitted to the training split of an increment store."""
    from correction.training.data import IncrementSource

    source = IncrementSource.open(increments)
    x, y = source.read_indices(source.indices("train"))
    return PolynomialCorrection.fit(x, y)


def evaluate(
    bench: Benchmark,
    correctors: dict[str, Correction | Callable[[torch.Tensor], torch.Tensor]],
    poly: PolynomialCorrection | None = None,
    lead_max: float = 5.0,
    init_every: float | None = None,
    free_run: float = 500.0,
    max_inits: int | None = None,
    keep_trajectories: bool = False,
) -> dict[str, Any]:
    """Forecast skill and free-run climate for none / poly3 / each model / limit."""
    dt_out = bench.dt_out
    per_out_host = int(round(dt_out / bench.config["dt_host"]))
    per_out_truth = int(round(dt_out / bench.config["dt_truth"]))
    n_out = int(round(lead_max / dt_out))
    leads = np.round(np.arange(n_out + 1) * dt_out, 10)
    stride = int(round((init_every or bench.config["forecast_init_every"]) / dt_out))
    first = int(np.searchsorted(bench.times, bench.test_start - 1e-9))
    idx = np.arange(first, len(bench.times) - n_out, stride)
    if max_inits:
        idx = idx[:max_inits]
    if len(idx) == 0:
        raise ValueError("the test period is shorter than the forecast lead: no initial times")
    x0 = bench.analyses[idx]
    truth = np.stack([bench.truth_x[i : i + n_out + 1] for i in idx])
    clim_std = float(bench.truth_x.std())

    tendencies: dict[str, Correction | None] = {"none": None}
    if poly is not None:
        tendencies["poly3"] = poly
    for label, c in correctors.items():
        tendencies[label] = as_correction(c, label)

    host = bench.host
    runs = {
        label: run_forecasts(host, x0, n_out, per_out_host, t) for label, t in tendencies.items()
    }
    # the limit: the truth model from analysis X and the true Y at the initial time
    y_idx = np.searchsorted(bench.truth_y_times, bench.times[idx] - 1e-9)
    if not np.allclose(bench.truth_y_times[y_idx], bench.times[idx]):
        raise ValueError("truth Y is not stored at the forecast initial times (y_stride > 1?)")
    y0 = bench.truth_y.isel(time_y=y_idx).values.astype(np.float64)
    tm = bench.truth_model
    state = tm.join(torch.from_numpy(x0), torch.from_numpy(y0))
    limit = np.empty_like(truth)
    limit[:, 0] = x0
    for i in range(1, n_out + 1):
        state = rollout(tm, None, state, per_out_truth)
        limit[:, i] = state[:, : tm.K].numpy()
    runs["limit"] = limit

    forecasts: dict[str, Any] = {}
    for label, fc in runs.items():
        per_init = np.sqrt(np.mean((fc - truth) ** 2, axis=2))  # [n_init, n_lead]
        rmse = np.sqrt(np.mean(per_init**2, axis=0))
        vts = np.array([valid_time(leads, r / clim_std) for r in per_init])
        forecasts[label] = {
            "rmse": rmse.tolist(),
            "valid_time": float(vts.mean()),
            "valid_time_median": float(np.median(vts)),
            "valid_time_std": float(vts.std()),
            "valid_time_of_mean_rmse": valid_time(leads, rmse / clim_std),
            "rmse_at": {
                str(t): float(rmse[int(round(t / dt_out))]) for t in REPORT_LEADS if t <= lead_max
            },
        }
    none_vt, limit_vt = forecasts["none"]["valid_time"], forecasts["limit"]["valid_time"]
    for label in forecasts:
        gap = limit_vt - none_vt
        forecasts[label]["gap_closed"] = (
            (forecasts[label]["valid_time"] - none_vt) / gap if gap > 0 else float("nan")
        )

    for f in forecasts.values():  # the shared per-field form (see verification.py)
        f["fields"] = {"X": {"units": "1", "levels": None, "rmse": list(f["rmse"])}}
    metrics: dict[str, Any] = {
        "schema": "mecs-evaluation/1",
        "kind": "truth",
        "n_inits": int(len(idx)),
        "init_times": bench.times[idx].tolist(),
        "lead_times": leads.tolist(),
        "clim_std": clim_std,
        "valid_threshold": VALID_THRESHOLD,
        "forecasts": forecasts,
    }
    if poly is not None:
        metrics["poly3_coefficients"] = poly.coefficients.tolist()

    if free_run > 0:
        n_free = int(round(free_run / dt_out))
        lo, hi = np.quantile(bench.truth_x, [0.0005, 0.9995])
        bins = np.linspace(lo - 1.0, hi + 1.0, 61)
        width = float(bins[1] - bins[0])
        truth_stats = climate_stats(bench.truth_x, dt_out, bins)
        free: dict[str, Any] = {"length": free_run, "bins": bins.tolist(), "truth": truth_stats}
        start = bench.analyses[first : first + 1]
        for label, t in tendencies.items():
            run = run_forecasts(host, start, n_free, per_out_host, t)[0]
            s = climate_stats(run, dt_out, bins)
            s["mean_rel_err"] = abs(s["mean"] - truth_stats["mean"]) / abs(truth_stats["mean"])
            s["std_rel_err"] = abs(s["std"] - truth_stats["std"]) / truth_stats["std"]
            s["pdf_hellinger"] = hellinger(s["hist"], truth_stats["hist"], width)
            free[label] = s
        metrics["free_run"] = free
    if keep_trajectories:
        metrics["_trajectories"] = {"truth": truth[0], **{k: v[0] for k, v in runs.items()}}
    return metrics
