"""Helpers shared by the training subcommands: analyses and hosts from a benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mecs.cli import UsageError


@dataclass
class AnalysisData:
    """Analyses as one array plus what training needs to know about them."""

    path: Path
    values: np.ndarray  # [time, *state]
    times: np.ndarray
    test_start: float | None
    host_params: dict[str, Any]
    layout: Any = None  # the correction layout the state is stacked in

    @property
    def interval(self) -> float:
        return float(np.median(np.diff(self.times)))

    @property
    def train_end(self) -> int:
        """Index of the first test-period analysis (all analyses if none is set)."""
        if self.test_start is None:
            return len(self.times)
        return int(np.searchsorted(self.times, self.test_start - 1e-9))


def report(*parts: Any) -> None:
    """Print a stage's result once: on rank 0 under torchrun, always otherwise."""
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(*parts)


def load_analyses(
    path: str | Path,
    variable: str = "X",
    layout: Any = None,
    dims: str | None = None,
    variables: str | None = None,
    time_unit: str | None = None,
) -> AnalysisData:
    """Analyses from a ``mecs synth`` directory, or any analyses store in the pipeline's
    conventions (zarr, netCDF or a glob; ``dims`` renames, as ``mecs increments --dims``).

    The state is the fields of ``layout`` (a correction model's) stacked in its order,
    else ``variables`` (comma-separated) or, in a benchmark store, ``variable``.
    Datetime64 times are counted in ``time_unit`` (the host's; hours by default).
    """
    from data_pipeline.benchmarks import benchmark_of
    from data_pipeline.increments import InputError, open_input
    from data_pipeline.increments.base import TIME
    from data_pipeline.increments.inputs import parse_renames

    path = Path(path)
    host_params: dict[str, Any] = {}
    test_start = None
    source: Any = str(path)
    if (path / "analyses.zarr").exists():
        source = path / "analyses.zarr"
        summary = json.loads((path / "config.json").read_text())
        c = summary["config"]
        host_params = benchmark_of(c).host_params()
        test_start = float(summary["test_start"])
    try:
        ds, _ = open_input(source, "analyses", TIME, parse_renames(dims, "--dims"))
    except InputError as err:
        raise UsageError(" ".join(str(err).split())) from None
    if TIME not in ds.dims:
        raise UsageError(f"analyses {path} have no '{TIME}' dimension ({list(ds.dims)})")
    if layout is None:
        fields = [v.strip() for v in variables.split(",")] if variables else None
        if fields is None:
            fields = (
                [variable] if variable in ds else [v for v in ds.data_vars if TIME in ds[v].dims]
            )
        layout = layout_of(ds, fields)
    try:
        values = layout.dataset_to_state(ds, TIME).astype(np.float64)
    except ValueError as err:
        raise UsageError(f"analyses {path}: {err}") from None
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])
        raise UsageError(f"analyses {path}: NaN or Inf at time {ds[TIME].values[bad]}")
    raw = ds[TIME].values
    if test_start is None and "test_start" in ds.attrs:
        test_start = ds.attrs["test_start"]
    if raw.dtype.kind == "M":  # datetime64: counted in the host's time unit from the start
        from correction.timeunits import seconds_per

        per = seconds_per(time_unit or "hour")
        if per is None:
            raise UsageError(
                f"analyses {path} have datetime64 times but the host counts model time units"
            )
        origin = raw[0]
        times = (raw - origin) / np.timedelta64(1, "s") / per
        if isinstance(test_start, str):
            test_start = float((np.datetime64(test_start) - origin) / np.timedelta64(1, "s") / per)
    else:
        times = raw.astype(np.float64)
    if test_start is not None:
        test_start = float(test_start)
    return AnalysisData(path, values, times, test_start, host_params, layout)


