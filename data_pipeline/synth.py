"""The l96-2s benchmark generator: truth, observations, analyses and forecasts.

The two-scale model is the truth; the one-scale host (no coupling term) is the
imperfect model. Analyses come from an LETKF cycled with the host, or from the
truth plus noise (``noisy-truth``). Forecasts are host runs from the analyses,
stored as ``(init_time, lead_time, k)`` like an operational archive.

One numpy ``SeedSequence`` feeds every random draw, so a seed reproduces the
stores byte for byte.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from correction.storage import staged_directory, write_zarr

from .benchmarks import L96Benchmark
from .config import BenchmarkConfig
from .letkf import gaussian_localization, letkf_update

STORE_DTYPE = np.float32
CONVENTIONS = "CF-1.10"
TIME_ATTRS = {"long_name": "model time", "units": "1", "comment": "Lorenz-96 model time units"}
X_ATTRS = {"long_name": "slow variable X of Lorenz-96", "units": "1"}
Y_ATTRS = {"long_name": "fast variable Y of two-scale Lorenz-96", "units": "1"}


@dataclass
class SynthResult:
    """What a generator run produced, for the CLI and tests."""

    out: Path
    analysis_rmse: float
    obs_rmse: float
    wall_time: float


def run_truth(
    cfg: BenchmarkConfig, rng: np.random.Generator, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Truth states at every observation time from ``-da_spinup`` to ``duration``.

    Returns the spin-up climatology of X (for the initial ensemble) and the
    trajectory ``[n_times, K + K*J]`` (float64).
    """
    model = L96Benchmark(cfg).truth_model()
    x0 = cfg.F + rng.standard_normal(cfg.K)
    y0 = 0.1 * rng.standard_normal((cfg.K, cfg.J))
    state = model.join(torch.from_numpy(x0), torch.from_numpy(y0))
    per_obs = cfg.steps_per(cfg.obs_interval, cfg.dt_truth, "obs_interval", "dt_truth")
    n_spin = cfg.steps_per(cfg.truth_spinup, cfg.obs_interval, "truth_spinup", "obs_interval")
    n_da = cfg.steps_per(cfg.da_spinup, cfg.obs_interval, "da_spinup", "obs_interval")
    n_total = n_spin + n_da + cfg.n_cycles + 1
    out = np.empty((n_total, state.shape[-1]))
    with torch.inference_mode():
        for i in tqdm(
            range(n_total), desc="truth", unit="cycle", disable=not progress, mininterval=1.0
        ):
            out[i] = state.numpy()
            for _ in range(per_obs):
                state = model.step(state)
    return out[:n_spin, : cfg.K], out[n_spin:]


def run_letkf(
    cfg: BenchmarkConfig,
    obs: np.ndarray,
    climatology: np.ndarray,
    rng: np.random.Generator,
    progress: bool = True,
) -> np.ndarray:
    """Analysis means at every observation time, cycling the host model."""
    host = L96Benchmark(cfg).host()
    per_obs = cfg.steps_per(cfg.obs_interval, cfg.dt_host, "obs_interval", "dt_host")
    loc = gaussian_localization(cfg.K, cfg.localization)
    if len(climatology) < cfg.members:
        raise ValueError(
            f"truth_spinup gives {len(climatology)} climatological states, fewer than "
            f"members={cfg.members}; lengthen truth_spinup"
        )
    pick = rng.choice(len(climatology), size=cfg.members, replace=False)
    ens = climatology[pick].copy()  # the filter starts from climatology, not the truth
    means = np.empty_like(obs)
    with torch.inference_mode():
        for i in tqdm(
            range(len(obs)), desc="letkf", unit="cycle", disable=not progress, mininterval=1.0
        ):
            if i > 0:
                x = torch.from_numpy(ens)
                for _ in range(per_obs):
                    x = host.step(x)
                ens = x.numpy()
            ens = letkf_update(ens, obs[i], cfg.obs_sigma, loc, cfg.inflation)
            if not np.all(np.isfinite(ens)):
                raise FloatingPointError(f"LETKF diverged at cycle {i} (non-finite analysis)")
            means[i] = ens.mean(axis=0)
    return means


