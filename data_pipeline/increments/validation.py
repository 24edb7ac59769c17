"""Metadata checks run before anything is computed: fields, time axes, grids, units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from .base import INIT, LEAD, TIME, VERTICAL_NAMES, InputError
from .timeaxis import _UNIT_NAMES, _UNIT_NS, TimeAxis, _check_axis, _time_kind


def level_dims_of(
    dims: Sequence[str], datasets: Sequence[xr.Dataset], override: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Vertical dims among ``dims``: CF ``axis="Z"`` or ``positive``, or a usual name.

    ``override`` (a list of dim names) replaces the detection.
    """
    if override is not None:
        return tuple(d for d in dims if d in set(override))
    found = []
    for d in dims:
        vertical = d.lower() in VERTICAL_NAMES
        for ds in datasets:
            if d in ds.coords:
                attrs = ds.coords[d].attrs
                if str(attrs.get("axis", "")).upper() == "Z" or "positive" in attrs:
                    vertical = True
        if vertical:
            found.append(d)
    return tuple(found)


def _units(attrs: Mapping) -> str | None:
    u = attrs.get("units")
    return None if u is None else " ".join(str(u).split())


def _lead_numbers(fc: xr.Dataset, axis: TimeAxis) -> np.ndarray:
    lead = fc[LEAD]
    values = np.asarray(lead.values)
    kind = _time_kind(values, "forecasts' lead_time")
    if axis.is_numeric:
        if kind != "numeric":
            raise InputError(
                f"forecasts' lead_time is {values.dtype} but the times are numeric; "
                "both must be numbers in the same units"
            )
        return values.astype(np.float64)
    if kind == "timedelta":
        return values.astype("timedelta64[ns]").astype(np.int64)
    if kind == "numeric":
        unit = _UNIT_NAMES.get(str(lead.attrs.get("units", "")).strip().lower())
        if unit is None:
            raise InputError(
                "forecasts' lead_time is numeric without time units (hours, minutes, ...) "
                "while the times are datetime64; give it units or timedelta64 values"
            )
        return np.round(values.astype(np.float64) * _UNIT_NS[unit]).astype(np.int64)
    raise InputError(f"forecasts' lead_time has type {values.dtype}; expected durations")


def _compare_coord(name: str, a: xr.DataArray, b: xr.DataArray, field_name: str) -> None:
    va, vb = np.asarray(a.values), np.asarray(b.values)
    if va.shape != vb.shape:
        raise InputError(
            f"variable {field_name!r}: coordinate {name!r} has shape {va.shape} in the "
            f"analyses and {vb.shape} in the forecasts"
        )
    if np.issubdtype(va.dtype, np.number) and np.issubdtype(vb.dtype, np.number):
        same = np.isclose(va.astype(np.float64), vb.astype(np.float64), rtol=1e-6, atol=1e-9)
        same |= np.isnan(va.astype(np.float64)) & np.isnan(vb.astype(np.float64))
    else:
        same = va == vb
    same = np.asarray(same)
    if not same.all():
        i = np.unravel_index(int(np.argmin(same.ravel())), same.shape) if same.ndim else ()
        raise InputError(
            f"variable {field_name!r}: coordinate {name!r} differs between analyses and "
            f"forecasts (at index {tuple(int(k) for k in i)}: {va[i]!r} vs {vb[i]!r})"
        )


def _grid_coords(ds: xr.Dataset, grid: set[str]) -> dict[str, xr.DataArray]:
    return {
        name: c
        for name, c in ds.coords.items()
        if c.dims and set(c.dims) <= grid and name not in (TIME, INIT, LEAD, "valid_time")
    }


def _select_fields(ana: xr.Dataset, fc: xr.Dataset, variables: Sequence[str] | None) -> list[str]:
    """The fields to use: ``variables``, or every analysis field with a time dim."""
    if variables is None:
        fields = [str(v) for v in ana.data_vars if TIME in ana[v].dims]
        if not fields:
            raise InputError(f"analyses have no data variable with a '{TIME}' dimension")
    else:
        fields = list(variables)
        if not fields:
            raise InputError("variables is empty")
        if len(set(fields)) != len(fields):
            raise InputError(f"variables lists a field twice: {fields}")
    for f in fields:
        if f not in ana.data_vars:
            raise InputError(f"variable {f!r} is not in the analyses ({list(ana.data_vars)})")
        if f not in fc.data_vars:
            raise InputError(
                f"variable {f!r} is not in the forecasts ({list(fc.data_vars)}); "
                "choose fields with --variables"
            )
        if TIME not in ana[f].dims:
            raise InputError(f"analyses variable {f!r} has no '{TIME}' dimension")
        if INIT not in fc[f].dims or LEAD not in fc[f].dims:
            raise InputError(f"forecasts variable {f!r} lacks '{INIT}' or '{LEAD}' dimensions")
    return fields


