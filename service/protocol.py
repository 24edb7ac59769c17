"""Open Inference Protocol (KServe v2) tensors, JSON and binary, without pydantic.

Shared by the server and :mod:`service.client`, so it imports only numpy and the
standard library (a host model's process need not have torch or FastAPI).

The binary tensor extension is the one Triton and KServe implement: the body is a
JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
little-endian tensor bytes, in input order, of every input whose parameters carry
``binary_data_size``. Outputs come back the same way when the request asks for
``"binary_data": true`` on an output or ``"binary_data_output": true`` overall.
The hot path parses with ``json.loads`` and ``numpy.frombuffer`` only: pydantic
validation of a 4 MB state costs seconds, this costs microseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_LOWER = HEADER_LENGTH.lower()
DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
DTYPE_NAMES = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64"}
MAX_RANK = 8
#: the most degraded steps one infer call may report (``parameters.degraded_steps``);
#: a client with more sends the rest with its next calls
MAX_DEGRADED_STEPS_PER_CALL = 1000


class ProtocolError(ValueError):
    """A request the protocol layer rejects; ``reason`` labels the rejection metric."""

    def __init__(self, message: str, reason: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status


@dataclass
class InferRequest:
    """A decoded infer request: named numpy tensors plus the protocol fields."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        return name in self.binary_outputs or self.binary_default


def loads_json(text: bytes | bytearray | memoryview | str, what: str) -> Any:
    """``json.loads`` whose every failure is a :class:`ProtocolError` naming ``what``.

    Deep nesting (``[[[[...]]]]`` a thousand levels down, anywhere in the document)
    makes the decoder raise ``RecursionError``; that is the client's fault like any
    other malformed body, so it is a 400 and never reaches the log as a traceback.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply to be decoded") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{what} is not valid JSON: {err}") from None


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or len(shape) > MAX_RANK:
        raise ProtocolError(
            f"input '{name}': 'shape' must be a list of 1 to {MAX_RANK} integers, got {shape!r}",
            "shape",
        )
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ProtocolError(
                f"input '{name}': shape {shape} has an entry that is not a non-negative integer",
                "shape",
            )
    return tuple(shape)


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass
class TensorSpec:
    """One input or output as the request header declares it.

    An input's values come from exactly one place: ``data`` (JSON values, decoded
    with the header), ``binary_data_size`` bytes at ``offset`` of the payload that
    follows the header, or a registered shared-memory region (``region``,
    ``region_offset``, ``size``).
    """

    name: str
    datatype: str = ""
    shape: tuple[int, ...] = ()
    offset: int = 0
    size: int = 0
    data: np.ndarray | None = None
    region: str | None = None
    region_offset: int = 0
    binary: bool = False


@dataclass
class RequestHeader:
    """An infer request's JSON header, checked; the tensors' bytes not yet read.

    Everything here follows from the header's bytes alone, so a server may keep it
    for the next request with the same header (``cacheable``: no JSON values inside,
    which would make every header unique).
    """

    inputs: list[TensorSpec]
    id: str | None
    parameters: dict[str, Any]
    outputs: list[TensorSpec]
    binary_default: bool
    payload_size: int
    cacheable: bool

    def to_request(self, payload: memoryview | bytes | bytearray) -> InferRequest:
        """The request with its binary inputs read from ``payload`` (no region inputs)."""
        if len(payload) != self.payload_size:
            raise ProtocolError(payload_mismatch(self.payload_size, len(payload)))
        inputs, datatypes = {}, {}
        for t in self.inputs:
            if t.region is not None:
                raise ProtocolError(
                    f"input '{t.name}' refers to shared-memory region '{t.region}', which "
                    "this endpoint does not read"
                )
            if t.data is not None:
                arr = t.data
            else:
                dtype = DATATYPES[t.datatype]
                arr = np.frombuffer(payload, dtype, t.size // dtype.itemsize, t.offset)
                arr = arr.reshape(t.shape)
            inputs[t.name] = arr
            datatypes[t.name] = t.datatype
        binary = {o.name for o in self.outputs if o.binary}
        names = [o.name for o in self.outputs]
        return InferRequest(
            inputs, datatypes, self.id, self.parameters, names, binary, self.binary_default
        )


def payload_mismatch(expected: int, got: int) -> str:
    if got < expected:
        return (
            f"the inputs' binary_data_size values add up to {expected} bytes but only "
            f"{got} bytes follow the JSON header"
        )
    return (
        f"{got - expected} bytes after the JSON header belong to no input "
        "(binary_data_size values do not add up)"
    )


def split_body(
    body: bytes | bytearray, header_length: str | int | None
) -> tuple[bytes | bytearray, memoryview]:
    """A body's JSON header and its binary payload (``header_length``: the HTTP header)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        hlen = int(header_length)
    except (TypeError, ValueError):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if hlen < 0 or hlen > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {hlen} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:hlen]), view[hlen:]


