"""The QG benchmark's stores: the truth run, the analyses, the host forecasts, on disk.

Apart from :mod:`data_pipeline.qg` (the config, the presets, the coarse-graining) so
each stays small; this is what ``mecs synth --preset qg-eddy`` runs. Times are hours;
one ``SeedSequence`` feeds every draw, so a seed reproduces the stores byte for byte.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from correction.hosts.qg import TwoLayerQG
from correction.storage import staged_directory, write_zarr

from .config import ConfigError
from .qg import (
    HOURS_PER_YEAR,
    Q_ATTRS,
    STORE_DTYPE,
    TIME_ATTRS,
    QGBenchmark,
    QGBenchmarkConfig,
    resample,
)


# -- the generator --------------------------------------------------------------------
def _run(model: TwoLayerQG, q: torch.Tensor, steps: int, desc: str, progress: bool):
    with torch.inference_mode():
        for _ in tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0, unit="h"):
            q = model.step(q)
    if not torch.isfinite(q).all():
        raise FloatingPointError(f"{desc}: the QG model left the finite numbers")
    return q


def run_truth(cfg: QGBenchmarkConfig, rng: np.random.Generator, progress: bool = True):
    """Coarse-grained truth ``[n_cycles + 1, 2, n, n]`` (float64) at every analysis time."""
    bench = QGBenchmark(cfg)
    host, truth = bench.host(), bench.truth_model()
    n = cfg.host_nx
    q = torch.from_numpy(1e-7 * rng.standard_normal((2, n, n)))
    q = _run(host, q, round(cfg.spinup_host_years * HOURS_PER_YEAR / cfg.dt), "spin-up", progress)
    q = resample(q, cfg.truth_nx)
    q = _run(truth, q, round(cfg.spinup_truth_years * HOURS_PER_YEAR / cfg.dt), "spin-up", progress)
    per = cfg.steps(cfg.obs_interval, "obs_interval")
    out = np.empty((cfg.n_cycles + 1, 2, n, n))
    with torch.inference_mode():
        for i in tqdm(range(len(out)), desc="truth", disable=not progress, mininterval=1.0):
            out[i] = bench.coarse_grain(q).numpy()
            if i + 1 < len(out):
                for _ in range(per):
                    q = truth.step(q)
    if not np.isfinite(out).all():
        raise FloatingPointError("the QG truth left the finite numbers")
    return out


def host_forecasts(cfg: QGBenchmarkConfig, init: np.ndarray, lead_max: float) -> np.ndarray:
    """Host forecasts ``[n_init, n_lead, 2, n, n]`` every ``obs_interval`` up to ``lead_max``."""
    host = QGBenchmark(cfg).host()
    per = cfg.steps(cfg.obs_interval, "obs_interval")
    n_lead = cfg.cycles(lead_max, "lead_max") + 1
    out = np.empty((init.shape[0], n_lead, *init.shape[1:]))
    out[:, 0] = init
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(init, dtype=np.float64))
        for lead in range(1, n_lead):
            for _ in range(per):
                x = host.step(x)
            out[:, lead] = x.numpy()
    return out


def _coords(cfg: QGBenchmarkConfig) -> dict:
    n = cfg.host_nx
    dx = cfg.L / n
    axis = (np.arange(n) + 0.5) * dx
    return {
        "lev": (
            "lev",
            np.array([1, 2]),
            {"long_name": "layer (1: upper)", "axis": "Z", "positive": "down"},
        ),
        "y": ("y", axis, {"long_name": "meridional distance", "units": "m"}),
        "x": ("x", axis, {"long_name": "zonal distance", "units": "m"}),
    }


def _attrs(cfg: QGBenchmarkConfig, title: str) -> dict:
    return {
        "Conventions": "CF-1.10",
        "title": title,
        "source": f"mecs synth, preset {cfg.preset}",
        "benchmark_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "seed": cfg.seed,
    }


def _field(values: np.ndarray, dims: tuple[str, ...], title: str, coords: dict, cfg, **attrs):
    return xr.Dataset(
        {"q": (dims, values.astype(STORE_DTYPE), Q_ATTRS)},
        coords=coords,
        attrs={**_attrs(cfg, title), **attrs},
    )


def forecast_dataset(cfg: QGBenchmarkConfig, init_times: np.ndarray, fc: np.ndarray, title: str):
    leads = np.round(np.arange(fc.shape[1]) * cfg.obs_interval, 10)
    coords = {
        "init_time": (
            "init_time",
            init_times,
            {**TIME_ATTRS, "long_name": "forecast initial time"},
        ),
        "lead_time": ("lead_time", leads, {"long_name": "forecast lead time", "units": "hours"}),
        **_coords(cfg),
    }
    ds = _field(fc, ("init_time", "lead_time", "lev", "y", "x"), title, coords, cfg)
    ds.attrs["model"] = f"two-layer QG host at {cfg.host_nx}^2 (RK4)"
    ds.coords["valid_time"] = (
        ("init_time", "lead_time"),
        np.round(init_times[:, None] + leads[None, :], 10),
        {"long_name": "forecast valid time", "units": "hours"},
    )
    return ds


def generate_qg(
    cfg: QGBenchmarkConfig,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    truth: np.ndarray | None = None,
):
    """Build the QG benchmark's stores under ``out`` (atomically: all or nothing).

    ``truth`` (``[n_cycles + 1, 2, n, n]``): the coarse-grained truth, given instead of
    run (:meth:`QGBenchmark.recut` of another store's); everything after it is drawn
    from the seed as usual.
    """
    from .synth import SynthResult

    t0 = time.perf_counter()
    out = Path(out)
    # the third stream feeds the LETKF; the first two are as before it existed
    rng_truth, rng_noise, rng_letkf = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3)
    )
    n = cfg.host_nx
    chunk = {"q": {"chunks": (256, 2, n, n)}}
    if truth is not None and truth.shape != (cfg.n_cycles + 1, 2, n, n):
        raise ConfigError(
            f"the given truth has shape {truth.shape}, the config needs "
            f"{(cfg.n_cycles + 1, 2, n, n)}"
        )
    source = "run" if truth is None else "given (derived from another store's truth)"
    with staged_directory(out, overwrite=overwrite) as stage:
        if truth is None:
            truth = run_truth(cfg, rng_truth, progress)
        k = cfg.coarse_cutoff
        cut = "host filter" if k is None else f"sharp isotropic cut at |k| <= {k:g}"
        times = np.round(np.arange(len(truth)) * cfg.obs_interval, 10)
        layer_std = truth.std(axis=(0, 2, 3), keepdims=True)
        if cfg.analysis == "letkf":
            from .qg_letkf import run_qg_letkf

            analyses, letkf = run_qg_letkf(cfg, truth, layer_std, rng_letkf, progress)
            method = (
                f"LETKF cycled with the host, N={cfg.letkf_members}, every {cfg.obs_stride}th "
                f"point observed ({letkf['observations']} observations, error "
                f"{cfg.obs_noise} x layer std), Gaussian localization radius "
                f"{cfg.letkf_localization} points, inflation {cfg.letkf_inflation}"
            )
            log(
                f"letkf: {letkf['observations']} observations, "
                f"{letkf['observations_per_column']} per column, "
                f"{letkf['seconds_per_cycle']:.3f} s per cycle"
            )
        else:
            noise = cfg.obs_noise * layer_std * rng_noise.standard_normal(truth.shape)
            analyses = truth + noise
            method = f"coarse-grained truth plus Gaussian noise ({cfg.obs_noise} x layer std)"
        a_rmse = float(np.sqrt(np.mean((analyses - truth) ** 2)))
        coords = {"time": ("time", times, TIME_ATTRS), **_coords(cfg)}
        dims = ("time", "lev", "y", "x")
        write_zarr(
            _field(
                truth,
                dims,
                "coarse-grained two-layer QG truth",
                coords,
                cfg,
                coarse_graining=f"spectral truncation {cfg.truth_nx}^2 -> {n}^2, {cut}",
                truth_source=source,
            ),
            stage / "truth.zarr",
            encoding=chunk,
        )
        write_zarr(
            _field(
                analyses,
                dims,
                "analyses of q",
                coords,
                cfg,
                analysis_method=method,
                rmse_vs_truth=a_rmse,
                test_start=cfg.test_start,
            ),
            stage / "analyses.zarr",
            encoding=chunk,
        )
        archive = host_forecasts(cfg, analyses, cfg.archive_lead_max)
        write_zarr(
            forecast_dataset(cfg, times, archive, "host forecast archive"),
            stage / "forecasts_archive.zarr",
            encoding={"q": {"chunks": (256, archive.shape[1], 2, n, n)}},
        )
        stride = cfg.cycles(cfg.forecast_init_every, "forecast_init_every")
        first = int(round(cfg.test_start / cfg.obs_interval))
        n_lead = cfg.cycles(cfg.forecast_lead_max, "forecast_lead_max")
        idx = np.arange(first, len(times) - n_lead, stride)
        if len(idx) == 0:
            raise ConfigError("the test period is shorter than forecast_lead_max: no forecasts")
        long_fc = host_forecasts(cfg, analyses[idx], cfg.forecast_lead_max)
        write_zarr(
            forecast_dataset(cfg, times[idx], long_fc, "host forecasts, test period"),
            stage / "forecasts.zarr",
            encoding={"q": {"chunks": (16, long_fc.shape[1], 2, n, n)}},
        )
        summary = {
            "config": cfg.to_dict(),
            "stores": ["truth.zarr", "analyses.zarr", "forecasts_archive.zarr", "forecasts.zarr"],
            "test_start": cfg.test_start,
            "analysis_rmse": a_rmse,
            "layer_std": layer_std.ravel().tolist(),
        }
        (stage / "config.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    wall = time.perf_counter() - t0
    log(f"analysis RMSE vs truth {a_rmse:.3e} 1/s (layer std {layer_std.ravel().tolist()})")
    return SynthResult(out=out, analysis_rmse=a_rmse, obs_rmse=a_rmse, wall_time=wall)


__all__ = ["forecast_dataset", "generate_qg", "host_forecasts", "run_truth"]
