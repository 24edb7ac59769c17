"""``mecs forecast``: run the host model with the correction applied at every step.

The correction comes from the service (``--service URL``; the API key, if the
service needs one, from the environment variable ``MECS_API_KEY``, never from the
command line) or from a model repository in this process (``--repository DIR``).
The ensemble is the analysis at ``--init-time`` (member 0, the control) plus
``members - 1`` copies perturbed with independent Gaussian noise of std
``--perturbation`` (state units). The store is written atomically.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

from mecs.cli import UsageError

DEFAULT_PERTURBATION = 0.1  # about the observation noise of the l96-2s benchmark


def _parse_host_params(items: list[str]) -> dict:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"mecs forecast: --host-param must be KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _open_init(path: Path):
    """The analyses to start from: a zarr store, a netCDF file or a glob of them."""
    from data_pipeline.increments import InputError, open_input
    from data_pipeline.increments.base import TIME

    text = str(path)
    if not any(c in text for c in "*?[") and not path.exists():
        raise UsageError(f"mecs forecast: --init {path} does not exist")
    try:
        ds, _ = open_input(text, "--init", TIME)
    except InputError as err:  # any unreadable store: one line, exit 2
        raise UsageError(f"mecs forecast: {' '.join(str(err).split())}") from None
    return ds


def _initial_state(ds, variable: dict, init_time: float | None, host_shape) -> tuple:
    import numpy as np

    name, dims = variable["name"], list(variable["dims"])
    if name not in ds:
        raise UsageError(f"mecs forecast: --init has no variable '{name}' (the model's field)")
    var = ds[name]
    if "time" not in var.dims or set(var.dims) != {"time", *dims}:
        raise UsageError(
            f"mecs forecast: variable '{name}' has dims {var.dims}, expected "
            f"('time', {', '.join(repr(d) for d in dims)})"
        )
    times = np.asarray(ds["time"].values)
    if init_time is None:  # the test period's first analysis, else the last one
        start = ds.attrs.get("test_start")
        i = len(times) - 1
        if start is not None:
            i = min(int(np.searchsorted(times, float(start) - 1e-9)), len(times) - 1)
    else:
        i = int(np.argmin(np.abs(times - init_time)))
        spacing = float(np.min(np.diff(times))) if len(times) > 1 else 0.0
        if abs(float(times[i]) - init_time) > max(0.5 * spacing, 1e-9):
            raise UsageError(
                f"mecs forecast: no analysis at --init-time {init_time} "
                f"(times {times[0]:g} to {times[-1]:g})"
            )
    state = var.isel(time=i).transpose(*dims).values.astype(np.float64)
    if tuple(state.shape) != tuple(host_shape):
        raise UsageError(
            f"mecs forecast: state shape {list(state.shape)} does not match the "
            f"host's {list(host_shape)}"
        )
    if not np.isfinite(state).all():
        raise UsageError(f"mecs forecast: analysis at time {times[i]:g} has NaN or Inf values")
    coords = {d: ds[d].values for d in dims if d in ds.coords}
    return state, float(times[i]), var.attrs, coords


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.members < 1 or args.output_every < 1:
        raise UsageError("mecs forecast: --steps, --members and --output-every must be >= 1")
    if args.perturbation < 0:
        raise UsageError("mecs forecast: --perturbation must be >= 0")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"mecs forecast: {out} exists; pass --overwrite to replace it")
    from correction.hosts.process import HostProcessError
    from correction.hosts.specs import close_host

    from ._common import make_named_host
    from .forecast_fields import model_state_shape

    host = make_named_host(
        args.host,
        _parse_host_params(args.host_param),
        state_shape=model_state_shape(args) if _is_python_host(args.host) else None,
        dt=args.host_dt,
        timeout_s=args.host_timeout,
    )
    try:
        return _run(args, host, out)
    except HostProcessError as err:  # nothing was written
        print(f"error: mecs forecast: {err}", file=sys.stderr)
        return 1
    finally:
        close_host(host)


def _is_python_host(spec: str) -> bool:
    """A ``python:`` host cannot say its state shape; the model's is used."""
    from correction.hosts.specs import HostSpecError, parse_host_spec

    try:
        return parse_host_spec(spec).kind == "python"
    except HostSpecError:
        return False  # make_named_host reports it


