"""Verification without truth: forecasts scored against analyses, as a forecasting centre does.

No benchmark truth exists in operations, so a forecast archive in the pipeline's
conventions (``init_time``, ``lead_time``, any grid and levels, numeric or
datetime64 times) is scored against the analyses valid at ``init_time +
lead_time``, per field, per level and per lead:

- **RMSE** and **bias** (forecast minus analysis), averaged over the grid with
  ``cos(latitude)`` weights when a latitude coordinate exists (a regular lat/lon
  grid over-counts the poles otherwise), then over initial times (RMSE: the root
  of the mean squared error);
- **ACC**, the anomaly correlation against a climatology: the time mean of the
  analyses over a climatology period (by default the analyses before the first
  initial time scored, the training period), per grid point and level. For each
  forecast, ``sum w f' a' / sqrt(sum w f'^2 sum w a'^2)`` over the grid with
  anomalies ``f' = forecast - clim``, ``a' = analysis - clim`` (the uncentred
  form), then averaged over initial times;
- with a **reference** (the uncorrected host's forecasts of the same cases), the
  ratio of RMSEs: below 1 the forecasts beat the reference.

Truth-based scores (valid time, the ``limit`` forecasts) stay in
:mod:`correction.evaluation.experiment` for benchmarks that have a truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from data_pipeline.increments.base import INIT, LEAD, TIME
from data_pipeline.increments.validation import level_dims_of

LAT_NAMES = ("lat", "latitude", "nav_lat", "grid_latitude")


class VerificationError(ValueError):
    """Forecasts and analyses that cannot be compared; the message names the fault."""


def latitude_of(ds: xr.Dataset) -> xr.DataArray | None:
    """The 1-D latitude coordinate (``degrees_north``, or a usual name), if any."""
    for name, coord in ds.coords.items():
        units = str(coord.attrs.get("units", "")).lower()
        if coord.ndim == 1 and (units in ("degrees_north", "degree_north") or name in LAT_NAMES):
            return coord
    return None


def _weights(field: xr.DataArray, grid_dims: Sequence[str], lat: xr.DataArray | None):
    if lat is None or lat.dims[0] not in grid_dims:
        return xr.ones_like(field.isel({d: 0 for d in field.dims if d not in grid_dims}))
    w = np.cos(np.deg2rad(lat.astype(np.float64)))
    return w.clip(min=0.0).broadcast_like(
        field.isel({d: 0 for d in field.dims if d not in grid_dims})
    )


def _valid_analyses(ana: xr.DataArray, fc: xr.DataArray) -> xr.DataArray:
    """The analysis at ``init_time + lead_time`` for every forecast (NaN where there is none)."""
    valid = fc[INIT] + fc[LEAD]  # (init_time, lead_time)
    flat = valid.values.reshape(-1)
    times = ana[TIME].values
    pos = np.searchsorted(times, flat)
    pos = np.clip(pos, 0, len(times) - 1)
    found = times[pos] == flat
    picked = ana.isel({TIME: xr.DataArray(pos, dims="case")}).values.astype(np.float64)
    picked[~found] = np.nan
    shape = (*valid.shape, *picked.shape[1:])
    return xr.DataArray(picked.reshape(shape), dims=(INIT, LEAD, *ana.dims[1:]), coords=fc.coords)


def verify(
    forecasts: xr.Dataset,
    analyses: xr.Dataset,
    fields: Sequence[str] | None = None,
    reference: xr.Dataset | None = None,
    climatology_end: Any = None,
    level_dims: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Scores of ``forecasts`` (and ``reference``) against ``analyses``; see the module.

    ``climatology_end``: analyses before this time form the climatology (default:
    the first initial time scored). Returns a JSON-ready dict: per field, the
    leads, level labels and ``rmse``/``bias``/``acc`` as ``[lead][level]`` lists,
    plus ``rmse_vs_reference`` when a reference is given.
    """
    for name, ds, dims in (("forecasts", forecasts, (INIT, LEAD)), ("analyses", analyses, (TIME,))):
        missing = [d for d in dims if d not in ds.dims]
        if missing:
            raise VerificationError(f"{name} have no '{missing[0]}' dimension ({list(ds.dims)})")
    if reference is not None:  # score both on the cases they share, and only those
        for d in (INIT, LEAD):
            if d not in reference.dims:
                raise VerificationError(f"reference forecasts have no '{d}' dimension")
        inits = np.intersect1d(forecasts[INIT].values, reference[INIT].values)
        leads = np.intersect1d(forecasts[LEAD].values, reference[LEAD].values)
        if not len(inits) or not len(leads):
            raise VerificationError("forecasts and reference share no initial time and lead")
        forecasts = forecasts.sel({INIT: inits, LEAD: leads})
        reference = reference.sel({INIT: inits, LEAD: leads})
    fields = list(fields) if fields else [f for f in forecasts.data_vars if f in analyses]
    if not fields:
        raise VerificationError("forecasts and analyses share no field")
    start = forecasts[INIT].values.min()
    end = start if climatology_end is None else np.asarray(climatology_end, analyses[TIME].dtype)
    clim_ana = analyses.sel({TIME: analyses[TIME] < end})
    if clim_ana.sizes[TIME] == 0:
        raise VerificationError(
            "no analyses before the first initial time to form a climatology; give climatology_end"
        )
    lat = latitude_of(analyses)
    out: dict[str, Any] = {
        "n_inits": int(forecasts.sizes[INIT]),
        "init_times": [str(v) for v in forecasts[INIT].values],
        "weighting": "cos(latitude)" if lat is not None else "none",
        "climatology": {"analyses": int(clim_ana.sizes[TIME]), "end": str(end)},
        "leads": [_lead_label(v) for v in forecasts[LEAD].values],
        "fields": {},
    }
    for f in fields:
        if f not in analyses or f not in forecasts:
            raise VerificationError(f"field {f!r} is not in both the forecasts and the analyses")
        order = (INIT, LEAD, *analyses[f].dims[1:])
        if set(forecasts[f].dims) != set(order):
            raise VerificationError(
                f"field {f!r}: forecast dims {list(forecasts[f].dims)} do not match the "
                f"analyses' {list(analyses[f].dims[1:])} plus {INIT}, {LEAD}"
            )
        fc = forecasts[f].transpose(*order).astype(np.float64)
        ana = _valid_analyses(analyses[f], fc)
        levels = level_dims_of(analyses[f].dims[1:], [analyses], level_dims)
        grid = [d for d in analyses[f].dims[1:] if d not in levels]
        w = _weights(ana, grid, lat)
        clim = clim_ana[f].astype(np.float64).mean(TIME)
        scores = _scores(fc, ana, clim, w, grid)
        entry = {
            "units": str(analyses[f].attrs.get("units", "1")),
            "levels": _level_labels(analyses[f], levels),
            **{k: _as_lists(v, levels) for k, v in scores.items()},
        }
        if reference is not None:
            ref_fc = reference[f].transpose(*order).astype(np.float64)
            ref = _scores(ref_fc, ana, clim, w, grid)
            entry["reference_rmse"] = _as_lists(ref["rmse"], levels)
            entry["rmse_vs_reference"] = _as_lists(scores["rmse"] / ref["rmse"], levels)
        out["fields"][f] = entry
    return out


