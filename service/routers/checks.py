"""Checking an infer request against its model: inputs, dtype range, time units, parameters.

Separate from the router so that what the service accepts, and why it refuses the
rest, reads in one place. Every refusal is a :class:`ProtocolError` naming the
input, parameter or value at fault; ``reason`` labels ``mecs_rejected_inputs_total``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from correction.timeunits import MODEL_UNIT, TimeUnitError, canonical_unit
from correction.timeunits import scale as time_scale

from ..protocol import (
    DATATYPES,
    MAX_DEGRADED_STEPS_PER_CALL,
    ProtocolError,
    RequestHeader,
    TensorSpec,
    parse_request_header,
    payload_mismatch,
)
from ..repository import LoadedModel


def reject(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, reason)


class InferPlan:
    """One request header checked against one model version, kept for the next call.

    A forecast model sends the same header every timestep (same shapes, datatypes,
    parameters), so everything that follows from the header alone is worked out
    once: which inputs there are and where their bytes lie, the shape checks, the
    request parameters, the time-unit factor, and the answer's JSON header for
    each batch size. Per call only the values are checked (finite, in the model's
    range) and the forward runs. A plan holds nothing of a request's data.
    """

    __slots__ = (
        "state",
        "forcings",
        "output",
        "extra",
        "degraded",
        "factor",
        "binary",
        "want",
        "id",
        "payload_size",
        "heads",
        "regions",
        "group",
        "valid_time",
    )

    def __init__(
        self, model: LoadedModel, header: RequestHeader, max_dt_ratio: float, json_limit: int
    ):
        allowed = {"state", "forcings"} if model.n_forcings else {"state"}
        specs = {t.name: t for t in header.inputs}
        for name in specs:
            if name not in allowed:
                raise reject(
                    f"unknown input '{name}'; model '{model.name}' takes {sorted(allowed)}",
                    "bad_request",
                )
        state = specs.get("state")
        if state is None:
            raise reject(f"input 'state' is missing (model '{model.name}')", "bad_request")
        want = model.state_shape
        shape = state.shape
        if len(shape) != len(want) + 1 or shape[1:] != want or shape[0] < 1:
            dims = ", ".join(model.corrector.layout.state_dims)
            raise reject(
                f"input 'state' has shape {list(shape)}; model '{model.name}' version "
                f"{model.version} expects [batch, {', '.join(map(str, want))}] with batch >= 1 "
                f"(dims: batch, {dims})",
                "shape",
            )
        forcings = specs.get("forcings")
        if model.n_forcings:
            if forcings is None:
                raise reject(f"input 'forcings' [batch, {model.n_forcings}] is missing", "shape")
            if forcings.shape != (shape[0], model.n_forcings):
                raise reject(
                    f"input 'forcings' has shape {list(forcings.shape)}, expected "
                    f"[{shape[0]}, {model.n_forcings}]",
                    "shape",
                )
        self.state, self.forcings = state, forcings
        self.extra, self.degraded = request_parameters(header)
        self.group = group_of(header.parameters, model.name)
        self.valid_time = valid_time_of(header.parameters)
        self.factor = time_scale_for(model, header.parameters, self.extra, max_dt_ratio)
        self.output = next((o for o in header.outputs if o.name == "correction"), None)
        self.want = DATATYPES[state.datatype]
        out = self.output
        if out is not None and out.region is not None:
            nbytes = math.prod(shape) * self.want.itemsize
            if out.size != nbytes:
                raise reject(
                    f"output 'correction': [{', '.join(map(str, shape))}] {state.datatype} "
                    f"needs {nbytes} bytes but shared_memory_byte_size is {out.size}",
                    "shape",
                )
        self.binary = header.binary_default or (out is not None and out.binary)
        values = math.prod(shape)
        if not self.binary and (out is None or out.region is None) and values > json_limit:
            raise reject(
                f"output 'correction' of {values} values is too large for JSON (at most "
                f"{json_limit}); ask for it with binary_data",
                "too_large",
            )
        self.id = header.id
        self.payload_size = header.payload_size
        self.regions = any(t.region is not None for t in header.inputs) or (
            out is not None and out.region is not None
        )
        # the answer's JSON header by batch size, for calls with nothing flagged or capped
        self.heads: dict[int, bytes] = {}

    def arrays(
        self,
        model: LoadedModel,
        payload: memoryview,
        region: Callable[[TensorSpec, bool], memoryview] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
        """The state (and forcings) of one call, checked, in the model's dtype, and the
        state's min and max (from its finite check; the guardrails reuse them)."""
        if len(payload) != self.payload_size:
            raise ProtocolError(payload_mismatch(self.payload_size, len(payload)))
        x = _tensor(self.state, payload, region)
        x, bounds = in_model_dtype(model, "state", x)
        if not x.flags.writeable:
            x = x.copy()
        f = None
        if self.forcings is not None:
            f = np.array(
                in_model_dtype(model, "forcings", _tensor(self.forcings, payload, region))[0]
            )
        return x, f, bounds