def _run(args: argparse.Namespace, host, out: Path) -> int:
    import numpy as np
    import xarray as xr

    from correction.guardrails import GuardedCorrection
    from service.remote import RemoteCorrection

    from .forecast_fields import forecast_or_none, layout_of, run_fields, write_output

    ds = _open_init(Path(args.init))
    client = None
    if args.service:
        from service.client import CorrectionClient, ServiceError

        try:
            client = CorrectionClient(
                args.service,
                args.model,
                version=args.version,
                api_key=os.environ.get("MECS_API_KEY") or None,
                timeout=args.timeout,
                retries=args.retries,
                degrade=args.degrade,
                dt_unit=getattr(host, "time_unit", None),
            )
            source = RemoteCorrection(client, dt=host.dt)
            variables = source.variables()
        except (ValueError, ServiceError) as err:
            raise UsageError(f"mecs forecast: service {args.service}: {err}") from None
    else:
        from correction.artifacts import ArtifactError
        from correction.inference import Corrector

        try:
            corrector = Corrector.load(args.repository, args.model, args.version)
        except ArtifactError as err:
            raise UsageError(f"mecs forecast: {err}") from None
        source = GuardedCorrection(
            corrector,
            cap_std=args.cap_std or None,
            ood_threshold_std=args.ood_std,
            runtime=args.runtime,
        )
        host_unit = getattr(host, "time_unit", None)
        if host_unit is not None:  # corrections per the host's unit, or a clear refusal
            from correction.timeunits import TimeUnitError, scale

            try:
                source.time_scale = scale(corrector.time_unit, host_unit)
            except TimeUnitError as err:
                raise UsageError(
                    f"mecs forecast: the host steps in {host_unit}s, the model's corrections "
                    f"are per {corrector.time_unit}: {err}"
                ) from None
        variables = source.variables()
    if len(variables) != 1:  # several fields: stacked in the model's layout
        return run_fields(args, host, out, ds, source, layout_of(source, client), client)
    try:
        init_time = None if args.init_time is None else float(args.init_time)
    except ValueError:
        raise UsageError(f"mecs forecast: --init-time {args.init_time!r} is not a number") from None
    x, t0, var_attrs, coords = _initial_state(ds, variables[0], init_time, host.state_shape)
    rng = np.random.default_rng(args.seed)
    x0 = np.repeat(x[None], args.members, axis=0)
    if args.members > 1:
        x0[1:] += args.perturbation * rng.standard_normal(x0[1:].shape)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="forecast", unit="step", mininterval=0.5)
    try:
        result = forecast_or_none(
            host,
            x0,
            args.steps,
            source,
            args.output_every,
            client,
            progress=(lambda n: bar.update(1)) if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
    if result is None:
        return 1

    name = variables[0]["name"]
    dims = list(variables[0]["dims"])
    lead = result.steps * host.dt
    stats = result.stats
    attrs = {
        "Conventions": "CF-1.10",
        "title": f"coupled forecast: host {host.name} + correction {args.model}",
        "source": "mecs forecast",
        "host": host.name,
        "host_spec": args.host,
        "host_dt": host.dt,
        "correction": source.description,
        "model": args.model,
        "model_versions": sorted({int(v) for v in result.versions if v >= 0}),
        "init_store": str(Path(args.init).resolve()),
        "init_time": t0,
        "members": args.members,
        "member_0": "control (unperturbed analysis)",
        "perturbation_std": args.perturbation,
        "seed": args.seed,
        "steps": args.steps,
        "degrade_policy": args.degrade if args.service else "n/a (in-process)",
        **stats,
    }
    data = result.states.transpose(1, 0, *range(2, result.states.ndim)).astype(np.float32)
    out_ds = xr.Dataset(
        {
            name: (
                ("member", "time", *dims),
                data,
                {**var_attrs, "long_name": f"corrected forecast of {name}"},
            ),
            "model_version": (
                "time",
                result.versions.astype(np.int32),
                {"long_name": "correction model version in use", "units": "1"},
            ),
        },
        coords={
            "member": ("member", np.arange(args.members), {"long_name": "ensemble member"}),
            "time": ("time", t0 + lead, {"long_name": "model time", "units": "1"}),
            "lead_time": ("time", lead, {"long_name": "forecast lead time", "units": "1"}),
            "step": ("time", result.steps, {"long_name": "host model step", "units": "1"}),
            **{d: (d, v) for d, v in coords.items()},
        },
        attrs=attrs,
    )
    write_output(out_ds, out, args.overwrite)
    print(
        f"forecast: {args.steps} steps x {args.members} members with {source.description} "
        f"in {result.wall_time_s:.2f} s; correction latency p50 "
        f"{stats['correction_latency_p50_us']:.0f} us, p99 {stats['correction_latency_p99_us']:.0f}"
        f" us; degraded steps {result.degraded_steps}; wrote {out.resolve()}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ._common import add_host_options

    p = sub.add_parser("forecast", help="run the host model with the correction every step")
    add_host_options(p, required=True)
    p.add_argument(
        "--host-param",
        action="append",
        metavar="KEY=VALUE",
        help="host parameter, e.g. F=10 (repeatable)",
    )
    p.add_argument("--init", required=True, help="analyses store (zarr dir or netCDF file)")
    p.add_argument(
        "--init-time",
        default=None,
        help="analysis time to start from (default: the store's test_start, else its last time)",
    )
    p.add_argument("--steps", type=int, required=True, help="host model steps")
    p.add_argument(
        "--hindcast",
        action="store_true",
        help="one forecast from every analysis from --init-time on (several-field models), "
        "written as (init_time, lead_time, ...) for mecs verify",
    )
    p.add_argument("--init-every", type=int, default=1, help="with --hindcast: every Nth analysis")
    p.add_argument("--members", type=int, default=1, help="ensemble size (member 0 = control)")
    p.add_argument(
        "--perturbation",
        type=float,
        default=DEFAULT_PERTURBATION,
        help="std of the Gaussian initial perturbations (state units)",
    )
    p.add_argument("--seed", type=int, default=0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--service", help="correction service URL (key from $MECS_API_KEY)")
    src.add_argument("--repository", help="model repository for in-process corrections")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--version", type=int, default=None, help="pin a model version")
    p.add_argument("--out", default="forecast.zarr", help="output zarr store")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--output-every", type=int, default=1, help="keep every Nth step")
    # defaults are the client's and the service's own (one place each)
    from service.client import POLICIES, CorrectionClient
    from service.settings import ServiceSettings

    client = inspect.signature(CorrectionClient).parameters
    service = ServiceSettings.model_fields
    p.add_argument(
        "--degrade",
        choices=list(POLICIES),
        default=client["degrade"].default,
        help="when the service fails: stop, use no correction, or reuse the last",
    )
    p.add_argument(
        "--timeout", type=float, default=client["timeout"].default, help="seconds per service call"
    )
    p.add_argument(
        "--retries", type=int, default=client["retries"].default, help="retries per service call"
    )
    p.add_argument(
        "--cap-std",
        type=float,
        default=service["correction_cap_std"].default,
        help="in-process only: magnitude cap in training stds (0: off), as the "
        "service's MECS_CORRECTION_CAP_STD",
    )
    p.add_argument(
        "--ood-std",
        type=float,
        default=service["ood_threshold_std"].default,
        help="in-process only: out-of-distribution threshold in training stds",
    )
    p.add_argument(
        "--runtime",
        default=service["runtime"].default,
        choices=list(service["runtime"].annotation.__args__),
        help="in-process only: inference runtime, as the service's "
        "MECS_RUNTIME (checked against eager at load, falls back)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
