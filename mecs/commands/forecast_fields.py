"""``mecs forecast`` for several-field models: states stacked in the model's layout.

The single-field path (Lorenz-96) stays in :mod:`mecs.commands.forecast` with its
output format unchanged; this one writes one variable per field.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mecs.cli import UsageError


def write_output(ds, out: Path, overwrite: bool) -> None:
    """Write the forecast store atomically (nothing is left if it fails)."""
    from correction.storage import OutputExistsError, staged_directory, write_zarr

    try:
        with staged_directory(out, overwrite=overwrite) as stage:
            write_zarr(ds, stage)
    except OutputExistsError as err:
        raise UsageError(f"mecs forecast: {err}") from None


def _per_field(layout, states, ds, dims: tuple[str, str]) -> dict:
    """States ``[time, batch, *state]`` as one float32 variable per field, ``(*dims, ...)``
    with ``dims`` naming (batch, time) in that order."""
    import numpy as np

    n_t, n_b = states.shape[:2]
    fields = layout.state_to_dataset(states.reshape(n_t * n_b, *layout.state_shape), ds, "case")
    out = {}
    for f in layout.fields:
        arr = fields[f].values.reshape(n_t, n_b, *fields[f].shape[1:]).swapaxes(0, 1)
        attrs = {**ds[f].attrs, "long_name": f"corrected forecast of {f}"}
        out[f] = ((*dims, *layout.field_dims[f]), arr.astype(np.float32), attrs)
    return out


def forecast_or_none(host, x0, steps, source, every, client, progress=None):
    """``run_forecast``'s result, or None after saying why on one line (a state that left
    the finite numbers, a correction service that failed); the client is closed either way."""
    from correction.forecast import run_forecast
    from service.client import ServiceError

    try:
        return run_forecast(host, x0, steps, source, every, progress=progress)
    except FloatingPointError as err:
        print(f"error: mecs forecast: {err}", file=sys.stderr)
    except ServiceError as err:
        print(f"error: mecs forecast: correction service failed: {err}", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    return None


def model_state_shape(args) -> tuple[int, ...]:
    """The correction model's state shape, for a host that cannot say its own (python:)."""
    if args.repository:
        from correction.artifacts import ArtifactError
        from correction.inference import Corrector

        try:
            return tuple(Corrector.load(args.repository, args.model, args.version).state_shape)
        except ArtifactError as err:
            raise UsageError(f"mecs forecast: {err}") from None
    from service.client import CorrectionClient, ServiceError

    try:
        with CorrectionClient(
            args.service, args.model, version=args.version, api_key=os.environ.get("MECS_API_KEY")
        ) as c:
            return tuple(c.metadata()["inputs"][0]["shape"][1:])
    except (ValueError, ServiceError) as err:
        raise UsageError(f"mecs forecast: service {args.service}: {err}") from None


def layout_of(source, client):
    """The model's state layout: the corrector's, or the one the service's metadata states."""
    from correction.layout import ModelLayout

    corrector = getattr(source, "corrector", None)
    if corrector is not None:
        return corrector.layout
    layout = (client.metadata().get("parameters") or {}).get("layout")
    return ModelLayout.from_dict(layout) if layout else None


def init_index(ds, init_time: str | None) -> int:
    """The analysis to start from: ``--init-time`` (a number or an ISO time), else the test
    period's first analysis, else the last one."""
    import numpy as np

    times = np.asarray(ds["time"].values)
    datetime = times.dtype.kind == "M"
    if init_time is None:
        start = ds.attrs.get("test_start")
        if start is None:
            return len(times) - 1
        start = np.datetime64(start) if datetime else float(start)
        return min(int(np.searchsorted(times, start)), len(times) - 1)
    try:
        want = np.datetime64(init_time) if datetime else float(init_time)
    except ValueError:
        raise UsageError(f"mecs forecast: --init-time {init_time!r} is not a time") from None
    hits = np.flatnonzero(times == want)
    if not len(hits):
        raise UsageError(f"mecs forecast: no analysis at --init-time {init_time}")
    return int(hits[0])