def archive_pairs(store: str, layout: Any, dims: str | None = None):
    """States and the states one lead step later, from a forecast archive (``archive:``).

    The archive is in the pipeline's conventions (``init_time``, ``lead_time``;
    ``dims`` renames, e.g. ``time=init_time,step=lead_time``); its lead spacing is
    the emulator's step (in hours for durations). Pairs with NaN are dropped.
    """
    from data_pipeline.increments import InputError, open_input
    from data_pipeline.increments.base import INIT, LEAD
    from data_pipeline.increments.inputs import parse_renames

    try:
        ds, _ = open_input(store, "archive", INIT, parse_renames(dims, "--dims"))
    except InputError as err:
        raise UsageError(" ".join(str(err).split())) from None
    if INIT not in ds.dims or LEAD not in ds.dims or ds.sizes[LEAD] < 2:
        raise UsageError(f"archive {store}: needs '{INIT}' and at least two '{LEAD}' values")
    leads = ds[LEAD].values
    steps = np.diff(leads)
    if not (steps == steps[0]).all():
        raise UsageError(f"archive {store}: lead times are not evenly spaced ({list(leads)})")
    dt = steps[0] / np.timedelta64(1, "h") if leads.dtype.kind == "m" else float(steps[0])
    try:
        per_lead = [layout.dataset_to_state(ds.isel({LEAD: k}), INIT) for k in range(len(leads))]
    except ValueError as err:
        raise UsageError(f"archive {store}: {err}") from None
    x = np.concatenate(per_lead[:-1]).astype(np.float64)
    y = np.concatenate(per_lead[1:]).astype(np.float64)
    ok = np.isfinite(x.reshape(len(x), -1)).all(1) & np.isfinite(y.reshape(len(y), -1)).all(1)
    if not ok.any():
        raise UsageError(f"archive {store}: no pair of consecutive leads without NaN")
    return (x[ok], y[ok]), float(dt)


def layout_of(ds: Any, fields: list[str]):
    """The model layout of ``fields`` of an analyses dataset (levels detected as the
    increment pipeline does)."""
    from correction.layout import ModelLayout
    from data_pipeline.increments.base import TIME
    from data_pipeline.increments.validation import level_dims_of

    missing = [f for f in fields if f not in ds]
    if missing:
        raise UsageError(f"analyses have no variable '{missing[0]}' ({list(ds.data_vars)})")
    levels = {f: list(level_dims_of([d for d in ds[f].dims if d != TIME], [ds])) for f in fields}
    try:
        layout = ModelLayout.from_dataset(ds, fields, levels, sample_dim=TIME)
    except ValueError as err:
        raise UsageError(str(err)) from None
    units = {f: str(ds[f].attrs.get("units", "1")) for f in fields}
    return ModelLayout(
        layout.fields,
        layout.field_dims,
        layout.level_dims,
        layout.horizontal_dims,
        layout.sizes,
        units,
    )


#: command options a stage's settings file may also give (``host = "process:./model"``)
FILE_OPTIONS = ("host", "host_dt", "host_timeout", "dims", "archive_dims", "variables")


def settings_with_flags(args: Any, flags: tuple[str, ...]) -> dict[str, Any]:
    """Settings from ``--config`` (JSON/TOML), overridden by the flags that were given.

    The file may also hold the command's host options (:data:`FILE_OPTIONS`); they
    apply where the command line left them unset, and are not stage settings.
    """
    from data_pipeline.config import read_settings_file

    settings = read_settings_file(args.config) if args.config else {}
    for key in FILE_OPTIONS:
        if key in settings:
            value = settings.pop(key)
            if hasattr(args, key) and getattr(args, key) is None:
                setattr(args, key, value)
    settings.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    return settings


HOST_HELP = (
    "host model spec: torch:NAME (or a registered NAME: l96, l96-2s), "
    "python:MODULE:CALLABLE, or process:COMMAND (an external model speaking mecs-step/1)"
)


def add_host_options(p: Any, required: bool = False, default_note: str = "") -> None:
    """``--host SPEC``, ``--host-dt`` and ``--host-timeout``: the same on every stage."""
    p.add_argument("--host", required=required, default=None, help=HOST_HELP + default_note)
    p.add_argument(
        "--host-dt", type=float, default=None, help="host time step (python: hosts only)"
    )
    p.add_argument(
        "--host-timeout",
        type=float,
        default=None,
        help="seconds a process: host may take per step before it is killed (default 60)",
    )


def make_named_host(
    spec: str,
    params: dict[str, Any],
    state_shape: tuple[int, ...] | None = None,
    dt: float | None = None,
    timeout_s: float | None = 60.0,
    fields: list[str] | None = None,
):
    """The host a ``--host`` spec names; ``params`` (from a benchmark) go to torch hosts only."""
    from correction.hosts.process import HostProcessError
    from correction.hosts.specs import HostSpecError, make_host_from_spec, parse_host_spec

    try:
        parsed = parse_host_spec(spec)
        return make_host_from_spec(
            parsed,
            params if parsed.kind == "torch" else None,
            state_shape=state_shape,
            dt=dt,
            timeout_s=60.0 if timeout_s is None else float(timeout_s),
            fields=fields,
        )
    except (HostSpecError, HostProcessError, TypeError, ValueError) as err:
        raise UsageError(f"host '{spec}': {err}") from None
