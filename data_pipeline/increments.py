"""The increment pipeline: analyses and forecast archives -> an increment store.

For every forecast initial time ``t`` that has a lead equal to the window ``W``:

    state     = analysis(t)            (or the lead-0 forecast, ``state="forecast"``)
    increment = analysis(t + W) - forecast(t, W)
    target    = increment / W          (per unit time: per model time unit, or per hour)

Inputs are anything xarray opens (zarr, netCDF files or globs, fsspec URLs, or
``xr.Dataset`` objects): analyses with dims ``(time, *grid)`` and forecasts with dims
``(init_time, lead_time, *grid)``, numeric or datetime64 times, several fields, optional
vertical levels. Everything is validated from metadata before anything is written
(grids, coordinates, units, time axes, the window's lead); the data themselves are
read once, lazily, in the same dask pass that writes the store, computes the
normalisation statistics (Chan's parallel moments over the training split) and the
per-sample digests of the content hash. Non-finite values in a required field are
found in that pass and abort the build before the store becomes visible.

The store is written into a hidden staging sibling and renamed into place when
complete; it also carries a ``.mecs-complete`` marker holding its content hash,
without which :func:`open_increments` refuses it. A killed job leaves only the
staging directory, which the next run removes; the rerun writes the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.core import flatten, get_dependencies
from dask.highlevelgraph import HighLevelGraph

from .stores import (
    check_destination,
    commit_staging,
    new_staging_path,
    remove_stale_partials,
    update_zarr_attrs,
    write_zarr,
)

SAMPLE = "sample"
TIME, INIT, LEAD = "time", "init_time", "lead_time"
ROLES = ("state", "increment", "target")
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT = "0.7:0.15:0.15"
MARKER = ".mecs-complete"
STATS_FILE = "stats.json"
VERTICAL_NAMES = frozenset({"level", "lev", "plev", "z", "height", "depth", "model_level"})
MAX_CHUNK_SAMPLES = 4096
CHUNK_BYTES = 32 * 2**20  # default output chunk: at most this many bytes per variable
INPUT_CHUNK_BYTES = 64 * 2**20  # inputs that are not chunked yet get chunks of this size
IN_MEMORY = "<in-memory xarray.Dataset>"
HASH_VERSION = b"mecs-increments-v1\0"
NS_PER_HOUR = 3_600_000_000_000
CONVENTIONS = "CF-1.10"

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Inputs that do not fit; the message names the variable, the time and the fault."""


class IncompleteStoreError(OSError):
    """The path holds no complete increment store (no completion marker)."""