def parse_infer_request(body: bytes, header_length: str | int | None = None) -> InferRequest:
    """Decode an infer request body (JSON, or binary when ``header_length`` is given).

    Raises :class:`ProtocolError` naming the field at fault. Nothing here allocates
    more than the body's own size: declared shapes are checked against the bytes or
    values actually sent before any array is built.
    """
    header_bytes, payload = split_body(body, header_length)
    return parse_request_header(header_bytes).to_request(payload)


def parse_request_header(header_bytes: bytes | bytearray | memoryview) -> RequestHeader:
    """Decode and check an infer request's JSON header (:class:`ProtocolError` if wrong)."""
    header = loads_json(header_bytes, "request body")
    if not isinstance(header, dict):
        raise ProtocolError("request body must be a JSON object with an 'inputs' list")
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("'id' must be a string")
    parameters = _as_dict(header.get("parameters"), "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: list[TensorSpec] = []
    seen: set[str] = set()
    offset = 0
    cacheable = True
    for tensor in raw_inputs:
        if not isinstance(tensor, dict):
            raise ProtocolError("every entry of 'inputs' must be a JSON object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError("every input needs a non-empty string 'name'")
        if name in seen:
            raise ProtocolError(f"input '{name}' is given twice")
        seen.add(name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ProtocolError(
                f"input '{name}': datatype {datatype!r} is not supported; use FP32 or FP64",
                "dtype",
            )
        dtype = DATATYPES[datatype]
        shape = _check_shape(name, tensor.get("shape"))
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        tparams = _as_dict(tensor.get("parameters"), f"input '{name}': 'parameters'")
        spec = TensorSpec(name, datatype, shape)
        region = _region_of(f"input '{name}'", tparams, nbytes)
        size = tparams.get("binary_data_size")
        if region is not None:
            if size is not None or "data" in tensor:
                raise ProtocolError(
                    f"input '{name}': give its values once: shared memory, binary_data_size or data"
                )
            spec.region, spec.region_offset = region
            spec.size = nbytes
        elif size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be an integer >= 0")
            if size != nbytes:
                raise ProtocolError(
                    f"input '{name}': shape {list(shape)} of {datatype} needs "
                    f"{nbytes} bytes but binary_data_size is {size}",
                    "shape",
                )
            spec.offset, spec.size = offset, size
            offset += size
        else:
            if "data" not in tensor:
                raise ProtocolError(f"input '{name}': no 'data' and no binary_data_size")
            spec.data = _json_data(name, tensor["data"], shape, dtype)
            cacheable = False
        inputs.append(spec)
    outputs = _requested_outputs(header.get("outputs"))
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ProtocolError("parameter 'binary_data_output' must be true or false")
    return RequestHeader(inputs, rid, parameters, outputs, default, offset, cacheable)


def _region_of(what: str, params: dict[str, Any], nbytes: int | None) -> tuple[str, int] | None:
    """``(region, offset)`` of a tensor in shared memory, or None when it is not there.

    ``nbytes`` is the tensor's size where the header states it (inputs): the
    declared ``shared_memory_byte_size`` must match it.
    """
    region = params.get("shared_memory_region")
    if region is None:
        return None
    if not isinstance(region, str) or not region:
        raise ProtocolError(f"{what}: shared_memory_region must be a non-empty string")
    size = params.get("shared_memory_byte_size")
    off = params.get("shared_memory_offset", 0)
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", off)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError(f"{what}: {key} must be an integer >= 0, got {value!r}")
    if nbytes is not None and size != nbytes:
        raise ProtocolError(
            f"{what}: its shape and datatype need {nbytes} bytes but shared_memory_byte_size "
            f"is {size}",
            "shape",
        )
    return region, off


def _json_data(name: str, data: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list of numbers")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"input '{name}': 'data' is ragged or not numeric", "dtype") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == object:
        raise ProtocolError(
            f"input '{name}': 'data' must hold numbers only (got {arr.dtype.kind!r} values)",
            "dtype",
        )
    if arr.size != math.prod(shape):
        raise ProtocolError(
            f"input '{name}': shape {list(shape)} needs {math.prod(shape)} values, "
            f"'data' has {arr.size}",
            "shape",
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(dtype).reshape(shape)


def _requested_outputs(raw: Any) -> list[TensorSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list")
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError("every entry of 'outputs' needs a string 'name'")
        name = entry["name"]
        params = _as_dict(entry.get("parameters"), f"output '{name}': 'parameters'")
        if "classification" in params:
            raise ProtocolError("the classification extension is not supported")
        flag = params.get("binary_data", False)
        if not isinstance(flag, bool):
            raise ProtocolError(f"output '{name}': binary_data must be true or false")
        spec = TensorSpec(name, binary=flag)
        region = _region_of(f"output '{name}'", params, None)
        if region is not None:
            spec.region, spec.region_offset = region
            spec.size = params["shared_memory_byte_size"]
        out.append(spec)
    return out


def _tensor_json(name: str, arr: np.ndarray, binary: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "datatype": DTYPE_NAMES[arr.dtype],
        "shape": list(arr.shape),
    }
    if binary:
        entry["parameters"] = {"binary_data_size": arr.nbytes}
    else:
        entry["data"] = arr.ravel().tolist()
    return entry


def _le(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False)


def encode_message_parts(
    header: dict[str, Any],
    tensors: Sequence[tuple[str, np.ndarray, bool]],
    key: str,
) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """Body parts and headers: the JSON header, then a raw view of each binary tensor.

    The body is the parts in order. They are not joined, so a server or client can
    hand a large tensor to the socket without copying it.
    """
    header[key] = [_tensor_json(n, a, b) for n, a, b in tensors]
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    blobs = [memoryview(np.ascontiguousarray(_le(a))).cast("B") for _, a, b in tensors if b]
    if not blobs:
        return [text], {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
    return [text, *blobs], headers


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    binary: bool = True,
    outputs: Sequence[str] = ("correction",),
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """What a client sends: FP32/FP64 inputs, outputs requested binary when ``binary``."""
    parts, headers = encode_infer_request_parts(inputs, binary, outputs, request_id, parameters)
    return parts[0] if len(parts) == 1 else b"".join(parts), headers


def encode_infer_request_parts(
    inputs: Mapping[str, np.ndarray],
    binary: bool = True,
    outputs: Sequence[str] = ("correction",),
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """:func:`encode_infer_request` as body parts: a large state is sent without a copy."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    header["outputs"] = [
        {"name": n, "parameters": {"binary_data": True}} if binary else {"name": n} for n in outputs
    ]
    tensors = []
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        if arr.dtype not in DTYPE_NAMES:
            raise TypeError(f"input '{name}' must be float32 or float64, got {arr.dtype}")
        tensors.append((name, np.ascontiguousarray(arr), binary))
    return encode_message_parts(header, tensors, "inputs")


def decode_infer_response(
    body: bytes, header_length: str | int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A response's JSON header and its output tensors (writable arrays)."""
    if header_length is not None:
        hlen = int(header_length)
        header = json.loads(body[:hlen])
        payload = memoryview(body)[hlen:]
    else:
        header, payload = json.loads(body), memoryview(b"")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for out in header.get("outputs", []):
        dtype = DATATYPES[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(payload[offset : offset + size], dtype=dtype)
            offset += size
            arr = arr.reshape(out["shape"])
            if not arr.flags.writeable:
                arr = arr.copy()
        else:
            arr = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        arrays[out["name"]] = arr
    return header, arrays


def header_length_of(headers: Mapping[str, str]) -> str | None:
    """The binary header length from a case-insensitive or lower-cased header mapping."""
    return headers.get(_HEADER_LENGTH_LOWER) or headers.get(HEADER_LENGTH)
