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

    @property
    def interval(self) -> float:
        return float(np.median(np.diff(self.times)))

    @property
    def train_end(self) -> int:
        """Index of the first test-period analysis (all analyses if none is set)."""
        if self.test_start is None:
            return len(self.times)
        return int(np.searchsorted(self.times, self.test_start - 1e-9))


def load_analyses(path: str | Path, variable: str = "X") -> AnalysisData:
    """A ``mecs synth`` directory, or an analyses store (zarr or netCDF)."""
    import xarray as xr

    from correction.storage import open_zarr
    from data_pipeline.benchmarks import L96Benchmark

    path = Path(path)
    host_params: dict[str, Any] = {}
    test_start = None
    store = path
    if (path / "analyses.zarr").exists():
        store = path / "analyses.zarr"
        summary = json.loads((path / "config.json").read_text())
        c = summary["config"]
        host_params = L96Benchmark.of(c).host_params()
        test_start = float(summary["test_start"])
    if not store.exists():
        raise UsageError(f"analyses {path} do not exist")
    ds = open_zarr(store) if store.suffix == ".zarr" or store.is_dir() else xr.open_dataset(store)
    if variable not in ds:
        raise UsageError(f"analyses {store} have no variable '{variable}' ({list(ds.data_vars)})")
    if test_start is None and "test_start" in ds.attrs:
        test_start = float(ds.attrs["test_start"])
    values = ds[variable].values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])
        raise UsageError(f"analyses {store}: variable '{variable}' has NaN at time index {bad}")
    times = ds["time"].values.astype(np.float64)
    return AnalysisData(store, values, times, test_start, host_params)


def settings_with_flags(args: Any, flags: tuple[str, ...]) -> dict[str, Any]:
    """Settings from ``--config`` (JSON/TOML), overridden by the flags that were given."""
    from data_pipeline.config import read_settings_file

    settings = read_settings_file(args.config) if args.config else {}
    settings.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    return settings


HOST_HELP = (
    "host model spec: torch:NAME (or a registered NAME: l96, l96-2s), "
    "python:MODULE:CALLABLE, or process:COMMAND (an external model speaking mecs-step/1)"
)


def make_named_host(
    spec: str,
    params: dict[str, Any],
    state_shape: tuple[int, ...] | None = None,
    dt: float | None = None,
    timeout_s: float = 60.0,
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
            timeout_s=timeout_s,
        )
    except (HostSpecError, HostProcessError, TypeError, ValueError) as err:
        raise UsageError(f"host '{spec}': {err}") from None