def host_forecasts(cfg: BenchmarkConfig, init: np.ndarray, lead_max: float) -> np.ndarray:
    """Host forecasts ``[n_init, n_lead, K]`` every ``obs_interval`` up to ``lead_max``."""
    host = L96Benchmark(cfg).host()
    per_obs = cfg.steps_per(cfg.obs_interval, cfg.dt_host, "obs_interval", "dt_host")
    n_lead = cfg.steps_per(lead_max, cfg.obs_interval, "lead_max", "obs_interval") + 1
    out = np.empty((init.shape[0], n_lead, cfg.K))
    with torch.inference_mode():
        x = torch.from_numpy(init.astype(np.float64))
        out[:, 0] = init
        for lead in range(1, n_lead):
            for _ in range(per_obs):
                x = host.step(x)
            out[:, lead] = x.numpy()
    return out


def _grid_coords(cfg: BenchmarkConfig) -> dict:
    return {"k": ("k", np.arange(1, cfg.K + 1), {"long_name": "slow grid index"})}


def _common_attrs(cfg: BenchmarkConfig, title: str) -> dict:
    return {
        "Conventions": CONVENTIONS,
        "title": title,
        "source": f"mecs synth, preset {cfg.preset}",
        "benchmark_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "seed": cfg.seed,
    }


def _time_coord(times: np.ndarray, name: str = "time") -> tuple:
    return (name, times, TIME_ATTRS)


def forecast_dataset(
    cfg: BenchmarkConfig, init_times: np.ndarray, fc: np.ndarray, title: str
) -> xr.Dataset:
    """An archive-like forecast dataset with ``valid_time = init_time + lead_time``."""
    leads = np.round(np.arange(fc.shape[1]) * cfg.obs_interval, 10)
    ds = xr.Dataset(
        {"X": (("init_time", "lead_time", "k"), fc.astype(STORE_DTYPE), X_ATTRS)},
        coords={
            "init_time": _time_coord(init_times, "init_time"),
            "lead_time": ("lead_time", leads, {"long_name": "forecast lead time", "units": "1"}),
            **_grid_coords(cfg),
        },
        attrs={**_common_attrs(cfg, title), "model": "one-scale Lorenz-96 host (RK4)"},
    )
    ds.coords["init_time"].attrs.update(long_name="forecast initial time")
    valid = np.round(init_times[:, None] + leads[None, :], 10)
    ds.coords["valid_time"] = (
        ("init_time", "lead_time"),
        valid,
        {"long_name": "forecast valid time", "units": "1"},
    )
    return ds


