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

from .base import (
    DEFAULT_SPLIT,
    INIT,
    LEAD,
    MARKER,
    ROLES,
    SAMPLE,
    SPLIT_NAMES,
    STATS_FILE,
    TIME,
    IncompleteStoreError,
    InputError,
)
from .build import IncrementReport, build_increments
from .graph import dask_scheduler, gather, run_chunks
from .inputs import open_input
from .numerics import combine_moments, content_hash, outputs, sample_digests, store_order
from .plan import IncrementPlan, plan_increments
from .reading import open_increments, read_stats, verify_increments
from .splits import SplitPlan, assign_splits, parse_split
from .timeaxis import Alignment, TimeAxis, align, iso_duration, match_times
from .validation import level_dims_of

__all__ = [
    "Alignment",
    "DEFAULT_SPLIT",
    "INIT",
    "IncompleteStoreError",
    "IncrementPlan",
    "IncrementReport",
    "InputError",
    "LEAD",
    "MARKER",
    "ROLES",
    "SAMPLE",
    "SPLIT_NAMES",
    "STATS_FILE",
    "SplitPlan",
    "TIME",
    "TimeAxis",
    "align",
    "assign_splits",
    "build_increments",
    "combine_moments",
    "content_hash",
    "dask_scheduler",
    "gather",
    "iso_duration",
    "level_dims_of",
    "match_times",
    "open_increments",
    "open_input",
    "outputs",
    "parse_split",
    "plan_increments",
    "read_stats",
    "run_chunks",
    "sample_digests",
    "store_order",
    "verify_increments",
]
