"""The step protocol ``mecs-step/1``: how an external host model talks to mecs.

A host model that is not Python (a Fortran or C forecast model) takes part in
``unrolled``/``hybrid`` fine-tuning and in coupled forecasts as a *process*
started once and kept (``--host process:COMMAND``). mecs writes requests to its
standard input and reads answers from its standard output; standard error is
the host's log (mecs keeps its last lines for error messages). Every message is
one line of JSON (UTF-8, ended by ``\\n``, no newline inside) followed, when the
message carries a tensor, by that tensor's raw little-endian bytes in C order:

1. **hello** (host -> mecs, once, at start)::

       {"protocol": "mecs-step/1", "name": "my-model", "state_shape": [36],
        "dtype": "FP64", "dt": 0.05, "time_unit": "hour"}

   ``state_shape`` is the state of one member without the batch dimension, in
   the correction model's layout order (fields, then levels, then the grid, as
   the model metadata's ``dims`` list them). ``dtype`` is ``FP64`` or ``FP32``.
   ``dt`` is one host step in ``time_unit``.

2. **step** (mecs -> host)::

       {"op": "step", "id": 7, "steps": 1, "shape": [4, 36], "datatype": "FP64",
        "fields": ["X[k=0]", ...]}
       <4 * 36 * 8 bytes>

   advance each of the 4 states by ``steps`` host steps. ``fields``, when mecs
   knows the layout, names each channel (field and level) in order; a host may
   check it against its own and otherwise ignore it. The host answers::

       {"id": 7, "shape": [4, 36], "datatype": "FP64"}
       <4 * 36 * 8 bytes>

   or, when it cannot, ``{"id": 7, "error": "why"}`` (no bytes follow).

3. **close** (mecs -> host): ``{"op": "close"}``. The host exits with status 0.

The answer must name the request's ``id`` and have the request's shape and
datatype; mecs refuses anything else, as it refuses non-finite values, a host
that exits, and a host that does not answer within the timeout (then it is
killed). Each of those errors names the step (the count of step requests made).

Only numpy and the standard library are used here, so the reference host
(:mod:`correction.reference_host`) starts fast and a host author can read the
whole protocol in one file.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

import numpy as np

PROTOCOL = "mecs-step/1"
DTYPES = {"FP64": np.dtype("<f8"), "FP32": np.dtype("<f4")}
MAX_HEADER = 1 << 16


class StepProtocolError(RuntimeError):
    """A message that breaks ``mecs-step/1``; the text says what and where."""


def write_message(out: BinaryIO, header: dict[str, Any], array: np.ndarray | None = None) -> None:
    """One JSON line, then ``array``'s little-endian bytes when given; flushed."""
    line = json.dumps(header, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if array is None:
        out.write(line)
    else:
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        out.write(line)
        out.write(memoryview(data).cast("B"))
    out.flush()


def read_exact(src: BinaryIO, n: int) -> bytes:
    """``n`` bytes from ``src``, or :class:`EOFError` if it ends first."""
    chunks, got = [], 0
    while got < n:
        part = src.read(n - got)
        if not part:
            raise EOFError(f"stream ended after {got} of {n} bytes")
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


def parse_header(line: bytes, what: str) -> dict[str, Any]:
    """A header line as a JSON object (the message names ``what`` on failure)."""
    if not line.endswith(b"\n"):
        if len(line) >= MAX_HEADER:
            raise StepProtocolError(f"{what}: header line longer than {MAX_HEADER} bytes")
        raise StepProtocolError(f"{what}: stream ended inside a header line: {line[:120]!r}")
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise StepProtocolError(f"{what}: header is not JSON: {line[:120]!r}") from None
    if not isinstance(header, dict):
        raise StepProtocolError(f"{what}: header is not a JSON object: {line[:120]!r}")
    return header


def tensor_spec(header: dict[str, Any], what: str) -> tuple[tuple[int, ...], np.dtype]:
    """``shape`` and ``datatype`` of a message carrying a tensor, checked."""
    shape, datatype = header.get("shape"), header.get("datatype")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise StepProtocolError(f"{what}: 'shape' must be a list of non-negative integers")
    if datatype not in DTYPES:
        raise StepProtocolError(f"{what}: 'datatype' must be one of {sorted(DTYPES)}")
    return tuple(shape), DTYPES[datatype]


def read_tensor(src: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The raw bytes of one tensor as a writable array."""
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(bytearray(read_exact(src, n)), dtype=dtype).reshape(shape)