def _tensor(spec: TensorSpec, payload: memoryview, region) -> np.ndarray:
    if spec.data is not None:
        return spec.data
    dtype = DATATYPES[spec.datatype]
    if spec.region is not None:
        if region is None:
            raise reject(f"input '{spec.name}': shared memory is not available here", "bad_request")
        buf = region(spec, False)
        return np.frombuffer(buf, dtype, spec.size // dtype.itemsize).reshape(spec.shape)
    arr = np.frombuffer(payload, dtype, spec.size // dtype.itemsize, spec.offset)
    return arr.reshape(spec.shape)


def plan_for(
    model: LoadedModel, header_bytes: bytes | None, header: RequestHeader | None, settings
) -> InferPlan:
    """The plan of a binary request's header, from the model's cache when seen before."""
    plans = model.plans
    if header_bytes is not None:
        plan = plans.get(header_bytes)
        if plan is not None:
            return plan
        header = parse_request_header(header_bytes)
    plan = InferPlan(model, header, settings.max_dt_ratio, settings.max_json_body_bytes // 2)
    if header_bytes is not None and header.cacheable:
        if len(plans) >= PLAN_CACHE_SIZE:  # oldest first: dicts keep insertion order
            del plans[next(iter(plans))]
        plans[header_bytes] = plan
    return plan


#: request headers remembered per model version (a caller varying its ``id`` per call
#: cycles through them; one with a fixed header hits the same entry every step)
PLAN_CACHE_SIZE = 256


def in_model_dtype(
    model: LoadedModel, name: str, arr: np.ndarray
) -> tuple[np.ndarray, tuple[float, float]]:
    """``arr`` as a contiguous array in the model's dtype, every value finite in it,
    and its min and max.

    The check runs on the cast array, where it matters: an FP64 value above float32's
    largest (3.4e38) is finite in the request but infinite in a float32 model, and
    its correction would come back NaN. Casting first and checking once costs no
    more than checking the input. The check is the min and the max (a NaN makes both
    NaN, an Inf one of them infinite): the guardrails' OOD test needs exactly those,
    so a state is passed over twice in all, not three times.
    """
    if arr.dtype == model.dtype:
        out = np.ascontiguousarray(arr)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr, dtype=model.dtype)
    lo, hi = out.min(), out.max()
    if math.isfinite(lo) and math.isfinite(hi):
        return out, (lo, hi)
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


def group_of(params: dict, model_name: str) -> tuple[str, int] | None:
    """``(group, group_size)`` of a request of a timestep group, or None.

    Callers stepping in lockstep (ensemble members, MPI ranks) name their run in
    ``group`` and say how many of them send each step in ``group_size``; the batch
    queue releases their batch when all have arrived.
    """
    group, size = params.get("group"), params.get("group_size")
    if group is None and size is None:
        return None
    if not isinstance(group, str) or not group or len(group) > 256:
        raise reject(
            f"parameter 'group' must be a string of 1 to 256 characters naming the run, "
            f"sent with 'group_size'; got {group!r}",
            "bad_request",
        )
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_GROUP_SIZE:
        raise reject(
            f"parameter 'group_size' must be an integer from 1 to {MAX_GROUP_SIZE} (the "
            f"callers that send each step of group {group!r}); got {size!r}",
            "bad_request",
        )
    return group, size


def valid_time_of(params: dict) -> str | None:
    """The request's ``valid_time`` (the time of the states sent: a number in the
    host's time axis or an ISO 8601 time), kept only to record samples for
    ``mecs monitor``; None when not sent."""
    value = params.get("valid_time")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise reject(
            f"parameter 'valid_time' must be a number or an ISO 8601 time, got {value!r}",
            "bad_request",
        )
    text = str(value)
    if not 0 < len(text) <= 64 or (isinstance(value, float) and not math.isfinite(value)):
        raise reject(f"parameter 'valid_time' {text[:70]!r} is not a time", "bad_request")
    return text


#: the most callers one timestep group may declare
MAX_GROUP_SIZE = 65536


def request_parameters(req: RequestHeader) -> tuple[dict, int]:
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
    for spec in req.outputs:
        if spec.name != "correction":
            raise reject(
                f"unknown output '{spec.name}'; this model returns 'correction'", "bad_request"
            )
    return out, degraded
