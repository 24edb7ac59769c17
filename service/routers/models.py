"""Model metadata, readiness and ``infer`` (inference scope).

``infer`` reads the raw body and decodes it with :mod:`service.protocol` (JSON or
the binary tensor extension), validates it against the model (input names,
shape, dtype, finiteness), hands the state to the model version's batch queue
and answers the correction in the request's datatype and transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from ..auth import InferenceScope
from ..errors import ServiceError
from ..protocol import (
    DATATYPES,
    DTYPE_NAMES,
    ProtocolError,
    encode_message_parts,
    parse_infer_request,
)
from ..repository import LoadedModel
from ..schemas import ERRORS, InferResponseDoc, ModelMetadata
from .checks import reject, request_parameters, time_scale_for, validate_inputs
from .params import parse_version

log = logging.getLogger("mecs.service")

router = APIRouter(prefix="/v2/models", tags=["models"], responses=ERRORS)


async def infer(request: Request, name: str, _: InferenceScope) -> Response:
    """Correction for a batch of states with the model's default version."""
    return await infer_handler(request, name, None)


async def infer_version(request: Request, name: str, version: str, _: InferenceScope) -> Response:
    """Correction with a pinned version (loaded on first use)."""
    return await infer_handler(request, name, version)


# In the running service, ServiceMiddleware (service.app) hands these two paths straight
# to infer_handler, skipping FastAPI's routing and dependency solving on the hot path;
# the routes document them (OpenAPI) and serve them wherever that middleware is absent.
_INFER_DOC = {200: {"model": InferResponseDoc, "description": "the correction"}}
for _path, _endpoint in (
    ("/{name}/infer", infer),
    ("/{name}/versions/{version}/infer", infer_version),
):
    router.add_api_route(_path, _endpoint, methods=["POST"], responses=_INFER_DOC)


async def _metadata(request: Request, name: str, version: str | None) -> dict:
    repo = request.app.state.mecs.repository
    model = await repo.get(name, parse_version(version))
    return render_metadata(model, await repo.versions(name))


def render_metadata(model: LoadedModel, versions: list[int]) -> dict[str, Any]:
    """Open Inference Protocol model metadata, plus the model's variables and provenance."""
    layout = model.corrector.layout
    dt = DTYPE_NAMES[model.dtype]
    shape = [-1, *model.state_shape]
    inputs = [{"name": "state", "datatype": dt, "shape": shape}]
    if model.n_forcings:
        inputs.append({"name": "forcings", "datatype": dt, "shape": [-1, model.n_forcings]})
    config = model.corrector.config
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": "mecs_torch",
        "inputs": inputs,
        "outputs": [{"name": "correction", "datatype": dt, "shape": shape}],
        "version": model.version_str,
        "parameters": {
            "accepted_datatypes": ["FP32", "FP64"],
            "dims": ["batch", *layout.state_dims],
            # the packing, explicit: channels are the fields' levels in this order
            "layout": layout.to_dict(),
            "channels": layout.channel_names(),
            "variables": [
                {
                    "name": f,
                    "dims": list(layout.field_dims[f]),
                    "units": layout.units.get(f, "1"),
                }
                for f in layout.fields
            ],
            "correction": f"tendency correction, state units per {model.corrector.time_unit}",
            "time_unit": model.corrector.time_unit,
            "host_dt": model.corrector.host_dt,
            "network": config.get("network", {}).get("name"),
            "runtime": model.runtime.name,
            "training_mode": (config.get("training") or {}).get("mode"),
            "published_at": config.get("published_at"),
            "parent_version": config.get("parent_version"),
            "metrics": config.get("metrics"),
            "correction_cap_std": model.forward.guard.cap_std,
            "ood_threshold_std": model.forward.guard.ood_threshold_std,
        },
    }


@router.get("/{name}", response_model=ModelMetadata)
async def model_metadata(request: Request, name: str, _: InferenceScope) -> dict:
    """Inputs, outputs, shapes, datatypes, variables and the version served by default."""
    return await _metadata(request, name, None)


@router.get("/{name}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(
    request: Request, name: str, version: str, _: InferenceScope
) -> dict:
    """Metadata of one pinned version."""
    return await _metadata(request, name, version)