def generate(
    cfg: BenchmarkConfig,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SynthResult:
    """Build every benchmark store under ``out`` (atomically: all or nothing)."""
    t_start = time.perf_counter()
    out = Path(out)
    seeds = np.random.SeedSequence(cfg.seed).spawn(4)
    rng_truth, rng_obs, rng_ens, rng_noise = (np.random.default_rng(s) for s in seeds)
    with staged_directory(out, overwrite=overwrite) as stage:
        climatology, truth = run_truth(cfg, rng_truth, progress)
        x_true = truth[:, : cfg.K]
        obs = L96Benchmark(cfg).observe(x_true, rng_obs)
        if cfg.analysis == "letkf":
            analyses = run_letkf(cfg, obs, climatology, rng_ens, progress)
        else:
            analyses = x_true + cfg.analysis_noise * rng_noise.standard_normal(x_true.shape)
        # drop the filter spin-up; stored time starts at 0
        n_da = cfg.steps_per(cfg.da_spinup, cfg.obs_interval, "da_spinup", "obs_interval")
        truth, obs, analyses = truth[n_da:], obs[n_da:], analyses[n_da:]
        times = np.round(np.arange(len(truth)) * cfg.obs_interval, 10)
        x_true = truth[:, : cfg.K]
        a_rmse = float(np.sqrt(np.mean((analyses - x_true) ** 2)))
        o_rmse = float(np.sqrt(np.mean((obs - x_true) ** 2)))

        y = truth[:: cfg.y_stride, cfg.K :].reshape(-1, cfg.K, cfg.J)
        truth_ds = xr.Dataset(
            {
                "X": (("time", "k"), x_true.astype(STORE_DTYPE), X_ATTRS),
                "Y": (("time_y", "k", "j"), y.astype(STORE_DTYPE), Y_ATTRS),
            },
            coords={
                "time": _time_coord(times),
                "time_y": _time_coord(times[:: cfg.y_stride], "time_y"),
                "j": ("j", np.arange(1, cfg.J + 1), {"long_name": "fast index within sector"}),
                **_grid_coords(cfg),
            },
            attrs={
                **_common_attrs(cfg, "two-scale Lorenz-96 truth"),
                "model": "two-scale Lorenz-96 (RK4)",
            },
        )
        write_zarr(
            truth_ds,
            stage / "truth.zarr",
            encoding={"X": {"chunks": (2000, cfg.K)}, "Y": {"chunks": (500, cfg.K, cfg.J)}},
        )

        obs_ds = xr.Dataset(
            {
                "X": (
                    ("time", "k"),
                    obs.astype(STORE_DTYPE),
                    {**X_ATTRS, "long_name": "observed slow variable X"},
                )
            },
            coords={"time": _time_coord(times), **_grid_coords(cfg)},
            attrs={
                **_common_attrs(cfg, "observations of X"),
                "obs_sigma": cfg.obs_sigma,
                "observation_operator": "identity (every X observed)",
            },
        )
        write_zarr(obs_ds, stage / "observations.zarr", encoding={"X": {"chunks": (2000, cfg.K)}})

        method = (
            f"LETKF with the host model, N={cfg.members}, Gaussian localization "
            f"radius {cfg.localization}, inflation {cfg.inflation}"
            if cfg.analysis == "letkf"
            else f"truth plus Gaussian noise (sigma {cfg.analysis_noise})"
        )
        ana_ds = xr.Dataset(
            {
                "X": (
                    ("time", "k"),
                    analyses.astype(STORE_DTYPE),
                    {**X_ATTRS, "long_name": "analysis of slow variable X"},
                )
            },
            coords={"time": _time_coord(times), **_grid_coords(cfg)},
            attrs={
                **_common_attrs(cfg, "analyses of X"),
                "analysis_method": method,
                "rmse_vs_truth": a_rmse,
                "test_start": cfg.test_start,
            },
        )
        write_zarr(ana_ds, stage / "analyses.zarr", encoding={"X": {"chunks": (2000, cfg.K)}})

        # short forecasts from every analysis: the archive the increment pipeline reads
        archive = host_forecasts(cfg, analyses, cfg.archive_lead_max)
        write_zarr(
            forecast_dataset(cfg, times, archive, "host forecast archive"),
            stage / "forecasts_archive.zarr",
            encoding={"X": {"chunks": (2000, archive.shape[1], cfg.K)}},
        )

        # long forecasts from the test period, for evaluation against the truth
        stride = cfg.steps_per(
            cfg.forecast_init_every, cfg.obs_interval, "forecast_init_every", "obs_interval"
        )
        first = int(round(cfg.test_start / cfg.obs_interval))
        n_lead = cfg.steps_per(cfg.forecast_lead_max, cfg.obs_interval, "lead", "obs")
        idx = np.arange(first, len(times) - n_lead, stride)
        if len(idx) == 0:
            raise ValueError("the test period is shorter than forecast_lead_max: no forecasts")
        long_fc = host_forecasts(cfg, analyses[idx], cfg.forecast_lead_max)
        write_zarr(
            forecast_dataset(cfg, times[idx], long_fc, "host forecasts, test period"),
            stage / "forecasts.zarr",
            encoding={"X": {"chunks": (100, long_fc.shape[1], cfg.K)}},
        )

        summary = {
            "config": cfg.to_dict(),
            "stores": [
                "truth.zarr",
                "observations.zarr",
                "analyses.zarr",
                "forecasts_archive.zarr",
                "forecasts.zarr",
            ],
            "test_start": cfg.test_start,
            "analysis_rmse": a_rmse,
            "observation_rmse": o_rmse,
        }
        (stage / "config.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    wall = time.perf_counter() - t_start
    log(f"analysis RMSE vs truth {a_rmse:.4f} (observation RMSE {o_rmse:.4f})")
    return SynthResult(out=out, analysis_rmse=a_rmse, obs_rmse=o_rmse, wall_time=wall)
