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
import math
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from ..auth import InferenceScope
from ..errors import ServiceError
from ..protocol import (
    DTYPE_NAMES,
    HEADER_LENGTH,
    ProtocolError,
    encode_message_parts,
    parse_request_header,
    split_body,
)
from ..repository import LoadedModel
from ..schemas import ERRORS, InferResponseDoc, ModelMetadata
from .checks import plan_for
from .params import parse_version

log = logging.getLogger("mecs.service")

router = APIRouter(prefix="/v2/models", tags=["models"], responses=ERRORS)


async def infer(request: Request, name: str, _: InferenceScope) -> Response:
    """Correction for a batch of states with the model's default version."""
    return await infer_handler(request, name, None)


async def infer_version(request: Request, name: str, version: str, _: InferenceScope) -> Response:
    """Correction with a pinned version (loaded on first use)."""
    return await infer_handler(request, name, version)


# In the running service, ServiceMiddleware (service.middleware) hands these two paths straight
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
    slot = repo.slots.get(name)
    book = slot.book if slot is not None else None
    records = [r for r in (book.records if book else []) if r.get("version") == model.version]
    return render_metadata(model, await repo.versions(name), records)


def render_metadata(
    model: LoadedModel, versions: list[int], records: list[dict] | None = None
) -> dict[str, Any]:
    """Open Inference Protocol model metadata, plus the model's variables and provenance
    (its parent, its stage and its promotion records: the version's lineage)."""
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
            "stage": model.stage,
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
            "parent_version": (config.get("parent") or {}).get("version"),
            "promotions": [
                {
                    k: r.get(k)
                    for k in ("decision", "previous_production", "by", "at", "reason")
                    if r.get(k) is not None
                }
                | ({"ratio": r["scores"]["ratio"]} if "scores" in r else {})
                for r in records or []
            ],
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


async def read_body(receive, expected: int | None) -> bytes | bytearray:
    """The body as it came when it is one chunk; else gathered into one writable buffer.

    A large state arrives in many chunks. With a declared length they are copied,
    as they arrive, into one ``bytearray`` of that size (the body is held once,
    not as chunks plus a joined copy); without one (chunked encoding) they are
    joined at the end. Either way its tensors are writable numpy views, so
    validation does not copy them again.
    """
    chunks: list[bytes] = []
    buf = view = None
    at = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            if view is None and expected and not chunks and len(chunk) < expected:
                buf = bytearray(expected)
                view = memoryview(buf)
            if view is not None:
                if at + len(chunk) > len(buf):
                    raise ServiceError(
                        400, f"request body longer than its Content-Length {expected}"
                    )
                view[at : at + len(chunk)] = chunk
                at += len(chunk)
            else:
                chunks.append(chunk)
        if not message.get("more_body", False):
            break
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
    """The route's entry: the same handler as the middleware's hot path."""
    scope = request.scope
    if "mecs.header_length" not in scope:  # served without ServiceMiddleware
        scope["mecs.header_length"] = request.headers.get("inference-header-content-length")
        length = request.headers.get("content-length")
        scope["mecs.content_length"] = int(length) if length and length.isdigit() else None
    return await handle_infer(request.app.state.mecs, scope, request.receive, name, version)


#: JSON bodies up to this size are looked up in the plan cache (a shared-memory call's
#: body is a few hundred bytes; one with inline values is never cached)
_JSON_PLAN_BYTES = 4096