async def _ready(request: Request, name: str, version: str | None) -> dict:
    model = await request.app.state.mecs.repository.get(name, parse_version(version))
    return {"name": model.name, "version": model.version_str, "ready": True}


@router.get("/{name}/ready")
async def model_ready(request: Request, name: str, _: InferenceScope) -> dict:
    """200 when the model answers requests (404 unknown, 503 unloaded)."""
    return await _ready(request, name, None)


@router.get("/{name}/versions/{version}/ready")
async def model_version_ready(request: Request, name: str, version: str, _: InferenceScope):
    """200 when that version answers requests (it is loaded on demand)."""
    return await _ready(request, name, version)


async def _read_body(request: Request) -> bytes | bytearray:
    """The body as it came when it is one chunk; else gathered into one writable buffer.

    A large state arrives in many chunks. With a declared length they are copied,
    as they arrive, into one ``bytearray`` of that size (the body is held once,
    not as chunks plus a joined copy); without one (chunked encoding) they are
    joined at the end. Either way its tensors are writable numpy views, so
    validation does not copy them again.
    """
    expected = request.scope.get("mecs.content_length")
    chunks: list[bytes] = []
    buf = view = None
    at = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if view is None and expected and not chunks and len(chunk) < expected:
            buf = bytearray(expected)
            view = memoryview(buf)
        if view is not None:
            if at + len(chunk) > len(buf):
                raise ServiceError(400, f"request body longer than its Content-Length {expected}")
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        else:
            chunks.append(chunk)
    if view is not None:
        return buf if at == len(buf) else buf[:at]
    if len(chunks) <= 1:
        return chunks[0] if chunks else b""
    buf = bytearray(sum(len(c) for c in chunks))
    view, at = memoryview(buf), 0
    for c in chunks:
        view[at : at + len(c)] = c
        at += len(c)
    return buf


