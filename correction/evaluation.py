"""Forecast-skill and climate evaluation on the l96 benchmarks.

Reference forecasts (DESIGN section 3): the uncorrected host; a cubic polynomial
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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from correction.hosts import Lorenz96, Lorenz96TwoScale
from correction.inference import Corrector

Tendency = Callable[[torch.Tensor], torch.Tensor]
VALID_THRESHOLD = 0.5
REPORT_LEADS = (0.2, 1.0, 2.0)
ACF_LAGS = (0.05, 0.25, 0.5, 1.0)


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
        from data_pipeline.stores import open_zarr

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
    def host(self) -> Lorenz96:
        c = self.config
        return Lorenz96(K=c["K"], F=c["host_F"], dt=c["dt_host"])

    @property
    def truth_model(self) -> Lorenz96TwoScale:
        c = self.config
        return Lorenz96TwoScale(
            K=c["K"], J=c["J"], F=c["F"], h=c["h"], b=c["b"], c=c["c"], dt=c["dt_truth"]
        )

    @property
    def dt_out(self) -> float:
        return float(self.config["obs_interval"])


class PolynomialCorrection:
    """Cubic polynomial of the local X, fitted by least squares (the baseline)."""

    def __init__(self, coefficients: np.ndarray) -> None:
        self.coefficients = np.asarray(coefficients, dtype=np.float64)

    @classmethod
    def fit(cls, state: np.ndarray, target: np.ndarray, degree: int = 3) -> PolynomialCorrection:
        x, y = state.ravel().astype(np.float64), target.ravel().astype(np.float64)
        design = np.vander(x, degree + 1, increasing=True)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        return cls(coef)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for p, a in enumerate(self.coefficients):
            out = out + float(a) * x**p
        return out


def corrector_tendency(corrector: Corrector) -> Tendency:
    return corrector.forward


def run_forecasts(
    host: Lorenz96,
    x0: np.ndarray,
    n_out: int,
    steps_per_out: int,
    tendency: Tendency | None = None,
    blowup: float = 1e3,
) -> np.ndarray:
    """Corrected host runs ``[n_init, n_out + 1, K]``; NaN after a run blows up."""
    out = np.full((x0.shape[0], n_out + 1, x0.shape[1]), np.nan)
    x = torch.from_numpy(x0.astype(np.float64))
    out[:, 0] = x0
    with torch.no_grad():
        for i in range(1, n_out + 1):
            for _ in range(steps_per_out):
                nxt = host.step(x)
                if tendency is not None:
                    nxt = nxt + host.dt * tendency(x).to(x.dtype)
                x = nxt
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


def valid_time(leads: np.ndarray, normalised_rmse: np.ndarray) -> float:
    """First lead where the normalised RMSE exceeds the threshold (interpolated)."""
    above = np.flatnonzero(~(normalised_rmse <= VALID_THRESHOLD))
    if len(above) == 0:
        return float(leads[-1])
    i = above[0]
    if i == 0 or not np.isfinite(normalised_rmse[i]):
        return float(leads[i])
    e0, e1 = normalised_rmse[i - 1], normalised_rmse[i]
    return float(leads[i - 1] + (VALID_THRESHOLD - e0) / (e1 - e0) * (leads[i] - leads[i - 1]))


def climate_stats(x: np.ndarray, dt: float, bins: np.ndarray) -> dict[str, Any]:
    """Mean, std, lag autocorrelation and a histogram of a run ``[time, K]``."""
    finite = np.isfinite(x).all(axis=1)
    n_ok = int(np.argmin(finite)) if not finite.all() else len(x)
    x = x[:n_ok]
    anomalies = x - x.mean(axis=0)
    var = (anomalies**2).mean(axis=0)
    acf = {}
    for lag in ACF_LAGS:
        s = int(round(lag / dt))
        if 0 < s < len(x):
            acf[str(lag)] = float(np.mean((anomalies[:-s] * anomalies[s:]).mean(axis=0) / var))
    hist, _ = np.histogram(x, bins=bins, density=True)
    return {
        "bounded": bool(n_ok == len(finite)),
        "length": float(n_ok * dt),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "acf": acf,
        "hist": hist.tolist(),
    }


def hellinger(p: np.ndarray, q: np.ndarray, width: float) -> float:
    """Hellinger distance between two densities on the same bins (0 same, 1 disjoint)."""
    p, q = np.asarray(p) * width, np.asarray(q) * width
    return float(np.sqrt(max(0.0, 1.0 - np.sum(np.sqrt(p * q)))))


def evaluate(
    bench: Benchmark,
    correctors: dict[str, Corrector | Tendency],
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

    tendencies: dict[str, Tendency | None] = {"none": None}
    if poly is not None:
        tendencies["poly3"] = poly
    for label, c in correctors.items():
        tendencies[label] = c.forward if isinstance(c, Corrector) else c

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
    with torch.no_grad():
        for i in range(1, n_out + 1):
            for _ in range(per_out_truth):
                state = tm.step(state)
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

    metrics: dict[str, Any] = {
        "schema": "mecs-evaluation/1",
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


def write_plots(metrics: dict[str, Any], out: Path) -> list[Path]:
    """RMSE vs lead, a Hovmoller diagram and climate PDFs as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    leads = np.asarray(metrics["lead_times"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, f in metrics["forecasts"].items():
        ax.plot(
            leads,
            np.asarray(f["rmse"]) / metrics["clim_std"],
            label=f"{label} (valid {f['valid_time']:.2f})",
        )
    ax.axhline(VALID_THRESHOLD, color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="lead time (MTU)",
        ylabel="RMSE / climatological std",
        title=f"Forecast error over {metrics['n_inits']} test initial times",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "rmse_vs_lead.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    traj = metrics.get("_trajectories")
    if traj is not None:
        panels = ["truth", "none"] + [k for k in traj if k not in ("truth", "none", "limit")]
        fig, axes = plt.subplots(
            1, len(panels), figsize=(3.2 * len(panels), 3.6), sharey=True, layout="constrained"
        )
        vmax = float(np.nanmax(np.abs(traj["truth"])))
        for ax, label in zip(np.atleast_1d(axes), panels, strict=True):
            im = ax.pcolormesh(
                np.arange(1, traj[label].shape[1] + 1),
                leads,
                traj[label],
                cmap="RdBu_r",
                vmin=-vmax,
                vmax=vmax,
                shading="auto",
            )
            ax.set(title=label, xlabel="k")
        np.atleast_1d(axes)[0].set_ylabel("lead time (MTU)")
        fig.colorbar(im, ax=axes, shrink=0.8, label="X")
        paths.append(out / "hovmoller.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    free = metrics.get("free_run")
    if free is not None:
        bins = np.asarray(free["bins"])
        centres = 0.5 * (bins[1:] + bins[:-1])
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, s in free.items():
            if isinstance(s, dict) and "hist" in s:
                ax.plot(centres, s["hist"], label=label, lw=2.5 if label == "truth" else 1.2)
        ax.set(
            xlabel="X",
            ylabel="density",
            yscale="log",
            title=f"Climate PDFs, {free['length']:.0f}-MTU free runs",
        )
        ax.set_ylim(bottom=1e-4)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "climate_pdf.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def clean_for_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop private entries and turn NaN into null so the file is strict JSON."""

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items() if not k.startswith("_")}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return fix(metrics)