def as_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`verify`'s result in the schema ``mecs evaluate`` writes (``mecs-evaluation/1``).

    Both files have ``schema``, ``kind`` (``truth`` or ``analyses``), ``n_inits``,
    ``init_times``, ``lead_times`` and ``forecasts[label]["fields"][field]`` with
    ``units``, ``levels`` and ``rmse`` (``[lead]`` or ``[lead][level]``); scores
    against analyses add ``bias`` and ``acc``, and ``rmse_vs_reference`` per field.
    """
    forecast, reference, ratio = {}, {}, {}
    for f, e in result["fields"].items():
        forecast[f] = {k: e[k] for k in ("units", "levels", "rmse", "bias", "acc")}
        if "reference_rmse" in e:
            reference[f] = {"units": e["units"], "levels": e["levels"], "rmse": e["reference_rmse"]}
            ratio[f] = e["rmse_vs_reference"]
    out = {
        "schema": "mecs-evaluation/1",
        "kind": "analyses",
        "n_inits": result["n_inits"],
        "init_times": result["init_times"],
        "lead_times": result["leads"],
        "weighting": result["weighting"],
        "climatology": result["climatology"],
        "forecasts": {"forecast": {"fields": forecast}},
    }
    if reference:
        out["forecasts"]["reference"] = {"fields": reference}
        out["rmse_vs_reference"] = ratio
    return out


def _lead_label(value) -> str:
    """``12h`` for a duration, the number itself for a numeric lead."""
    if isinstance(value, np.timedelta64):
        return f"{value / np.timedelta64(1, 'h'):g}h"
    return f"{float(value):g}"


def _scores(fc, ana, clim, w, grid) -> dict[str, xr.DataArray]:
    err = fc - ana
    ok = np.isfinite(err)
    wsum = w.where(ok).sum(grid)
    mse = (w * err**2).where(ok).sum(grid) / wsum
    bias = (w * err).where(ok).sum(grid) / wsum
    fa, aa = fc - clim, ana - clim
    num = (w * fa * aa).where(ok).sum(grid)
    den = np.sqrt((w * fa**2).where(ok).sum(grid) * (w * aa**2).where(ok).sum(grid))
    acc = num / den
    return {
        "rmse": np.sqrt(mse.mean(INIT, skipna=True)),
        "bias": bias.mean(INIT, skipna=True),
        "acc": acc.mean(INIT, skipna=True),
    }


def _level_labels(da: xr.DataArray, levels: Sequence[str]) -> list[str] | None:
    if not levels:
        return None
    stacked = [da[d].values if d in da.coords else np.arange(da.sizes[d]) for d in levels]
    grid = np.meshgrid(*stacked, indexing="ij")
    return [
        "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in vals)
        for vals in zip(*(g.reshape(-1) for g in grid), strict=True)
    ]


def _as_lists(score: xr.DataArray, levels: Sequence[str]) -> list:
    """``[lead][level]`` (or ``[lead]`` without levels) as plain floats, NaN as None."""
    if levels:
        score = score.stack(level=list(levels)) if len(levels) > 1 else score
        arr = score.transpose(LEAD, ...).values.reshape(score.sizes[LEAD], -1)
    else:
        arr = score.transpose(LEAD).values
    return np.where(np.isfinite(arr), arr, np.nan).tolist()