def run_fields(args, host, out: Path, ds, source, layout, client) -> int:
    """A forecast of a several-field model: state stacked in the layout, one variable per field."""
    import numpy as np
    import xarray as xr

    if layout is None:
        raise UsageError("mecs forecast: the model states no layout; republish it")
    if tuple(host.state_shape) != tuple(layout.state_shape):
        raise UsageError(
            f"mecs forecast: host state shape {list(host.state_shape)} is not the model's "
            f"{list(layout.state_shape)} (fields {list(layout.fields)})"
        )
    i = init_index(ds, args.init_time)
    if args.hindcast:
        if args.members != 1:
            raise UsageError("mecs forecast: --hindcast runs one forecast per initial time")
        picks = np.arange(i, ds.sizes["time"], args.init_every)
    else:
        picks = np.array([i])
    try:
        x = layout.dataset_to_state(ds.isel(time=picks), "time").astype(np.float64)
    except ValueError as err:
        raise UsageError(f"mecs forecast: --init: {err}") from None
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        t_bad = ds["time"].values[picks[np.argmax(bad)]]
        raise UsageError(f"mecs forecast: the analysis at {t_bad} has NaN or Inf")
    if args.hindcast:  # every initial time at once: one batch through host and service
        return _hindcast(args, host, out, ds, source, layout, client, picks, x)
    x = x[0]
    rng = np.random.default_rng(args.seed)
    x0 = np.repeat(x[None], args.members, axis=0)
    if args.members > 1:  # perturbations in each field's own spread
        spread = layout.dataset_to_state(ds, "time").std(axis=0)
        x0[1:] += args.perturbation * spread * rng.standard_normal(x0[1:].shape)
    result = forecast_or_none(host, x0, args.steps, source, args.output_every, client)
    if result is None:
        return 1
    n_m = result.states.shape[1]
    lead = result.steps * host.dt
    t0 = ds["time"].values[i]
    unit = getattr(host, "time_unit", "model time unit")
    data_vars = _per_field(layout, result.states, ds, ("member", "time"))
    data_vars["model_version"] = ("time", result.versions.astype(np.int32), {"units": "1"})
    grid = {d: ds[d] for d in ds.coords if set(ds[d].dims) <= set(layout.sizes)}
    out_ds = xr.Dataset(
        data_vars,
        coords={
            "member": np.arange(n_m),
            "lead_time": ("time", lead, {"long_name": "forecast lead time", "units": unit}),
            "step": ("time", result.steps, {"long_name": "host model step", "units": "1"}),
            **grid,
        },
        attrs={
            "title": f"coupled forecast: host {host.name} + correction {args.model}",
            "source": "mecs forecast",
            "host": host.name,
            "host_spec": args.host,
            "host_dt": host.dt,
            "host_time_unit": unit,
            "correction": source.description,
            "init_time": str(t0),
            "members": n_m,
            **result.stats,
        },
    )
    write_output(out_ds, out, args.overwrite)
    print(
        f"forecast: {args.steps} steps x {n_m} members of {len(layout.fields)} fields with "
        f"{source.description}; degraded steps {result.degraded_steps}; wrote {out.resolve()}"
    )
    return 0


def _hindcast(args, host, out: Path, ds, source, layout, client, picks, x0) -> int:
    """Forecasts from each of ``picks`` (analysis indices), written as ``(init_time,
    lead_time, ...)``: the layout of a forecast archive, which ``mecs verify`` scores."""
    import numpy as np
    import xarray as xr

    from correction.timeunits import seconds_per

    result = forecast_or_none(host, x0, args.steps, source, args.output_every, client)
    if result is None:
        return 1
    n_i = result.states.shape[1]
    unit = getattr(host, "time_unit", None) or "hour"
    lead = result.steps * host.dt
    inits = ds["time"].values[picks]
    if inits.dtype.kind == "M":  # datetime analyses: leads as durations
        per = seconds_per(unit)
        if per is None:
            raise UsageError(
                "mecs forecast: datetime analyses need a host with a physical time unit"
            )
        lead = (np.asarray(lead) * per * 1e9).round().astype("timedelta64[ns]")
    data_vars = _per_field(layout, result.states, ds, ("init_time", "lead_time"))
    grid = {d: ds[d] for d in ds.coords if set(ds[d].dims) <= set(layout.sizes)}
    out_ds = xr.Dataset(
        data_vars,
        coords={"init_time": inits, "lead_time": lead, **grid},
        attrs={
            "title": f"hindcasts: host {host.name} + correction {args.model}",
            "source": "mecs forecast --hindcast",
            "host_spec": args.host,
            "host_dt": host.dt,
            "correction": source.description,
            "model_versions": sorted({int(v) for v in result.versions if v >= 0}),
        },
    )
    write_output(out_ds, out, args.overwrite)
    print(
        f"forecast: {n_i} hindcasts x {args.steps} steps with {source.description}; "
        f"wrote {out.resolve()}"
    )
    return 0
