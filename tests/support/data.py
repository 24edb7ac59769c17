"""Synthetic archives in a forecasting centre's shape, and the backends they are read with.

The increment tests run over every *backend* (numpy-backed or dask-backed inputs)
and every *store format* (zarr or netCDF), as xarray's own suite parametrizes its
backends: the ``backend`` and ``store_format`` fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

BACKENDS = ("numpy", "dask")
STORE_FORMATS = ("zarr", "netcdf")


def make_archive(n_times=16, init_every=2, leads_h=(0, 6, 12), nlev=3, nlat=4, nlon=5, seed=0):
    """An operational-like archive: T, q on pressure levels, ps; 6-hourly datetime64.

    Forecasts drift by ``-0.1 K/h`` (T), so the T target is about ``+0.1 K per hour``.
    """
    rng = np.random.default_rng(seed)
    step = np.timedelta64(6, "h")
    n_ext = n_times + max(leads_h) // 6
    times = np.datetime64("2021-01-01T00", "ns") + np.arange(n_ext) * step
    level = xr.DataArray(
        np.array([850.0, 500.0, 250.0][:nlev]),
        dims="isobaric",
        attrs={"units": "hPa", "positive": "down", "long_name": "pressure"},
    )
    coords = {
        "isobaric": level,
        "lat": ("lat", np.linspace(-30, 30, nlat), {"units": "degrees_north"}),
        "lon": ("lon", np.linspace(0, 300, nlon), {"units": "degrees_east"}),
    }
    truth = {
        "T": 260 + 10 * rng.standard_normal((n_ext, nlev, nlat, nlon)),
        "q": 0.01 * rng.random((n_ext, nlev, nlat, nlon)),
        "ps": 1e5 + 500 * rng.standard_normal((n_ext, nlat, nlon)),
    }
    units = {"T": "K", "q": "kg kg-1", "ps": "Pa"}
    grid = {"T": ("isobaric", "lat", "lon"), "q": ("isobaric", "lat", "lon"), "ps": ("lat", "lon")}
    ana = xr.Dataset(
        {
            f: (("time", *grid[f]), truth[f][:n_times].astype(np.float32), {"units": units[f]})
            for f in truth
        },
        coords={**coords, "time": times[:n_times]},
    )
    init_idx = np.arange(0, n_times, init_every)
    lead_steps = np.array(leads_h) // 6
    fc_vars = {}
    for f in truth:
        vals = truth[f][init_idx[:, None] + lead_steps[None, :]].copy()
        drift = {"T": -0.1, "q": 0.0, "ps": 2.0}[f] * np.array(leads_h, dtype=float)
        vals += drift.reshape(1, -1, *([1] * (vals.ndim - 2)))
        fc_vars[f] = (
            ("init_time", "lead_time", *grid[f]),
            vals.astype(np.float32),
            {"units": units[f]},
        )
    fc = xr.Dataset(
        fc_vars,
        coords={
            **coords,
            "init_time": times[init_idx],
            "lead_time": (np.array(leads_h) * np.timedelta64(1, "h")).astype("timedelta64[ns]"),
        },
    )
    return ana, fc


def write_store(ds: xr.Dataset, path: Path, store_format: str) -> Path:
    """``ds`` written as a zarr v3 store or a netCDF4 file; returns the path."""
    from correction.storage import write_zarr

    if store_format == "zarr":
        out = path.with_suffix(".zarr")
        write_zarr(ds, out)
    elif store_format == "netcdf":
        out = path.with_suffix(".nc")
        ds.to_netcdf(out)
    else:
        raise ValueError(f"unknown store format {store_format!r}")
    return out


def open_store(path: Path, store_format: str, backend: str) -> xr.Dataset:
    """Open a store with numpy-backed (loaded) or dask-backed (lazy) variables."""
    from correction.storage import open_zarr

    opener = open_zarr if store_format == "zarr" else xr.open_dataset
    ds = opener(path, chunks={})
    return ds.load() if backend == "numpy" else ds