def _time_axes(ana: xr.Dataset, fc: xr.Dataset) -> tuple:
    """The time axis type and the checked times: analyses, inits (values and numbers), leads."""
    ana_values = np.asarray(ana[TIME].values)
    init_values = np.asarray(fc[INIT].values)
    for where, coord, store in (
        ("analyses", TIME, ana),
        ("forecasts", INIT, fc),
        ("forecasts", LEAD, fc),
    ):
        if store.sizes.get(coord, 0) == 0:
            raise InputError(
                f"the {where} have no times ('{coord}' has length 0): there is nothing to "
                "build increments from; check the input paths and any time selection"
            )
    kind = _time_kind(ana_values, "analyses' time")
    init_kind = _time_kind(init_values, "forecasts' init_time")
    if kind != init_kind:
        raise InputError(
            f"analyses' time is {ana_values.dtype} but forecasts' init_time is "
            f"{init_values.dtype}; both must be numeric or both datetime64"
        )
    axis = TimeAxis(kind, _units(ana[TIME].attrs) if kind == "numeric" else None)
    if axis.is_numeric:
        t_units, i_units = _units(ana[TIME].attrs), _units(fc[INIT].attrs)
        l_units = _units(fc[LEAD].attrs)
        for other, name in [(i_units, "init_time"), (l_units, "lead_time")]:
            if t_units is not None and other is not None and other != t_units:
                raise InputError(
                    f"time units differ: analyses' time in {t_units!r}, forecasts' {name} "
                    f"in {other!r}"
                )
    ana_t = axis.num(ana_values)
    init_t = axis.num(init_values)
    _check_axis(ana_values, ana_t, "analyses' time", axis)
    _check_axis(init_values, init_t, "forecasts' init_time", axis)
    leads = _lead_numbers(fc, axis)
    _check_axis(
        np.asarray(fc[LEAD].values),
        leads.astype(np.float64),
        "forecasts' lead_time",
        TimeAxis("numeric"),
    )
    return axis, ana_values, init_values, ana_t, init_t, leads


def _check_grids(
    ana: xr.Dataset, fc: xr.Dataset, fields: list[str], level_dims: Sequence[str] | None
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Grid dims, sizes, coordinates and units must agree; return grids and level dims."""
    level: dict[str, tuple[str, ...]] = {}
    grids: dict[str, tuple[str, ...]] = {}
    for f in fields:
        a_grid = tuple(d for d in ana[f].dims if d != TIME)
        f_grid = tuple(d for d in fc[f].dims if d not in (INIT, LEAD))
        if set(a_grid) != set(f_grid):
            raise InputError(
                f"variable {f!r}: grid dims differ between analyses {list(a_grid)} and "
                f"forecasts {list(f_grid)}"
            )
        for d in a_grid:
            if ana[f].sizes[d] != fc[f].sizes[d]:
                raise InputError(
                    f"variable {f!r}: grid dim {d!r} has size {ana[f].sizes[d]} in the "
                    f"analyses and {fc[f].sizes[d]} in the forecasts"
                )
        grid = set(a_grid)
        a_coords, f_coords = _grid_coords(ana, grid), _grid_coords(fc, grid)
        for name in sorted(set(a_coords) & set(f_coords)):
            _compare_coord(name, a_coords[name], f_coords[name], f)
        ua, uf = _units(ana[f].attrs), _units(fc[f].attrs)
        if ua is not None and uf is not None and ua != uf:
            raise InputError(
                f"variable {f!r}: units differ: analyses in {ua!r}, forecasts in {uf!r}"
            )
        grids[f] = a_grid
        level[f] = level_dims_of(a_grid, [ana, fc], level_dims)
    return grids, level
