"""Checking an infer request against its model: inputs, dtype range, time units, parameters.

Separate from the router so that what the service accepts, and why it refuses the
rest, reads in one place. Every refusal is a :class:`ProtocolError` naming the
input, parameter or value at fault; ``reason`` labels ``mecs_rejected_inputs_total``.
"""

from __future__ import annotations

import math

import numpy as np

from correction.timeunits import MODEL_UNIT, TimeUnitError, canonical_unit
from correction.timeunits import scale as time_scale

from ..protocol import MAX_DEGRADED_STEPS_PER_CALL, InferRequest, ProtocolError
from ..repository import LoadedModel


def reject(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, reason)


def validate_inputs(model: LoadedModel, req: InferRequest) -> tuple[np.ndarray, np.ndarray | None]:
    """The state (and forcings) as contiguous arrays in the model's dtype."""
    allowed = {"state", "forcings"} if model.n_forcings else {"state"}
    for name in req.inputs:
        if name not in allowed:
            raise reject(
                f"unknown input '{name}'; model '{model.name}' takes {sorted(allowed)}",
                "bad_request",
            )
    if "state" not in req.inputs:
        raise reject(f"input 'state' is missing (model '{model.name}')", "bad_request")
    x = req.inputs["state"]
    want = model.state_shape
    if x.ndim != len(want) + 1 or x.shape[1:] != want or x.shape[0] < 1:
        dims = ", ".join(model.corrector.layout.state_dims)
        raise reject(
            f"input 'state' has shape {list(x.shape)}; model '{model.name}' version "
            f"{model.version} expects [batch, {', '.join(map(str, want))}] with batch >= 1 "
            f"(dims: batch, {dims})",
            "shape",
        )
    f = req.inputs.get("forcings")
    if model.n_forcings:
        if f is None:
            raise reject(f"input 'forcings' [batch, {model.n_forcings}] is missing", "shape")
        if f.shape != (x.shape[0], model.n_forcings):
            raise reject(
                f"input 'forcings' has shape {list(f.shape)}, expected "
                f"[{x.shape[0]}, {model.n_forcings}]",
                "shape",
            )
    x = in_model_dtype(model, "state", x)
    if f is not None:
        f = np.array(in_model_dtype(model, "forcings", f))  # its own writable copy
    if not x.flags.writeable:
        x = x.copy()
    return x, f


def in_model_dtype(model: LoadedModel, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as a contiguous array in the model's dtype, every value finite in it.

    The check runs on the cast array, where it matters: an FP64 value above float32's
    largest (3.4e38) is finite in the request but infinite in a float32 model, and
    its correction would come back NaN. Casting first and checking once costs no
    more than checking the input.
    """
    if arr.dtype == model.dtype:
        out = np.ascontiguousarray(arr)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr, dtype=model.dtype)
    if np.isfinite(out).all():
        return out
    flat = out.reshape(out.shape[0], -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if np.isfinite(arr).all():
        first = int(bad[0])
        j = int(np.flatnonzero(~np.isfinite(flat[first]))[0])
        value = float(arr.reshape(arr.shape[0], -1)[first, j])
        limit = float(np.finfo(model.dtype).max)
        raise reject(
            f"input '{name}' holds values outside the range of the model's "
            f"{model.dtype.name} (|x| <= {limit:.7g}): {value!r} at sample {first}, "
            f"index {j} (samples {bad[:10].tolist()})",
            "range",
        )
    raise reject(f"input '{name}' contains NaN or Inf (samples {bad[:10].tolist()})", "nonfinite")


def time_scale_for(model: LoadedModel, params: dict, out: dict, max_ratio: float) -> float:
    """The factor from the model's correction unit to the caller's (``dt``, ``dt_unit``).

    A ``dt`` without a unit is the model's own unit only when that is a model time
    unit; a model trained per hour refuses it (a caller stepping in seconds would
    otherwise apply a correction 3,600 times too large). A ``dt`` that is more
    than ``max_ratio`` times larger or smaller than the host step the model was
    trained with is refused as a likely unit error.
    """
    unit = model.corrector.time_unit
    dt = params.get("dt")
    if dt is not None and (
        isinstance(dt, bool) or not isinstance(dt, int | float) or not math.isfinite(dt) or dt <= 0
    ):
        raise reject(f"parameter 'dt' must be a positive finite number, got {dt!r}", "bad_request")
    raw_unit = params.get("dt_unit")
    if raw_unit is None:
        if dt is not None and unit != MODEL_UNIT:
            raise reject(
                f"parameter 'dt' has no unit: model '{model.name}' gives corrections per "
                f"{unit}; send 'dt_unit' (s, min, h or day) with it",
                "units",
            )
        caller_unit, factor = unit, 1.0
    else:
        if not isinstance(raw_unit, str):
            raise reject("parameter 'dt_unit' must be a string such as 's' or 'h'", "units")
        try:
            caller_unit = canonical_unit(raw_unit)
            factor = time_scale(unit, caller_unit)
        except TimeUnitError as err:
            raise reject(f"parameter 'dt_unit': {err}", "units") from None
    host_dt = model.corrector.host_dt
    if dt is not None and host_dt and max_ratio:
        ratio = dt * factor / host_dt  # the caller's step in the model's unit
        if not 1 / max_ratio <= ratio <= max_ratio:
            raise reject(
                f"parameter 'dt' {dt:g} {caller_unit} is {ratio:.3g} times the host step "
                f"the model was trained with ({host_dt:g} {unit}); check its unit",
                "units",
            )
    if dt is not None:
        out["dt"] = dt
    out["time_unit"] = caller_unit
    return factor


def request_parameters(req: InferRequest) -> tuple[dict, int]:
    out: dict = {}
    params = req.parameters
    degraded = params.get("degraded_steps", 0)
    if (
        isinstance(degraded, bool)
        or not isinstance(degraded, int)
        or not 0 <= degraded <= MAX_DEGRADED_STEPS_PER_CALL
    ):
        # a bound, so one call (of any key) cannot move the fleet-wide counter by 2^40:
        # clients carry a longer outage over to their next calls
        raise reject(
            f"parameter 'degraded_steps' must be an integer from 0 to "
            f"{MAX_DEGRADED_STEPS_PER_CALL}, got {degraded!r}",
            "bad_request",
        )
    for name in req.outputs:
        if name != "correction":
            raise reject(f"unknown output '{name}'; this model returns 'correction'", "bad_request")
    return out, degraded