@dataclass(frozen=True)
class IncrementReport:
    """What a build wrote, for the command line, tests and logs."""

    path: str
    n_samples: int
    n_candidates: int
    n_skipped_missing_analysis: int
    n_outside_analysis_period: int
    n_dropped_in_gaps: int
    splits: dict[str, Any]
    content_hash: str
    window: float
    window_units: str
    input_bytes: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        counts = ", ".join(
            f"{name} {self.splits[name]['n_samples']}"
            for name in SPLIT_NAMES
            if name in self.splits
        )
        lines = [
            f"samples {self.n_samples} ({counts}) from {self.n_candidates} forecasts; "
            f"window {self.window:g} {self.window_units}",
            f"skipped {self.n_skipped_missing_analysis} with a missing analysis "
            f"({self.n_outside_analysis_period} of them outside the analysis period); "
            f"dropped {self.n_dropped_in_gaps} in the gaps between splits",
        ]
        blocks = [
            f"{name} [{self.splits[name]['start']}, {self.splits[name]['end']}]"
            for name in SPLIT_NAMES
            if name in self.splits
        ]
        gap = self.splits.get("gap")
        lines.append("splits: " + ", ".join(blocks) + (f" (gap {gap})" if gap is not None else ""))
        lines.append(f"content hash {self.content_hash}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- time axes

_UNIT_NAMES = {
    "s": "second",
    "sec": "second",
    "second": "second",
    "seconds": "second",
    "min": "minute",
    "minute": "minute",
    "minutes": "minute",
    "h": "hour",
    "hr": "hour",
    "hrs": "hour",
    "hour": "hour",
    "hours": "hour",
    "d": "day",
    "day": "day",
    "days": "day",
}
_UNIT_NS = {"second": 10**9, "minute": 60 * 10**9, "hour": NS_PER_HOUR, "day": 24 * NS_PER_HOUR}


def _time_kind(values: np.ndarray, where: str) -> str:
    if np.issubdtype(values.dtype, np.datetime64):
        return "datetime"
    if np.issubdtype(values.dtype, np.timedelta64):
        return "timedelta"
    if np.issubdtype(values.dtype, np.number) and not np.issubdtype(values.dtype, np.bool_):
        return "numeric"
    raise InputError(
        f"{where} has values of type {values.dtype}; expected numbers or datetime64 "
        "(cftime calendars are not supported: open the data with standard calendars)"
    )


@dataclass(frozen=True)
class TimeAxis:
    """Numeric model time, or datetime64/timedelta64 handled as int64 nanoseconds."""

    kind: str  # "numeric" | "datetime" | "timedelta"
    units: str | None = None  # the numeric time's units attribute

    @property
    def is_numeric(self) -> bool:
        return self.kind == "numeric"

    @property
    def unit(self) -> str:
        """Singular time unit of the target's units (``K per hour``)."""
        if not self.is_numeric:
            return "hour"
        if self.units in (None, "", "1"):
            return "model time unit"
        return _UNIT_NAMES.get(self.units.strip().lower(), self.units)

    @property
    def window_units(self) -> str:
        if not self.is_numeric:
            return "hours"
        return "model time units" if self.units in (None, "", "1") else self.units

    def num(self, values: Any) -> np.ndarray:
        """Times as float64 (numeric) or int64 nanoseconds."""
        values = np.asarray(values)
        if self.is_numeric:
            return values.astype(np.float64)
        unit = "datetime64[ns]" if self.kind == "datetime" else "timedelta64[ns]"
        return values.astype(unit).astype(np.int64)

    def to_units(self, span: float) -> float:
        """A span in stored numbers -> the window's units (hours for datetime)."""
        return float(span) if self.is_numeric else float(span) / NS_PER_HOUR

    def fmt(self, value: float | None) -> Any:
        """A time or span for JSON attributes and messages."""
        if value is None or (isinstance(value, float) and math.isinf(value)):
            return None
        if self.is_numeric:
            return float(f"{float(value):.12g}")
        if self.kind == "datetime":
            return str(np.datetime_as_string(np.datetime64(int(value), "ns"), unit="s"))
        return f"{int(value) / NS_PER_HOUR:g}h"

    def fmt_span(self, value: float) -> str:
        return f"{float(value):g}" if self.is_numeric else f"{int(value) / NS_PER_HOUR:g}h"

    def parse_span(self, value: Any, what: str) -> float | int:
        """A window, gap or tolerance: a number (numeric time) or a duration (datetime)."""
        if self.is_numeric:
            try:
                if isinstance(value, bool):
                    raise TypeError
                span = float(value)
            except (TypeError, ValueError):
                raise InputError(
                    f"{what} {value!r} is not a number; times are numeric, so give "
                    "it in the data's time units (for example 0.05)"
                ) from None
            if not math.isfinite(span):
                raise InputError(f"{what} must be finite, got {value!r}")
            return span
        if isinstance(value, int | float | np.number) and not isinstance(value, np.timedelta64):
            raise InputError(
                f"{what} {value!r} has no unit; times are datetime64, so give a duration "
                "such as '6h', '90min' or 'PT6H'"
            )
        try:
            return int(pd.Timedelta(value).value)
        except (TypeError, ValueError):
            raise InputError(
                f"{what} {value!r} is not a duration (examples: '6h', '90min', 'PT6H', '1D')"
            ) from None

    def parse_point(self, text: Any, what: str) -> float | int:
        """A split boundary: a number, or an ISO date/time (datetime)."""
        if self.is_numeric:
            try:
                return float(text)
            except (TypeError, ValueError):
                raise InputError(f"{what} {text!r} is not a number") from None
        if self.kind == "timedelta":
            return self.parse_span(text, what)
        try:
            value = np.datetime64(text if not isinstance(text, str) else text.strip(), "ns")
        except (TypeError, ValueError):
            raise InputError(f"{what} {text!r} is not an ISO date or time") from None
        if np.isnat(value):
            raise InputError(f"{what} {text!r} is not an ISO date or time")
        return int(value.astype(np.int64))


def iso_duration(ns: int) -> str:
    """An ISO 8601 duration such as ``PT6H`` or ``PT1H30M``."""
    seconds = ns / 1e9
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "PT"
    text += f"{int(hours)}H" if hours else ""
    text += f"{int(minutes)}M" if minutes else ""
    text += f"{secs:g}S" if secs else ""
    return text if text != "PT" else "PT0S"


def _check_axis(values: np.ndarray, nums: np.ndarray, where: str, axis: TimeAxis) -> None:
    """Times must be present, unique and strictly increasing."""
    bad = ~np.isfinite(nums) if axis.is_numeric else np.isnat(values)
    if bad.any():
        raise InputError(f"{where} has a missing (NaN/NaT) value at position {np.argmax(bad)}")
    if len(nums) < 2:
        return
    step = np.diff(nums)
    if (step == 0).any():
        i = int(np.argmax(step == 0)) + 1
        raise InputError(f"{where} has duplicate times: {axis.fmt(nums[i])} appears twice")
    if (step < 0).any():
        i = int(np.argmax(step < 0)) + 1
        raise InputError(
            f"{where} is not monotonic increasing: {axis.fmt(nums[i])} follows "
            f"{axis.fmt(nums[i - 1])} (sort the data by time first)"
        )


# ----------------------------------------------------------------------------- alignment


def match_times(sorted_times: np.ndarray, query: np.ndarray, tol: float) -> np.ndarray:
    """Index of the nearest of ``sorted_times`` to each query, or -1 beyond ``tol``."""
    sorted_times, query = np.asarray(sorted_times), np.asarray(query)
    if len(sorted_times) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    right = np.clip(np.searchsorted(sorted_times, query), 0, len(sorted_times) - 1)
    left = np.clip(right - 1, 0, len(sorted_times) - 1)
    d_right = np.abs(sorted_times[right] - query)
    d_left = np.abs(sorted_times[left] - query)
    idx = np.where(d_left <= d_right, left, right)
    best = np.minimum(d_left, d_right)
    return np.where(best <= tol, idx, -1).astype(np.int64)


@dataclass(frozen=True)
class Alignment:
    """Which forecasts give a sample, and where their analyses are."""

    init_index: np.ndarray  # into the forecasts' init times, one per sample
    valid_index: np.ndarray  # into the analysis times: analysis(t + W)
    state_index: np.ndarray | None  # into the analysis times: analysis(t), or None
    skipped: np.ndarray  # init indices without the analyses they need
    outside: np.ndarray  # per skipped: the needed time lies outside the analysis period


def align(
    analysis_times: np.ndarray,
    init_times: np.ndarray,
    lead: float,
    tol: float,
    state_from_analysis: bool = True,
) -> Alignment:
    """Match each forecast ``(t, lead)`` with the analyses at ``t + lead`` (and ``t``).

    Times are numbers (or int64 nanoseconds), both sorted; a match is the nearest
    analysis within ``tol``.
    """
    ana, init = np.asarray(analysis_times), np.asarray(init_times)
    valid_query = init + lead
    valid = match_times(ana, valid_query, tol)
    ok = valid >= 0
    state = None
    if state_from_analysis:
        state = match_times(ana, init, tol)
        ok &= state >= 0
    skipped = np.flatnonzero(~ok)
    if len(ana):
        lo, hi = ana[0] - tol, ana[-1] + tol
        out = (valid_query[skipped] < lo) | (valid_query[skipped] > hi)
        if state_from_analysis:
            out |= (init[skipped] < lo) | (init[skipped] > hi)
    else:
        out = np.ones(len(skipped), dtype=bool)
    keep = np.flatnonzero(ok)
    return Alignment(
        init_index=keep,
        valid_index=valid[keep],
        state_index=None if state is None else state[keep],
        skipped=skipped,
        outside=out,
    )


# ----------------------------------------------------------------------------- splits


def parse_split(spec: Any) -> tuple[str, Any]:
    """``"0.7:0.15:0.15"`` -> fractions; ``"train=0:700,val=710:850"`` -> raw ranges.

    Also accepts a sequence of fractions or a mapping ``{name: (start, end)}``.
    Range ends stay text until the time axis is known (:func:`assign_splits`).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = DEFAULT_SPLIT
    if isinstance(spec, Mapping):
        ranges = {}
        for name, bounds in spec.items():
            if name not in SPLIT_NAMES:
                raise InputError(f"split name {name!r} is not one of {list(SPLIT_NAMES)}")
            start, end = bounds
            ranges[name] = (start, end)
        if not ranges:
            raise InputError("the split names no block")
        return "ranges", ranges
    if isinstance(spec, str) and "=" in spec:
        ranges = {}
        for part in spec.split(","):
            name, sep, bounds = part.partition("=")
            name = name.strip()
            if not sep or name not in SPLIT_NAMES:
                raise InputError(
                    f"split part {part!r} is not NAME=START:END with NAME one of "
                    f"{list(SPLIT_NAMES)}"
                )
            if name in ranges:
                raise InputError(f"split block {name!r} is given twice")
            ranges[name] = bounds.strip()
        return "ranges", ranges
    parts = spec.split(":") if isinstance(spec, str) else list(spec)
    try:
        fractions = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(
            f"split {spec!r} is neither fractions (0.7:0.15:0.15) nor ranges "
            "(train=0:700,val=710:850,test=860:1000)"
        ) from None
    if not 1 <= len(fractions) <= 3:
        raise InputError(f"split {spec!r} needs 1 to 3 fractions (train:val:test)")
    if any(not (math.isfinite(f) and f >= 0) for f in fractions) or fractions[0] <= 0:
        raise InputError(f"split fractions must be non-negative and train positive: {spec!r}")
    if sum(fractions) > 1 + 1e-9:
        raise InputError(f"split fractions {spec!r} add up to {sum(fractions):g} > 1")
    return "fractions", fractions


def _range_bounds(text: Any, name: str, axis: TimeAxis) -> tuple[float, float]:
    """``"a:b"`` or ``"a..b"`` (ends inclusive, either may be empty) -> numbers."""
    if not isinstance(text, str):
        start, end = text
        return (
            -math.inf if start is None else axis.parse_point(start, f"split {name} start"),
            math.inf if end is None else axis.parse_point(end, f"split {name} end"),
        )
    cuts = [text.index("..")] if ".." in text else [i for i, c in enumerate(text) if c == ":"]
    width = 2 if ".." in text else 1
    last_err = None
    for cut in cuts:
        a, b = text[:cut].strip(), text[cut + width :].strip()
        try:
            start = -math.inf if not a else axis.parse_point(a, f"split {name} start")
            end = math.inf if not b else axis.parse_point(b, f"split {name} end")
        except InputError as err:
            last_err = err
            continue
        return start, end
    raise InputError(
        f"split block {name}={text!r} is not START:END"
        + (f" ({last_err})" if last_err is not None else "")
    )


def _round_boundary(value: float, axis: TimeAxis) -> float | int:
    if axis.is_numeric:
        return float(f"{value:.12g}")
    return int(round(value / 1e9)) * 10**9  # whole seconds


@dataclass(frozen=True)
class SplitPlan:
    labels: np.ndarray  # per sample: "train", "val", "test" or "" (in a gap)
    record: dict[str, Any]  # the boundaries actually used, for the store's attrs


def assign_splits(
    init: np.ndarray,
    spec: Any,
    axis: TimeAxis,
    window: float,
    gap: Any = None,
) -> SplitPlan:
    """Contiguous time blocks (ends inclusive) of the samples' init times.

    Fractions cut the init-time range ``[t0, t1]`` at ``t0 + cumsum(f) * (t1 - t0)``
    and leave a gap centred on each cut: ``gap`` or, by default, the larger of the
    window and 1 % of the range. Samples in a gap belong to no split.
    """
    method, parsed = parse_split(spec)
    init = np.asarray(init)
    labels = np.full(len(init), "", dtype=object)
    record: dict[str, Any] = {"method": method}
    if isinstance(spec, str):
        record["spec"] = spec
    blocks: dict[str, tuple[float, float]] = {}
    if method == "fractions":
        t0, t1 = (float(init.min()), float(init.max())) if len(init) else (0.0, 0.0)
        span = t1 - t0
        g = max(float(window), 0.01 * span) if gap is None else axis.parse_span(gap, "gap")
        if g < 0:
            raise InputError(f"gap must not be negative, got {gap!r}")
        g = _round_boundary(float(g), axis) if not axis.is_numeric else float(g)
        record["gap"] = axis.fmt_span(g)
        cum = np.cumsum(parsed)
        for i, name in enumerate(SPLIT_NAMES[: len(parsed)]):
            if parsed[i] == 0:
                continue
            start = t0 if i == 0 else t0 + cum[i - 1] * span + g / 2
            last = i == len(parsed) - 1 and cum[-1] >= 1 - 1e-9
            end = t1 if last else t0 + cum[i] * span - g / 2
            blocks[name] = (_round_boundary(start, axis), _round_boundary(end, axis))
    else:
        if gap is not None:
            raise InputError("gap applies to fraction splits; time ranges set their own gaps")
        record["gap"] = None
        for name, text in parsed.items():
            start, end = _range_bounds(text, name, axis)
            if start > end:
                raise InputError(f"split block {name} starts after it ends ({text!r})")
            blocks[name] = (start, end)
        ordered = sorted(blocks.items(), key=lambda kv: kv[1][0])
        for (n1, (_, e1)), (n2, (s2, _)) in zip(ordered, ordered[1:], strict=False):
            if s2 <= e1:
                raise InputError(f"split blocks {n1} and {n2} overlap")
    for name in SPLIT_NAMES:
        if name not in blocks:
            continue
        start, end = blocks[name]
        inside = (init >= start) & (init <= end)
        labels[inside & (labels == "")] = name
        record[name] = {
            "start": axis.fmt(start),
            "end": axis.fmt(end),
            "n_samples": int(inside.sum()),
            "first": axis.fmt(init[inside][0]) if inside.any() else None,
            "last": axis.fmt(init[inside][-1]) if inside.any() else None,
        }
    return SplitPlan(labels=labels, record=record)


# ----------------------------------------------------------------------------- inputs


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _looks_zarr(text: str) -> bool:
    stripped = text.rstrip("/")
    if stripped.endswith(".zarr"):
        return True
    p = Path(stripped)
    return (
        not _is_url(text)
        and p.is_dir()
        and any((p / name).exists() for name in ("zarr.json", ".zgroup", ".zmetadata"))
    )


def _open_zarr(path: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        return xr.open_zarr(path, chunks={})


def _step_chunks(ds: xr.Dataset, dim: str) -> int:
    """Steps along ``dim`` per chunk so that one chunk of any variable is ~64 MiB."""
    per_step = max(
        (
            v.dtype.itemsize * v.size / max(v.sizes[dim], 1)
            for v in ds.data_vars.values()
            if dim in v.dims
        ),
        default=1,
    )
    return max(1, int(INPUT_CHUNK_BYTES // max(per_step, 1)))


def open_input(source: Any, role: str, time_dim: str) -> tuple[xr.Dataset, str]:
    """Open analyses or forecasts lazily; return the dataset and its recorded source."""
    if isinstance(source, xr.DataArray):
        source = source.to_dataset()
    if isinstance(source, xr.Dataset):
        return source, IN_MEMORY
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    recorded = text if _is_url(text) else os.path.abspath(text)
    try:
        if _has_glob(text) and not _is_url(text):
            paths = sorted(glob.glob(text))
            if not paths:
                raise InputError(f"{role}: no file matches {text!r}")
            if all(_looks_zarr(p) for p in paths):
                ds = xr.combine_by_coords([_open_zarr(p) for p in paths], combine_attrs="override")
            else:
                with xr.open_dataset(paths[0]) as first:
                    n = _step_chunks(first, time_dim) if time_dim in first.dims else -1
                ds = xr.open_mfdataset(
                    paths, combine="by_coords", chunks={time_dim: n}, combine_attrs="override"
                )
        elif _looks_zarr(text):
            ds = _open_zarr(text)
        else:
            if _is_url(text):
                import fsspec

                ds = xr.open_dataset(fsspec.open(text, mode="rb").open(), chunks={})
            else:
                ds = xr.open_dataset(text)  # lazy backend arrays; chunked below
    except InputError:
        raise
    except (OSError, ValueError, ImportError, KeyError, TypeError) as err:
        raise InputError(f"cannot open {role} {text!r}: {err}") from None
    return ds, recorded


def _take_rows(local: list[np.ndarray], *chunks: np.ndarray) -> np.ndarray:
    """Rows ``local[i]`` of ``chunks[i]``, concatenated."""
    return np.concatenate([np.take(c, li, axis=0) for c, li in zip(chunks, local, strict=True)])


def _row_sources(bounds: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which input chunks hold rows ``index`` (sorted), and the rows' local indices."""
    owner = np.searchsorted(bounds, index, side="right") - 1
    ks = np.unique(owner)
    return ks, [index[owner == k] - bounds[k] for k in ks]


def _row_keys(arr: da.Array) -> list[Any]:
    """Block keys of an array chunked along axis 0 only, in row order."""
    return list(flatten(arr.__dask_keys__()))


def gather(arr: da.Array, index: np.ndarray, chunk: int) -> da.Array:
    """``arr[index]`` along axis 0 for a sorted ``index``, in chunks of ``chunk`` rows.

    Each output chunk is one task over just the input chunks holding its rows (dask's
    general fancy indexing shuffles, which holds more as the input grows).
    """
    arr = arr.rechunk({i: -1 for i in range(1, arr.ndim)})  # whole grid per chunk
    bounds = np.cumsum((0, *arr.chunks[0]))
    keys = _row_keys(arr)
    name = "gather-" + tokenize(arr.name, index, chunk)
    tail = (0,) * (arr.ndim - 1)
    layer, sizes = {}, []
    for j, start in enumerate(range(0, len(index), chunk)):
        ks, local = _row_sources(bounds, index[start : start + chunk])
        layer[(name, j, *tail)] = (partial(_take_rows, local), *[keys[k] for k in ks])
        sizes.append(sum(len(li) for li in local))
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[arr])
    chunks = (tuple(sizes), *((n,) for n in arr.shape[1:]))
    return da.Array(graph, name, chunks, meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _lazy(var: xr.DataArray, dim: str) -> da.Array:
    """A dask array for ``var``; numpy-backed or lazily indexed data gets chunked."""
    if isinstance(var.data, da.Array):
        return var.data
    per_step = var.dtype.itemsize * var.size / max(var.sizes[dim], 1)
    n = max(1, int(INPUT_CHUNK_BYTES // max(per_step, 1)))
    return var.chunk({dim: n}).data


# ----------------------------------------------------------------------------- validation


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


# ----------------------------------------------------------------------------- the plan


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

    ana, ana_src = open_input(analyses, "analyses", TIME)
    fc, fc_src = open_input(forecasts, "forecasts", INIT)
    if TIME not in ana.dims:
        raise InputError(f"analyses have no '{TIME}' dimension (dims: {list(ana.dims)})")
    for dim in (INIT, LEAD):
        if dim not in fc.dims:
            raise InputError(f"forecasts have no '{dim}' dimension (dims: {list(fc.dims)})")
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


# ----------------------------------------------------------------------------- one pass


def _moments(x: np.ndarray, level_axes: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) over every axis but ``level_axes``, in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = np.moveaxis(x, level_axes, tuple(range(len(level_axes))))
    lshape = x.shape[: len(level_axes)]
    x = x.reshape(*lshape, -1)
    n = x.shape[-1]
    if n == 0:
        return 0, np.zeros(lshape), np.zeros(lshape)
    mean = x.mean(axis=-1)
    m2 = ((x - mean[..., None]) ** 2).sum(axis=-1)
    return n, mean, m2


def combine_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s parallel combination of (count, mean, M2)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def sample_digests(blocks: Sequence[np.ndarray]) -> bytes:
    """sha256 of each sample's little-endian float32 bytes across ``blocks``, joined."""
    n = blocks[0].shape[0]
    rows = np.concatenate(
        [np.ascontiguousarray(b, dtype="<f4").reshape(n, -1).view(np.uint8) for b in blocks],
        axis=1,
    )
    return b"".join(hashlib.sha256(row).digest() for row in rows)


def outputs(
    a_valid: np.ndarray, f_w: np.ndarray, s_in: np.ndarray, w_units: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(state, increment, target) as float32; the difference is taken in float64."""
    inc64 = np.asarray(a_valid, dtype=np.float64) - np.asarray(f_w, dtype=np.float64)
    return (
        np.asarray(s_in).astype(np.float32),
        inc64.astype(np.float32),
        (inc64 / w_units).astype(np.float32),
    )


def _role_block(a_valid, f_w, s_in, role: str, w_units: float) -> np.ndarray:
    return outputs(a_valid, f_w, s_in, w_units)[ROLES.index(role)]


def _summarise(
    offset: int, train: tuple[int, int], level_axes: list[tuple[int, ...]], blocks: list
) -> dict[str, Any]:
    """Per-sample digests, non-finite samples and training moments of one sample chunk.

    ``blocks`` are the output blocks in store order; ``level_axes`` one entry per block.
    """
    n = blocks[0].shape[0]
    bad, moments = [], []
    lo, hi = max(train[0] - offset, 0), min(train[1] - offset, n)
    for b, axes in zip(blocks, level_axes, strict=True):
        finite = np.isfinite(b).reshape(n, -1).all(axis=1)
        bad.append(offset + np.flatnonzero(~finite))
        moments.append(_moments(b[lo:hi], axes) if hi > lo else None)
    return {"digests": sample_digests(blocks), "bad": bad, "moments": moments}


def _chunk_task(
    store: str,
    names: list[str],
    level_axes: list[tuple[int, ...]],
    offset: int,
    train: tuple[int, int],
    w_units: float,
    layout: list[list[np.ndarray]],
    *chunks: np.ndarray,
) -> dict[str, Any]:
    """Gather, compute, check, summarise and write one chunk of samples (all variables).

    For each field, the inputs are (analysis at the valid time, forecast, state
    source); input ``i`` takes rows ``layout[i][m]`` of the next ``len(layout[i])``
    of ``chunks``. Taking the rows here, in the task that consumes them, keeps
    memory to the chunk's own input and output blocks. A chunk with a non-finite
    value is not written (the build then fails and discards the store).
    """
    inputs, pos = [], 0
    for local in layout:
        inputs.append(_take_rows(local, *chunks[pos : pos + len(local)]))
        pos += len(local)
    blocks: list[np.ndarray] = []
    for k in range(0, len(inputs), 3):
        blocks.extend(outputs(*inputs[k : k + 3], w_units))
    summary = _summarise(offset, train, level_axes, blocks)
    if not any(len(b) for b in summary["bad"]):
        for name, block in zip(names, blocks, strict=True):
            _zarr_array(store, name)[offset : offset + block.shape[0]] = block
    return summary


@functools.lru_cache(maxsize=64)
def _zarr_array(store: str, name: str) -> Any:
    """An array of a store being written (opened once per process)."""
    import zarr

    return zarr.open_array(store, path=name, mode="r+", zarr_format=3)


def _finalize(*summaries: dict[str, Any]) -> dict[str, Any]:
    """Join the chunk summaries in sample order."""
    digests = b"".join(s["digests"] for s in summaries)
    n_vars = len(summaries[0]["bad"]) if summaries else 0
    bad = [np.concatenate([s["bad"][v] for s in summaries]) for v in range(n_vars)]
    moments = []
    for v in range(n_vars):
        acc = (0, 0.0, 0.0)
        for s in summaries:
            if s["moments"][v] is not None:
                acc = combine_moments(acc, s["moments"][v])
        moments.append(acc)
    return {"digests": digests, "bad": bad, "moments": moments}


def _closure(dsk: Mapping, key: Any) -> dict:
    """The sub-graph ``key`` needs."""
    out: dict = {}
    stack = [key]
    while stack:
        k = stack.pop()
        if k not in out:
            out[k] = dsk[k]
            stack.extend(get_dependencies(dsk, k))
    return out


def _chunk_tasks(plan: IncrementPlan, store: str) -> list[Any]:
    """One dask task per chunk of samples: gathered, computed, written, summarised.

    Each is a ``Delayed`` over its own culled sub-graph, so running chunks one window
    at a time costs in proportion to the chunk, not to the whole input graph.
    """
    from dask.array.optimization import optimize
    from dask.delayed import Delayed

    ds = plan.dataset
    names = store_order(plan.fields)
    level_axes = []
    for name in names:
        var = ds[name]
        level_axes.append(tuple(var.dims.index(d) for d in plan.level_dims[var.attrs["field"]]))
    dsk: dict = {}
    sources = []  # (block keys, bounds, index) per field and role, store order
    for f in plan.fields:
        for role in ("analysis_valid", "forecast", "state"):
            arr, index = plan.rows[f][role]
            keys = _row_keys(arr)
            if keys[0] not in dsk:
                dsk.update(optimize(arr.__dask_graph__(), keys))
            sources.append((keys, np.cumsum((0, *arr.chunks[0])), index))
    n, cs = len(sources[0][2]), plan.chunk_samples
    w_units = plan.axis.to_units(plan.window)
    name = "increments-chunk-" + tokenize(store, plan.sources, n, cs)
    task_keys = []
    for j, start in enumerate(range(0, n, cs)):
        layout, refs = [], []
        for keys, bounds, index in sources:
            ks, local = _row_sources(bounds, index[start : start + cs])
            layout.append(local)
            refs.extend(keys[k] for k in ks)
        run = partial(
            _chunk_task, store, names, level_axes, start, plan.train_range, w_units, layout
        )
        dsk[(name, j)] = (run, *refs)
        task_keys.append((name, j))
    return [Delayed(k, _closure(dsk, k)) for k in task_keys]


def _hash_array(h: Any, name: str, values: np.ndarray) -> None:
    values = np.asarray(values)
    h.update(f"{name}\0{values.shape}\0".encode())
    if values.dtype.kind in "mM":  # resolution-independent: int64 nanoseconds
        unit = "datetime64[ns]" if values.dtype.kind == "M" else "timedelta64[ns]"
        values = values.astype(unit).view(np.int64)
        h.update(b"time-ns\0")
    if values.dtype.kind in "OUST":
        h.update(b"str\0" + "\0".join(str(v) for v in values.ravel()).encode())
    else:
        h.update(values.dtype.str.encode() + b"\0")
        h.update(np.ascontiguousarray(values).tobytes())


def store_order(fields: Sequence[str]) -> list[str]:
    """Data variables in store order: state, increment, target of each field."""
    return [f"{role}_{f}" for f in fields for role in ROLES]


def content_hash(ds: xr.Dataset, digests: bytes) -> str:
    """sha256 over coordinates, variable headers and the per-sample digests.

    Each sample's digest is the sha256 of its float32 bytes (little-endian) across
    every data variable in store order (:func:`store_order`), so the hash does not
    depend on chunking or on the order in which chunks were computed.
    """
    h = hashlib.sha256(HASH_VERSION)
    for name in sorted(ds.coords):
        _hash_array(h, str(name), ds.coords[name].values)
    for name in store_order(json.loads(ds.attrs["fields"])):
        var = ds[name]
        h.update(f"{name}\0{var.dims}\0{var.shape}\0{var.dtype.str}\0".encode())
    h.update(digests)
    return h.hexdigest()


def _stats(plan: IncrementPlan, moments: list[tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {"fields": {}, "level_dims": {}, "reduced_dims": {}}
    names = store_order(plan.fields)
    count = plan.train_range[1] - plan.train_range[0]
    for name, (n, mean, m2) in zip(names, moments, strict=True):
        var = plan.dataset[name]
        f, role = var.attrs["field"], var.attrs["role"]
        std = np.sqrt(np.maximum(np.asarray(m2) / max(n, 1), 0.0))
        out["fields"].setdefault(f, {})[role] = {
            "mean": np.asarray(mean, dtype=np.float64).tolist(),
            "std": std.tolist(),
        }
        out["level_dims"][f] = list(plan.level_dims[f])
        out["reduced_dims"][f] = [d for d in var.dims if d not in plan.level_dims[f]]
    out["count"] = int(count)
    out["split"] = "train"
    return out


def _nonfinite_error(plan: IncrementPlan, bad: list[np.ndarray]) -> InputError:
    """Name the variable, the input and the time of the first non-finite sample."""
    names = store_order(plan.fields)
    first = min((int(b[0]), v) for v, b in enumerate(bad) if len(b))
    i, v = first
    f = plan.dataset[names[v]].attrs["field"]
    n_bad = len(np.unique(np.concatenate([b for b in bad if len(b)])))
    axis = plan.axis
    # look at the few input values of that sample (a tiny compute)
    parts = dask.compute({k: a[i] for k, a in plan.inputs[f].items()}, scheduler="sync")[0]
    t_init, t_valid = axis.fmt(plan.sample_init[i]), axis.fmt(plan.sample_valid[i])
    if not np.isfinite(parts["analysis_valid"]).all():
        where = f"analyses variable {f!r} at time {t_valid} (the valid time of the forecast "
        where += f"from {t_init})"
    elif not np.isfinite(parts["forecast"]).all():
        lead = axis.fmt_span(plan.window)
        where = f"forecasts variable {f!r} at init_time {t_init}, lead_time {lead}"
    elif not np.isfinite(parts["state"]).all():
        src = "analyses" if plan.dataset.attrs["state_source"] == "analysis" else "forecasts"
        where = f"{src} variable {f!r} at time {t_init} (the state of the sample)"
    else:
        where = f"the increment of {f!r} from {t_init} (overflow in float32)"
    return InputError(f"NaN or inf in {where}; {n_bad} sample(s) affected")


# ----------------------------------------------------------------------------- schedulers

LOCAL_SCHEDULERS = {
    "sync": "synchronous",
    "synchronous": "synchronous",
    "single-threaded": "synchronous",
    "threads": "threads",
    "threading": "threads",
    "processes": "processes",
}


@contextlib.contextmanager
def dask_scheduler(scheduler: str | None = None, n_workers: int = 2) -> Iterator[Any]:
    """Yield a distributed ``Client`` (or None for dask's local schedulers).

    ``None``: whatever dask uses now (an active distributed client, else threads);
    ``"local"``: a new LocalCluster of ``n_workers`` single-threaded worker processes,
    closed at the end; ``"sync"``/``"threads"``/``"processes"``: dask's local
    schedulers; anything else: the address of a running dask scheduler.
    """
    if scheduler is None:
        client = None
        if "distributed" in sys.modules:
            from distributed import default_client

            with contextlib.suppress(ValueError):
                client = default_client()
        yield client
        return
    if scheduler in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=LOCAL_SCHEDULERS[scheduler]):
            yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise InputError(f"cannot connect to the dask scheduler at {scheduler!r}: {err}") from None
    try:
        yield client
    finally:
        client.close()


def _parallelism(client: Any) -> int:
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _has_bad(summary: dict[str, Any]) -> bool:
    return any(len(b) for b in summary["bad"])


def run_chunks(
    tasks: list[Any], client: Any = None, progress: bool = False, window: int | None = None
) -> list[dict[str, Any]]:
    """Run the chunk tasks in sample order with at most ``window`` chunks in flight.

    Backpressure keeps memory to a few chunks whatever the input size (dask's
    ordering alone reads inputs far ahead of their use when neighbouring chunks
    share input chunks). On a distributed client a sliding window of futures;
    otherwise consecutive batches through dask's current local scheduler. Stops
    at the first chunk with a non-finite value.
    """
    from tqdm.auto import tqdm

    window = window or 2 * _parallelism(client)
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    bar = tqdm(
        total=len(tasks),
        desc="increments",
        unit="chunk",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    with bar:
        if client is None:
            for start in range(0, len(tasks), window):
                batch = dask.compute(*tasks[start : start + window])
                results[start : start + len(batch)] = batch
                bar.update(len(batch))
                if any(_has_bad(r) for r in batch):
                    break
            return [r for r in results if r is not None]
        from distributed import as_completed

        pending = iter(range(len(tasks)))
        index: dict[Any, int] = {}
        for i in range(min(window, len(tasks))):
            index[client.compute(tasks[next(pending)])] = i
        done = as_completed(list(index), loop=client.loop)
        for future in done:
            i = index.pop(future)
            results[i] = future.result()
            bar.update(1)
            if _has_bad(results[i]):
                client.cancel(list(index))
                break
            nxt = next(pending, None)
            if nxt is not None:
                new = client.compute(tasks[nxt])
                index[new] = nxt
                done.add(new)
    if any(_has_bad(r) for r in results if r is not None):
        return [r for r in results if r is not None]
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- build


def build_increments(
    analyses: Any,
    forecasts: Any,
    window: Any,
    out: str | os.PathLike,
    variables: Sequence[str] | str | None = None,
    split: Any = DEFAULT_SPLIT,
    chunk_samples: int | None = None,
    scheduler: str | None = None,
    missing: str = "skip",
    *,
    gap: Any = None,
    state: str = "analysis",
    tolerance: Any = None,
    level_dims: Sequence[str] | str | None = None,
    overwrite: bool = False,
    n_workers: int = 2,
    progress: bool = False,
) -> IncrementReport:
    """Build an increment store at ``out`` from analyses and forecasts.

    ``analyses``/``forecasts``: ``xr.Dataset`` objects, or paths, globs or URLs that
    xarray opens. ``window``: a number in the data's time units, or a duration such
    as ``"6h"`` when times are datetime64. ``split``: fractions ``"0.7:0.15:0.15"``
    or time ranges ``"train=0:700,val=710:850,test=860:1000"`` (ends inclusive).
    ``scheduler``: see :func:`dask_scheduler` (``None`` = dask's current scheduler).
    ``missing="error"`` makes a missing analysis inside the analysis period an error.
    Raises :class:`InputError` before anything is written when inputs do not fit, and
    :class:`~data_pipeline.stores.OutputExistsError` when ``out`` holds data.
    """
    t_start = time.perf_counter()
    out_text = os.fspath(out)
    remote = _is_url(out_text)
    if remote:
        _check_remote_destination(out_text, overwrite)
    else:
        check_destination(Path(out_text).absolute(), overwrite)
    plan = plan_increments(
        analyses,
        forecasts,
        window,
        variables=variables,
        split=split,
        gap=gap,
        chunk_samples=chunk_samples,
        missing=missing,
        state=state,
        tolerance=tolerance,
        level_dims=level_dims,
    )
    ds = plan.dataset
    cs = plan.chunk_samples
    encoding = {name: {"chunks": (cs, *var.shape[1:])} for name, var in ds.data_vars.items()}
    with dask_scheduler(scheduler, n_workers) as client, warnings.catch_warnings():
        # zarr-python stores the "<U5" split labels as its fixed_length_utf32 data type
        warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
        if remote:
            staging = store = _remote_staging(out_text)
        else:
            remove_stale_partials(out_text)
            staging = new_staging_path(out_text)
            store = str(staging)
        try:
            # metadata and coordinates now (the data variables as empty placeholders);
            # the data by one task per chunk
            template = ds.copy()
            for name, var in ds.data_vars.items():
                template[name] = var.copy(
                    data=da.empty(var.shape, chunks=var.data.chunks, dtype=var.dtype)
                )
            write_zarr(template, store, encoding=encoding, compute=False)
            summary = _finalize(*run_chunks(_chunk_tasks(plan, store), client, progress))
            if any(len(b) for b in summary["bad"]):
                raise _nonfinite_error(plan, summary["bad"])
            digest = content_hash(ds, summary["digests"])
            stats = _stats(plan, summary["moments"])
            update_zarr_attrs(store, {"content_hash": digest})
            stats_text = json.dumps(stats, indent=1) + "\n"
            if remote:
                _remote_commit(store, out_text, stats_text, digest)
            else:
                (staging / STATS_FILE).write_text(stats_text)
                (staging / MARKER).write_text(digest + "\n")
                commit_staging(staging, out_text, overwrite)
        except BaseException:
            _discard(staging, remote)
            raise
    path = out_text if remote else str(Path(out_text).absolute())
    return IncrementReport(
        path=path,
        n_samples=int(ds.sizes[SAMPLE]),
        n_candidates=plan.n_candidates,
        n_skipped_missing_analysis=plan.n_skipped_missing_analysis,
        n_outside_analysis_period=plan.n_outside_analysis_period,
        n_dropped_in_gaps=plan.n_dropped_in_gaps,
        splits=plan.splits,
        content_hash=digest,
        window=float(ds.attrs["window"]),
        window_units=str(ds.attrs["window_units"]),
        input_bytes=plan.input_bytes,
        wall_time=time.perf_counter() - t_start,
    )


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _check_remote_destination(out: str, overwrite: bool) -> None:
    """Refuse a non-empty remote ``out``, unless it is an unfinished increment store."""
    from .stores import OutputExistsError

    fs, root = _fs(out)
    if not (fs.exists(root) and fs.ls(root)) or overwrite:
        return
    unfinished = False
    if not fs.exists(f"{root}/{MARKER}") and fs.exists(f"{root}/zarr.json"):
        with contextlib.suppress(Exception):
            meta = json.loads(fs.cat(f"{root}/zarr.json"))
            unfinished = meta.get("attributes", {}).get("source") == "mecs increments"
    if not unfinished:
        raise OutputExistsError(f"output {out} is not empty; pass --overwrite to replace it")


def _remote_staging(out: str) -> str:
    """Object stores cannot rename atomically: stage beside ``out``; the marker commits."""
    import secrets

    fs, root = _fs(out)
    parent, name = root.rstrip("/").rsplit("/", 1)
    protocol = out.split("://", 1)[0]
    return f"{protocol}://{parent}/.{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _remote_commit(staging: str, out: str, stats_text: str, digest: str) -> None:
    fs, root = _fs(out)
    _, stage_root = _fs(staging)
    fs.pipe(f"{stage_root}/{STATS_FILE}", stats_text.encode())
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.mv(stage_root, root, recursive=True)
    fs.pipe(f"{root}/{MARKER}", (digest + "\n").encode())  # last: the store is complete


def _discard(staging: Any, remote: bool) -> None:
    if remote:
        with contextlib.suppress(Exception):
            fs, root = _fs(str(staging))
            fs.rm(root, recursive=True)
    else:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def _read_marker(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    fs, root = _fs(text)
    if not fs.exists(root):
        raise FileNotFoundError(f"no increment store at {text}")
    marker = f"{root.rstrip('/')}/{MARKER}"
    if not fs.exists(marker):
        raise IncompleteStoreError(
            f"{text} is not a complete increment store (no {MARKER} marker): the job that "
            "wrote it did not finish; rebuild it"
        )
    return fs.cat(marker).decode().strip()


def open_increments(path: str | os.PathLike) -> xr.Dataset:
    """Open a complete increment store lazily (dask-backed)."""
    marker = _read_marker(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds = xr.open_zarr(os.fspath(path), zarr_format=3, consolidated=True)
    if ds.attrs.get("content_hash") != marker:
        raise IncompleteStoreError(
            f"{os.fspath(path)}: the completion marker does not match the store's content "
            "hash; the store was modified after it was written"
        )
    return ds


def verify_increments(path: str | os.PathLike) -> str:
    """Recompute a store's content hash from its data; raise if it differs from the marker."""
    ds = open_increments(path)
    names = store_order(json.loads(ds.attrs["fields"]))
    chunk = int(ds[names[0]].encoding.get("chunks", (ds.sizes[SAMPLE],))[0])
    parts = []
    for lo in range(0, ds.sizes[SAMPLE], chunk):
        window = slice(lo, lo + chunk)
        parts.append(sample_digests([ds[name][window].values for name in names]))
    digest = content_hash(ds.compute(), b"".join(parts))
    if digest != ds.attrs["content_hash"]:
        raise IncompleteStoreError(
            f"{os.fspath(path)}: the data do not match the recorded content hash "
            f"({digest} != {ds.attrs['content_hash']})"
        )
    return digest


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """The normalisation statistics (training split) of a complete increment store."""
    _read_marker(path)
    fs, root = _fs(os.fspath(path))
    return json.loads(fs.cat(f"{root.rstrip('/')}/{STATS_FILE}").decode())


__all__ = [
    "DEFAULT_SPLIT",
    "IncompleteStoreError",
    "IncrementPlan",
    "IncrementReport",
    "InputError",
    "align",
    "assign_splits",
    "build_increments",
    "combine_moments",
    "content_hash",
    "dask_scheduler",
    "gather",
    "level_dims_of",
    "match_times",
    "outputs",
    "open_increments",
    "parse_split",
    "plan_increments",
    "read_stats",
    "run_chunks",
    "sample_digests",
    "store_order",
    "verify_increments",
]
