"""The increment plan: validated inputs turned into one lazy Dataset of the store's content."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .base import (
    CHUNK_BYTES,
    CONVENTIONS,
    DEFAULT_SPLIT,
    INIT,
    LEAD,
    MAX_CHUNK_SAMPLES,
    ROLES,
    SAMPLE,
    TIME,
    InputError,
)
from .graph import _lazy, gather
from .inputs import open_input, parse_renames
from .numerics import _role_block
from .splits import assign_splits
from .timeaxis import TimeAxis, align, iso_duration
from .validation import _check_grids, _grid_coords, _select_fields, _time_axes, _units


@dataclass
class IncrementPlan:
    """A validated, lazy increment dataset and everything the writer needs."""

    dataset: xr.Dataset
    fields: list[str]
    level_dims: dict[str, tuple[str, ...]]
    axis: TimeAxis
    window: float  # in stored numbers (ns for datetime)
    chunk_samples: int
    train_range: tuple[int, int]
    n_candidates: int
    n_skipped_missing_analysis: int
    n_outside_analysis_period: int
    n_dropped_in_gaps: int
    splits: dict[str, Any]
    sources: dict[str, str]
    input_bytes: int
    inputs: dict[str, dict[str, da.Array]] = field(repr=False)  # per field: role -> array
    # per field: role -> (dask array with whole-grid chunks, sorted row index per sample)
    rows: dict[str, dict[str, tuple[da.Array, np.ndarray]]] = field(repr=False)
    sample_init: np.ndarray = field(repr=False)
    sample_valid: np.ndarray = field(repr=False)


def plan_increments(
    analyses: Any,
    forecasts: Any,
    window: Any,
    *,
    variables: Sequence[str] | str | None = None,
    split: Any = DEFAULT_SPLIT,
    gap: Any = None,
    chunk_samples: int | None = None,
    missing: str = "skip",
    state: str = "analysis",
    tolerance: Any = None,
    level_dims: Sequence[str] | str | None = None,
    analysis_dims: dict[str, str] | str | None = None,
    forecast_dims: dict[str, str] | str | None = None,
) -> IncrementPlan:
    """Open and validate the inputs and build the lazy increment dataset.

    Nothing is computed and nothing is written; every fault that metadata can show
    raises :class:`InputError` here.
    """
    if missing not in ("skip", "error"):
        raise InputError(f"missing must be 'skip' or 'error', got {missing!r}")
    if state not in ("analysis", "forecast"):
        raise InputError(f"state must be 'analysis' or 'forecast', got {state!r}")
    if chunk_samples is not None and (
        isinstance(chunk_samples, bool) or int(chunk_samples) != chunk_samples or chunk_samples < 1
    ):
        raise InputError(f"chunk_samples must be a positive integer, got {chunk_samples!r}")
    if isinstance(variables, str):
        variables = [v.strip() for v in variables.split(",") if v.strip()]
    if isinstance(level_dims, str):
        level_dims = [v.strip() for v in level_dims.split(",") if v.strip()]

    ana, ana_src = open_input(
        analyses, "analyses", TIME, parse_renames(analysis_dims, "analysis dims")
    )
    fc, fc_src = open_input(
        forecasts, "forecasts", INIT, parse_renames(forecast_dims, "forecast dims")
    )
    if TIME not in ana.dims:
        raise InputError(
            f"analyses have no '{TIME}' dimension (dims: {list(ana.dims)}); rename theirs "
            f"with --analysis-dims NAME={TIME}"
        )
    for dim in (INIT, LEAD):
        if dim not in fc.dims:
            raise InputError(
                f"forecasts have no '{dim}' dimension (dims: {list(fc.dims)}); rename theirs "
                f"with --dims, e.g. --dims time={INIT},step={LEAD} for IFS-style names"
            )
    for ds, dims, role in [(ana, (TIME,), "analyses"), (fc, (INIT, LEAD), "forecasts")]:
        for dim in dims:
            if dim not in ds.coords:
                raise InputError(f"{role} have no '{dim}' coordinate values")

    fields = _select_fields(ana, fc, variables)

    axis, ana_values, init_values, ana_t, init_t, leads = _time_axes(ana, fc)

    # window, tolerance, leads
    w = axis.parse_span(window, "window")
    if w <= 0:
        raise InputError(f"window must be positive, got {window!r}")
    tol = w / 1000 if tolerance is None else axis.parse_span(tolerance, "tolerance")
    if tol < 0:
        raise InputError(f"tolerance must not be negative, got {tolerance!r}")
    if not axis.is_numeric:
        tol = int(tol)
    near = np.flatnonzero(np.abs(leads - w) <= tol)
    if len(near) == 0:
        shown = [axis.fmt_span(v) for v in leads[:12]]
        raise InputError(
            f"forecasts have no lead_time equal to the window {axis.fmt_span(w)} "
            f"(tolerance {axis.fmt_span(tol)}); lead times: {shown}"
        )
    li = int(near[np.argmin(np.abs(leads[near] - w))])
    l0 = None
    if state == "forecast":
        zero = np.flatnonzero(np.abs(leads) <= tol)
        if len(zero) == 0:
            raise InputError("state='forecast' needs a lead_time 0 in the forecasts; none found")
        l0 = int(zero[0])

    grids, level = _check_grids(ana, fc, fields, level_dims)

    # alignment
    al = align(ana_t, init_t, leads[li], tol, state_from_analysis=state == "analysis")
    inside = al.skipped[~al.outside]
    if missing == "error" and len(inside):
        need = init_t[inside] + leads[li]
        shown = ", ".join(str(axis.fmt(v)) for v in need[:5])
        raise InputError(
            f"{len(inside)} forecast(s) have no analysis at their valid time (or init time) "
            f"within the analysis period, first at {shown}; use missing='skip' to skip them"
        )

    # splits
    kept_init = init_t[al.init_index]
    if len(kept_init) == 0:
        raise InputError(
            "no forecast has the analyses it needs: the analyses and forecasts do not "
            f"overlap in time (analyses {axis.fmt(ana_t[0])} to {axis.fmt(ana_t[-1])}, "
            f"forecasts {axis.fmt(init_t[0])} to {axis.fmt(init_t[-1])})"
        )
    plan_split = assign_splits(kept_init, split, axis, w, gap)
    in_split = plan_split.labels != ""
    n_dropped = int((~in_split).sum())
    labels = plan_split.labels[in_split]
    if not (labels == "train").any():
        raise InputError("the split leaves no training samples (statistics need some)")
    init_index = al.init_index[in_split]
    valid_index = al.valid_index[in_split]
    state_index = None if al.state_index is None else al.state_index[in_split]
    train = np.flatnonzero(labels == "train")
    train_range = (int(train[0]), int(train[-1]) + 1)
    if len(train) != train_range[1] - train_range[0]:  # cannot happen: blocks are contiguous
        raise AssertionError("training samples are not contiguous")

    # chunking
    bytes_per_sample = max(math.prod(ana[f].sizes[d] for d in grids[f]) * 4 for f in fields)
    if chunk_samples is None:
        chunk_samples = int(min(MAX_CHUNK_SAMPLES, max(1, CHUNK_BYTES // bytes_per_sample)))
    cs = int(chunk_samples)

    # lazy arrays
    w_units = axis.to_units(w)
    data_vars: dict[str, xr.Variable] = {}
    inputs: dict[str, dict[str, da.Array]] = {}
    rows: dict[str, dict[str, tuple[da.Array, np.ndarray]]] = {}
    input_bytes = 0
    t_unit = axis.unit
    for f in fields:
        g = grids[f]
        a_arr = _lazy(ana[f].transpose(TIME, *g), TIME)
        f_arr = _lazy(fc[f].transpose(INIT, LEAD, *g), INIT)
        input_bytes += int(ana[f].nbytes) + int(fc[f].nbytes)
        whole = {i: -1 for i in range(1, a_arr.ndim)}  # whole grid per chunk
        a_arr = a_arr.rechunk(whole)
        rows[f] = {
            "analysis_valid": (a_arr, valid_index),
            "forecast": (f_arr[:, li].rechunk(whole), init_index),
            "state": (a_arr, state_index)
            if state_index is not None
            else (f_arr[:, l0].rechunk(whole), init_index),
        }
        a_valid, f_w, s_in = (gather(arr, idx, cs) for arr, idx in rows[f].values())
        inputs[f] = {"analysis_valid": a_valid, "forecast": f_w, "state": s_in}
        lazy = {
            role: da.map_blocks(
                _role_block, a_valid, f_w, s_in, role=role, w_units=w_units, dtype=np.float32
            )
            for role in ROLES
        }
        units = _units(ana[f].attrs) or _units(fc[f].attrs) or "1"
        dims = (SAMPLE, *g)
        long = ana[f].attrs.get("long_name", f)
        span = axis.fmt_span(w)
        data_vars[f"state_{f}"] = xr.Variable(
            dims,
            lazy["state"],
            {
                "role": "state",
                "field": f,
                "units": units,
                "long_name": f"{long} at the start of the window ({state})",
            },
        )
        data_vars[f"increment_{f}"] = xr.Variable(
            dims,
            lazy["increment"],
            {
                "role": "increment",
                "field": f,
                "units": units,
                "long_name": f"analysis minus {span} forecast of {long}",
            },
        )
        data_vars[f"target_{f}"] = xr.Variable(
            dims,
            lazy["target"],
            {
                "role": "target",
                "field": f,
                "units": f"{units} per {t_unit}",
                "long_name": f"increment of {long} per {t_unit} (increment / window)",
            },
        )

    # coordinates
    sample_init = init_values[init_index]
    sample_valid = ana_values[valid_index]
    time_attrs = {k: v for k, v in ana[TIME].attrs.items() if k not in ("units", "calendar")}
    if axis.is_numeric and _units(ana[TIME].attrs) is not None:
        time_attrs["units"] = ana[TIME].attrs["units"]
    coords: dict[str, Any] = {
        INIT: (SAMPLE, sample_init, {**time_attrs, "long_name": "forecast initial time"}),
        "valid_time": (
            SAMPLE,
            sample_valid,
            {**time_attrs, "long_name": "analysis time the increment is valid at"},
        ),
        # fixed-width strings: they read back as numpy "<U5" (variable-length zarr strings
        # read back as StringDType, which numpy cannot cast with astype(str))
        "split": (
            SAMPLE,
            labels.astype("U5"),
            {"long_name": "data split (contiguous time blocks)"},
        ),
    }
    all_grid = {d for f in fields for d in grids[f]}
    for name, c in _grid_coords(fc, all_grid).items():
        coords[name] = c.variable.load()
    for name, c in _grid_coords(ana, all_grid).items():
        coords[name] = c.variable.load()

    splits = plan_split.record
    attrs: dict[str, Any] = {
        "Conventions": CONVENTIONS,
        "title": "analysis increments",
        "source": "mecs increments",
        "fields": json.dumps(fields),
        "window": w_units,
        "window_units": axis.window_units,
        "time_kind": axis.kind,
        "tolerance": axis.to_units(tol),
        "state_source": "analysis" if state == "analysis" else "forecast-lead-0",
        "sources": json.dumps({"analyses": ana_src, "forecasts": fc_src}),
        "n_samples": int(len(labels)),
        "n_candidates": int(len(init_t)),
        "n_skipped_missing_analysis": int(len(al.skipped)),
        "n_outside_analysis_period": int(al.outside.sum()),
        "n_dropped_in_gaps": n_dropped,
        "splits": json.dumps(splits),
    }
    if not axis.is_numeric:
        attrs["window_iso"] = iso_duration(int(w))
    dataset = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    return IncrementPlan(
        dataset=dataset,
        fields=fields,
        level_dims=level,
        axis=axis,
        window=w,
        chunk_samples=cs,
        train_range=train_range,
        n_candidates=int(len(init_t)),
        n_skipped_missing_analysis=int(len(al.skipped)),
        n_outside_analysis_period=int(al.outside.sum()),
        n_dropped_in_gaps=n_dropped,
        splits=splits,
        sources={"analyses": ana_src, "forecasts": fc_src},
        input_bytes=input_bytes,
        inputs=inputs,
        rows=rows,
        sample_init=init_t[init_index],
        sample_valid=ana_t[valid_index],
    )