async def handle_infer(state, scope, receive, name: str, version: str | None) -> Response:
    """Decode, validate, correct (through the batch queue) and encode one request.

    The lean path: ``scope`` carries what the middleware read from the headers
    (``mecs.header_length``, ``mecs.content_length``, ``mecs.principal``). A binary
    request's JSON header is looked up in the model's plan cache, so a caller
    repeating its header pays for the checks of its values only.
    """
    t0 = time.perf_counter()
    metrics = state.metrics
    model = await state.repository.get(name, parse_version(version))
    labels = (model.name, model.version_str)
    try:
        t_body = time.perf_counter()  # after resolving (maybe loading) the version
        body = await read_body(receive, scope.get("mecs.content_length"))
        t_read = time.perf_counter()
        hlen = scope.get("mecs.header_length")
        head, payload = split_body(body, hlen)
        if hlen is not None:
            plan = plan_for(model, head, None, state.settings)
        elif len(head) <= _JSON_PLAN_BYTES:
            # a small JSON body (one that names shared-memory regions: no inline values)
            # is its own header, cached like a binary one
            plan = plan_for(model, bytes(head), None, state.settings)
        else:
            plan = plan_for(model, None, parse_request_header(head), state.settings)
        region = target = into = None
        out = plan.output
        if plan.regions:
            region = state.shared_memory.resolver(scope.get("mecs.principal"))
        x, f, bounds = plan.arrays(model, payload, region)
        if out is not None and out.region is not None:
            # the output region, checked before the forward; when the caller wants the
            # model's own dtype and unit the forward writes straight into it
            target = region(out, True)
            if plan.want == model.dtype and plan.factor == 1.0:
                into = np.frombuffer(target, model.dtype, x.size).reshape(x.shape)
                if np.may_share_memory(into, x):  # an output over its own input: copied
                    into = None
        t_decode = time.perf_counter()
        result = await model.correct(x, f, scope.get("mecs.ticket"), plan.group, into, bounds)
        t_back = time.perf_counter()
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
    if plan.degraded:
        metrics.cached(metrics.client_degraded, model.name).inc(plan.degraded)
    n = x.shape[0]
    ood = result.out_of_distribution
    n_ood = int(np.count_nonzero(ood))
    n_capped = int(np.add.reduce(result.capped)) if n_ood or result.capped.any() else 0
    corr = result.correction
    if plan.factor != 1.0:  # per the caller's time unit
        corr = corr * plan.factor
    if corr.dtype != plan.want:
        with np.errstate(over="ignore", invalid="ignore"):
            corr = corr.astype(plan.want)
    # the guardrails' min/max already showed the model's output finite unless a cast
    # or the caller's time unit changed it since
    if not (result.finite and corr is result.correction) and (
        not math.isfinite(np.add.reduce(corr, axis=None)) and not np.isfinite(corr).all()
    ):
        _nonfinite(metrics, model, labels, corr, n)  # the model's fault: never a 200
    if target is not None:
        if not (result.into and corr is result.correction):
            np.frombuffer(target, corr.dtype, corr.size).reshape(corr.shape)[...] = corr
        head = _head(plan, model, result.batch_size, ood, n_ood, n_capped, corr, True)
        parts, headers = [head], {"Content-Type": "application/json"}
    elif plan.binary and not n_ood and not n_capped:
        head = _head(plan, model, result.batch_size, ood, 0, 0, corr, False)
        parts = [head, memoryview(np.ascontiguousarray(corr)).cast("B")]
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    elif plan.binary or corr.size <= _JSON_SLICE:
        parts, headers = _answer(plan, model, result.batch_size, ood, n_ood, n_capped, corr, False)
    else:  # a large JSON answer is encoded in slices, letting other requests run between
        header = _response_header(plan, model, result.batch_size, ood, n_ood, n_capped)
        parts, headers = [await _json_in_slices(header, corr)], {"Content-Type": "application/json"}
    if state.shadow is not None and version is None:
        candidate = state.repository.shadow_of(model.name)
        if candidate is not None and candidate is not model:
            state.shadow.offer(candidate, x, f, result.correction)
    if state.recorder is not None:
        state.recorder.offer(model, x, result.correction, plan.valid_time, ood)
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
        f"queue;dur={(t_back - t_decode - result.forward_s) * 1e3:.3f}, "
        f"forward;dur={result.forward_s * 1e3:.3f}, total;dur={elapsed * 1e3:.3f}"
    )
    if len(parts) > 1 and len(parts[1]) > _JOIN_BELOW:
        return PartsResponse(parts, headers)
    return PartsResponse([b"".join(parts)], headers)


def _response_header(plan, model, batch_size, ood, n_ood, n_capped) -> dict[str, Any]:
    params = {
        "batch_size": batch_size,
        "out_of_distribution": n_ood > 0,
        "out_of_distribution_samples": (
            ",".join(map(str, np.flatnonzero(ood).tolist())) if n_ood else ""
        ),
        "capped_values": n_capped,
        **plan.extra,
    }
    params["model_stage"] = model.stage
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.version_str}
    if plan.id is not None:
        header["id"] = plan.id
    header["parameters"] = params
    return header


def _head(plan, model, batch_size, ood, n_ood, n_capped, corr, in_region) -> bytes:
    """The answer's JSON header. With nothing flagged or capped it depends only on the
    plan and the batch size, so it is built once: a forecast repeating its request gets
    the same bytes every step (a promotion clears them, see ``LoadedModel.set_stage``)."""
    if n_ood or n_capped:
        return _answer(plan, model, batch_size, ood, n_ood, n_capped, corr, in_region)[0][0]
    head = plan.heads.get(batch_size)
    if head is None:
        head = _answer(plan, model, batch_size, ood, 0, 0, corr, in_region)[0][0]
        if len(plan.heads) < 256:
            plan.heads[batch_size] = head
    return head


def _answer(plan, model, batch_size, ood, n_ood, n_capped, corr, in_region):
    """The answer's parts and headers (the JSON header, then the tensor if binary)."""
    header = _response_header(plan, model, batch_size, ood, n_ood, n_capped)
    if in_region:  # the values are in the caller's region: the answer says where
        out = plan.output
        header["outputs"] = [
            {
                "name": "correction",
                "datatype": DTYPE_NAMES[corr.dtype],
                "shape": list(corr.shape),
                "parameters": {
                    "shared_memory_region": out.region,
                    "shared_memory_byte_size": out.size,
                    "shared_memory_offset": out.region_offset,
                },
            }
        ]
        text = json.dumps(header, separators=(",", ":")).encode()
        return [text], {"Content-Type": "application/json"}
    return encode_message_parts(header, [("correction", corr, plan.binary)], "outputs")


def _nonfinite(metrics, model, labels, corr, n) -> None:
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
