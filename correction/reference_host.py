"""A reference host process for ``mecs-step/1``: Lorenz-96 in numpy, with fault switches.

``python -m correction.reference_host [--K 36] [--F 10] [--dt 0.01]`` is what a
host author's program looks like from mecs's side (read a request line and its
bytes, step, write the answer), and it is the host the tests and the
bring-your-own-model guide run as ``--host "process:python -m correction.reference_host"``.
It steps the same one-scale Lorenz-96 as the torch host ``l96`` (RK4, the same
formula), so a run through the process equals a run in process; ``--model grid``
steps a two-field toy on a lat/lon grid instead (:func:`grid_tendency`; its
``--dt`` is the step's length in ``--time-unit``, the toy's own step is fixed).

The fault switches make it misbehave at a chosen step (counted from 1, over
step requests): ``--crash-at N`` exits with status 3, ``--hang-at N`` stops
answering, ``--wrong-shape-at N`` answers one value short, ``--nan-at N`` answers
NaN, ``--error-at N`` answers a protocol error message.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .stepproto import (
    MAX_HEADER,
    PROTOCOL,
    StepProtocolError,
    parse_header,
    read_tensor,
    tensor_spec,
    write_message,
)


def l96_step(x: np.ndarray, forcing: float, dt: float) -> np.ndarray:
    """One RK4 step of dX_k/dt = X_{k-1}(X_{k+1} - X_{k-2}) - X_k + F, batched."""

    def f(v: np.ndarray) -> np.ndarray:
        return np.roll(v, 1, -1) * (np.roll(v, -1, -1) - np.roll(v, 2, -1)) - v + forcing

    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)


#: the two-field toy's channel means (two temperature levels in K, surface pressure in Pa)
GRID_MEAN = np.array([280.0, 250.0, 1.0e5]).reshape(3, 1, 1)


def grid_means(levels: int = 2, fields: int = 1) -> np.ndarray:
    """Channel means of a toy with ``fields`` fields on ``levels`` levels plus a surface
    pressure: ``fields * levels + 1`` channels, ``[C, 1, 1]``. The default is the
    two-field toy (:data:`GRID_MEAN`): temperature on two levels and pressure."""
    if (levels, fields) == (2, 1):
        return GRID_MEAN
    base = np.array([280.0, 10.0, 0.0, 0.008, 260.0])[np.arange(fields) % 5]
    per_level = (base[:, None] - np.outer(base > 100, np.arange(levels)) * 15.0).reshape(-1)
    return np.concatenate([per_level, [1.0e5]]).reshape(-1, 1, 1)


def grid_tendency(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """A toy on a periodic lat/lon grid: relaxation, zonal advection, diffusion.

    The state is ``[..., C, lat, lon]``: the fields' levels, then surface pressure
    (the default toy: temperature on two levels and pressure, ``C = 3``); the
    channel means follow from ``C`` (:func:`grid_means` with one field for three
    channels, otherwise inferred as ``fields * levels + 1``). A small nonlinear
    term couples the first two channels. ``bias`` (one value per channel) is the
    tendency a "truth" has and the host lacks.
    """
    c = x.shape[-3]
    mean = GRID_MEAN if c == 3 else _means_for(c)
    adv = -0.8 * (np.roll(x, -1, -1) - np.roll(x, 1, -1)) / 2
    lap = np.roll(x, 1, -1) + np.roll(x, -1, -1) + np.roll(x, 1, -2) + np.roll(x, -1, -2) - 4 * x
    mix = 0.05 * np.tanh((x[..., :1, :, :] - x[..., 1:2, :, :] - 30.0) / 10.0)
    out = -(x - mean) / 5.0 + adv + 0.2 * lap
    rest = np.zeros_like(x[..., 2:, :, :])
    out = out + np.concatenate([mix, -mix, rest], axis=-3)
    return out if bias is None else out + np.asarray(bias).reshape(c, 1, 1)


_TOY_SHAPES = {13: (3, 4)}  # channels -> (levels, fields): t, u, v, q on 3 levels + ps


def _means_for(channels: int) -> np.ndarray:
    levels, fields = _TOY_SHAPES.get(channels, (channels - 1, 1))
    return grid_means(levels, fields)


def grid_step(x: np.ndarray, dt: float = 0.1) -> np.ndarray:
    """One forward-Euler step of :func:`grid_tendency` (the host, without the bias)."""
    x = np.asarray(x, dtype=np.float64)
    return x + dt * grid_tendency(x)


def l96_step_default(x: np.ndarray) -> np.ndarray:
    """One step of the ``l96`` host's defaults (F = 10, dt = 0.01): a ``python:`` host."""
    return l96_step(np.asarray(x, dtype=np.float64), 10.0, 0.01)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["l96", "grid"], default="l96")
    p.add_argument("--channels", type=int, default=3, help="grid: fields x levels + 1")
    p.add_argument("--nlat", type=int, default=4, help="grid: latitudes")
    p.add_argument("--nlon", type=int, default=6, help="grid: longitudes")
    p.add_argument("--K", type=int, default=36)
    p.add_argument("--F", type=float, default=10.0)
    p.add_argument("--dt", type=float, default=0.01)
    p.add_argument("--time-unit", default="model time unit")
    p.add_argument("--name", default="l96-reference")
    for fault in ("crash", "hang", "wrong-shape", "nan", "error"):
        p.add_argument(f"--{fault}-at", type=int, default=0, metavar="N")
    args = p.parse_args(argv)
    src, out = sys.stdin.buffer, sys.stdout.buffer
    write_message(
        out,
        {
            "protocol": PROTOCOL,
            "name": args.name,
            "state_shape": [args.K]
            if args.model == "l96"
            else [args.channels, args.nlat, args.nlon],
            "dtype": "FP64",
            "dt": args.dt,
            "time_unit": args.time_unit,
        },
    )
    n = 0
    while True:
        line = src.readline(MAX_HEADER)
        if not line:
            return 0  # mecs went away: nothing to do
        header = parse_header(line, "request")
        if header.get("op") == "close":
            return 0
        if header.get("op") != "step":
            raise StepProtocolError(f"unknown op {header.get('op')!r}")
        shape, dtype = tensor_spec(header, "step request")
        x = read_tensor(src, shape, dtype).astype(np.float64)
        n += 1
        rid = header.get("id")
        if n == args.crash_at:
            print(f"reference host: crashing at step {n} as asked", file=sys.stderr, flush=True)
            return 3
        if n == args.hang_at:
            print(f"reference host: hanging at step {n} as asked", file=sys.stderr, flush=True)
            time.sleep(3600)
        if n == args.error_at:
            write_message(out, {"id": rid, "error": f"cannot step: fault switch at step {n}"})
            continue
        for _ in range(int(header.get("steps", 1))):
            x = l96_step(x, args.F, args.dt) if args.model == "l96" else grid_step(x)
        if n == args.nan_at:
            x[..., 0] = np.nan
        if n == args.wrong_shape_at:
            x = x[..., :-1]
        y = x.astype(dtype)
        write_message(out, {"id": rid, "shape": list(y.shape), "datatype": header["datatype"]}, y)


if __name__ == "__main__":
    sys.exit(main())