async def infer_handler(request: Request, name: str, version: str | None) -> Response:
    """Decode, validate, correct (through the batch queue) and encode one request."""
    t0 = time.perf_counter()
    state = request.app.state.mecs
    metrics = state.metrics
    model = await state.repository.get(name, parse_version(version))
    labels = (model.name, model.version_str)
    try:
        t_body = time.perf_counter()  # after resolving (maybe loading) the version
        body = await _read_body(request)
        t_read = time.perf_counter()
        req = parse_infer_request(body, request.headers.get("inference-header-content-length"))
        x, f = validate_inputs(model, req)
        extra, degraded = request_parameters(req)
        factor = time_scale_for(model, req.parameters, extra, state.settings.max_dt_ratio)
        binary = req.wants_binary("correction")
        json_limit = state.settings.max_json_body_bytes // 2
        if not binary and x.size > json_limit:
            raise reject(
                f"output 'correction' of {x.size} values is too large for JSON (at most "
                f"{json_limit}); ask for it with binary_data",
                "too_large",
            )
        t_decode = time.perf_counter()
        result = await model.correct(x, f, request.scope.get("mecs.ticket"))
    except ProtocolError as err:
        metrics.cached(metrics.rejected, model.name, err.reason).inc()
        metrics.infer_requests.labels(*labels, str(err.status)).inc()
        raise ServiceError(err.status, err.message) from None
    except ClientDisconnect:
        metrics.infer_requests.labels(*labels, "499").inc()
        raise
    except ServiceError as err:
        if err.status == 413:
            metrics.cached(metrics.rejected, model.name, "too_large").inc()
        elif err.status == 503:
            metrics.cached(metrics.overloaded, model.name).inc()
        metrics.infer_requests.labels(*labels, str(err.status)).inc()
        raise
    if degraded:
        metrics.cached(metrics.client_degraded, model.name).inc(degraded)
    n = x.shape[0]
    ood = result.out_of_distribution
    n_ood = int(ood.sum())
    n_capped = int(result.capped.sum())
    params = {
        "batch_size": result.batch_size,
        "out_of_distribution": n_ood > 0,
        "out_of_distribution_samples": (
            ",".join(map(str, np.flatnonzero(ood).tolist())) if n_ood else ""
        ),
        "capped_values": n_capped,
        **extra,
    }
    header = {"model_name": model.name, "model_version": model.version_str}
    if req.id is not None:
        header["id"] = req.id
    header["parameters"] = params
    corr = result.correction
    if factor != 1.0:  # per the caller's time unit
        corr = corr * factor
    want = DATATYPES[req.datatypes["state"]]
    if corr.dtype != want:
        with np.errstate(over="ignore", invalid="ignore"):
            corr = corr.astype(want)
    if not np.isfinite(corr).all():  # the model's fault, not the caller's: never a 200
        bad = np.flatnonzero(~np.isfinite(corr.reshape(n, -1)).all(axis=1))
        metrics.cached(metrics.nonfinite_outputs, *labels).inc()
        metrics.infer_requests.labels(*labels, "500").inc()
        log.error(
            "model '%s' version %s returned NaN or Inf corrections for samples %s of a "
            "finite input; answered 500",
            model.name,
            model.version_str,
            bad[:10].tolist(),
        )
        raise ServiceError(
            500,
            f"model '{model.name}' version {model.version_str} produced NaN or Inf "
            f"corrections (samples {bad[:10].tolist()}); reported to the operator",
        )
    if binary or corr.size <= _JSON_SLICE:
        parts, headers = encode_message_parts(header, [("correction", corr, binary)], "outputs")
    else:  # a large JSON answer is encoded in slices, letting other requests run between
        parts, headers = [await _json_in_slices(header, corr)], {"Content-Type": "application/json"}
    model.served.inc()
    model.samples.inc(n)
    if n_ood:
        metrics.cached(metrics.ood_samples, *labels).inc(n_ood)
        metrics.cached(metrics.ood_requests, *labels).inc()
    if n_capped:
        metrics.cached(metrics.capped, *labels).inc(n_capped)
    elapsed = time.perf_counter() - t0
    model.latency.observe(elapsed)
    # standard Server-Timing header (ms): lets a caller split its latency
    headers["Server-Timing"] = (
        f"read;dur={(t_read - t_body) * 1e3:.3f}, decode;dur={(t_decode - t_read) * 1e3:.3f}, "
        f"forward;dur={result.forward_s * 1e3:.3f}, total;dur={elapsed * 1e3:.3f}"
    )
    if len(parts) > 1 and len(parts[1]) > _JOIN_BELOW:
        return PartsResponse(parts, headers)
    return Response(b"".join(parts), headers=headers)


# JSON answers above this many values are encoded a slice at a time (~1 ms each)
_JSON_SLICE = 1 << 15
_MARK = "__mecs_data__"


async def _json_in_slices(header: dict[str, Any], corr: np.ndarray) -> bytes:
    """The JSON answer for ``corr``, yielding to the event loop between slices.

    ``json.dumps`` of a few million floats holds the interpreter for a second or
    more; in slices, ``/v2/health/live`` and small calls keep answering meanwhile.
    """
    header["outputs"] = [
        {
            "name": "correction",
            "datatype": DTYPE_NAMES[corr.dtype],
            "shape": list(corr.shape),
            "data": _MARK,
        }
    ]
    head, tail = json.dumps(header, separators=(",", ":")).split(f'"{_MARK}"')
    flat = corr.reshape(-1)
    out = [head.encode(), b"["]
    for i in range(0, flat.size, _JSON_SLICE):
        if i:
            out.append(b",")
            await asyncio.sleep(0)
        out.append(json.dumps(flat[i : i + _JSON_SLICE].tolist(), allow_nan=False)[1:-1].encode())
    out += [b"]", tail.encode()]
    return b"".join(out)


# Responses above this size go out as their parts (no copy of the tensor); below it,
# one joined buffer is one socket write instead of two, which is what small calls need.
_JOIN_BELOW = 1 << 16


class PartsResponse(Response):
    """A response sent as several buffers (``http.response.body`` messages) in order."""

    def __init__(self, parts: list, headers: dict[str, str], status_code: int = 200) -> None:
        self.parts = parts
        self.status_code = status_code
        self.background = None
        self.body = b""
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        length = sum(len(p) for p in parts)
        self.raw_headers.append((b"content-length", str(length).encode("latin-1")))

    async def __call__(self, scope, receive, send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
