"""``CorrectionClient``: what a forecast model calls at every timestep.

Design points, each for the per-step budget of a forecast:

- one keep-alive HTTP/1.1 connection with ``TCP_NODELAY`` (``transport``: a plain
  socket parsed by hand, the default, or the standard library's ``http.client``;
  :mod:`service.client.transport` says why and where the measurement is);
- binary tensors (the Open Inference Protocol's binary extension) by default;
- a timeout per attempt and retries with backoff for idempotent calls (a
  correction is a pure function of the state, so ``infer`` is idempotent); a
  connection the server closed while idle is reopened silently;
- a degradation policy when the service is slow or down: ``raise``, ``zero`` (no
  correction) or ``last`` (reuse the last correction), counting degraded steps in
  :attr:`CorrectionClient.degraded_steps` and reporting them to the server with
  the next successful call (metric ``mecs_client_degraded_steps_total``);
- a circuit breaker: after ``failure_threshold`` consecutive failures the client
  stops calling for ``cooldown_s`` and degrades at once, so a forecast does not
  wait a timeout per step while the service is away;
- several endpoints (replicas, or load balancers in front of them): the client
  keeps to the one that answers and, when it is unreachable or answers 502/503/504,
  retries the same call on the next one (every endpoint is tried at least once per
  call before the call fails); :attr:`CorrectionClient.failovers` counts the moves;
- timestep groups: callers that step in lockstep (ensemble members, MPI ranks)
  name their run and their number (``group``, ``group_size``, or ``MECS_GROUP`` and
  ``MECS_GROUP_SIZE`` in the environment), and the server forms their batch the
  moment the last one arrives;
- the request's JSON header is encoded once per shape and parameters and reused
  while they stay the same (what a forecast sends every step), and a server
  on the same host can take the state through shared memory
  (:mod:`service.client.shm`).

Only numpy and the standard library are imported.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from ..protocol import (
    HEADER_LENGTH,
    MAX_DEGRADED_STEPS_PER_CALL,
    decode_infer_response,
    encode_infer_request_parts,
)
from .degradation import Degradation, Policy
from .regions import RegionCalls
from .result import InferResult
from .transport import (
    NotTheProtocol,
    RequestRejected,
    ServiceError,
    ServiceUnavailable,
    TLSFailure,
    TransportName,
    error_message,
    is_tls_failure,
    make_transport,
)


@dataclass
class _Service:
    """One endpoint: its URL, its path prefix and its keep-alive connection."""

    url: str
    prefix: str
    conn: Any


def split_urls(url: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"http://a:8000,http://b:8000"`` or a sequence -> the list of URLs, in order."""
    items = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip() for u in items if u and u.strip()]
    if not urls:
        raise ValueError("no service URL given")
    return urls


class CorrectionClient(RegionCalls, Degradation):
    """Client for one model of a correction service.

    ``correct(state)`` returns the correction (tendency, state units per unit
    time) for ``state`` (``[*state_shape]`` or ``[batch, *state_shape]``, float32
    or float64; the answer has the same shape and dtype) and applies the
    degradation policy; ``infer`` returns the full :class:`InferResult` and always
    raises on failure. One client holds one connection: use one per thread.

    ``url`` is one URL, several separated by commas, or a sequence of them: the
    replicas of one service (the same model repository), tried in turn on failure.
    """

    def __init__(
        self,
        url: str | list[str] | tuple[str, ...],
        model: str,
        version: int | None = None,
        api_key: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        backoff: float = 0.02,
        degrade: Policy = "raise",
        binary: bool = True,
        failure_threshold: int = 3,
        cooldown_s: float = 2.0,
        transport: TransportName = "socket",
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        dt_unit: str | None = None,
        group: str | None = None,
        group_size: int | None = None,
    ) -> None:
        self._init_degradation(degrade, failure_threshold, cooldown_s)
        urls = split_urls(url)
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"service URL must be http(s)://host[:port], got {u!r}")
        self.model, self.version = model, version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.binary = binary
        # the caller's time unit: corrections come back per this unit (None: the model's)
        self.dt_unit = dt_unit
        if ca_file is not None:
            if ssl_context is not None:
                raise ValueError("give ssl_context or ca_file, not both")
            try:  # a CA bundle (PEM) to trust instead of the system's store
                ssl_context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(f"ca_file {ca_file!r}: cannot load it: {err}") from None
        self._services = []
        for u in urls:
            parts = urlsplit(u)
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            conn = make_transport(
                transport, parts.hostname, port, tls, connect_timeout, ssl_context
            )
            self._services.append(_Service(u.rstrip("/"), parts.path.rstrip("/"), conn))
        self._active = 0
        self.failovers = 0
        self._base_headers = "User-Agent: mecs-client\r\n"
        if api_key:
            self._base_headers += f"Authorization: Bearer {api_key}\r\n"
        name = quote(model, safe="")
        tail = f"/versions/{int(version)}" if version is not None else ""
        self._infer_path = f"/v2/models/{name}{tail}/infer"
        self.calls = 0
        self.last_result: InferResult | None = None
        self.group, self.group_size = timestep_group(group, group_size)
        self._encoded: tuple[Any, list, dict[str, str]] | None = None  # the last header

    @property
    def url(self) -> str:
        """The endpoint in use (the first, until a failure moves the client on)."""
        return self._services[self._active].url

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._services]

    @property
    def _conn(self) -> Any:
        return self._services[self._active].conn

    def _next_endpoint(self) -> None:
        if len(self._services) > 1:
            self._active = (self._active + 1) % len(self._services)
            self.failovers += 1

    # -- plumbing --------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        body: bytes | list[bytes | memoryview] = b"",
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        """``path`` is the protocol's (``/v2/...``); each endpoint adds its own prefix."""
        parts = [body] if isinstance(body, bytes | bytearray | memoryview) else body
        head = self._base_headers
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        n = len(self._services)
        # an idempotent call tries every endpoint at least once
        attempts = max(1 + self.retries, n) if idempotent else 1
        delay = self.backoff
        last: Exception | None = None
        route = path
        for attempt in range(attempts):
            if attempt:
                self._next_endpoint()
                if attempt % n == 0:  # back off once a whole round of endpoints failed
                    time.sleep(delay)
                    delay *= 2
            path = self._services[self._active].prefix + route
            try:
                try:
                    status, h, data = self._conn.request(
                        method, path, head, parts, timeout or self.timeout
                    )
                except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                    if not self._conn.reused:
                        raise
                    # the server closed an idle keep-alive connection: reopen once, free
                    self._conn.close()
                    status, h, data = self._conn.request(
                        method, path, head, parts, timeout or self.timeout
                    )
            except (OSError, ValueError) as err:  # refused, reset, timeout, garbage
                self._conn.close()
                if is_tls_failure(err):
                    raise TLSFailure(
                        f"{method} {self.url}{path}: TLS handshake failed: {err} (check the "
                        "URL's scheme and the CA bundle: ca_file= or ssl_context=)"
                    ) from None
                kind = "timed out" if isinstance(err, TimeoutError) else "unreachable"
                last = ServiceUnavailable(f"{method} {self.url}{path}: service {kind}: {err}")
                continue
            if status in (502, 503, 504):
                last = ServiceUnavailable(
                    f"{method} {path}: {status} {error_message(data)}", status
                )
                continue
            if status >= 500:
                raise ServiceUnavailable(f"{method} {path}: {status} {error_message(data)}", status)
            if status >= 400:
                raise RequestRejected(f"{method} {path}: {status} {error_message(data)}", status)
            return status, h, data
        if n > 1 and attempts >= n and last is not None:
            raise type(last)(f"all {n} endpoints failed; last: {last}", last.status)
        raise last  # type: ignore[misc]

    def _get_json(self, path: str) -> Any:
        _, h, data = self._send("GET", path)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:
            self._conn.close()
            raise NotTheProtocol(
                f"GET {path}: a 200 answer that is not JSON ({h.get('content-type', '?')}): {err}"
            ) from None

    # -- protocol calls --------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return self._get_json("/v2")

    def _answers(self, path: str) -> bool:
        try:
            self._send("GET", f"{path}")
            return True
        except ServiceError:
            return False

    def live(self) -> bool:
        return self._answers("/v2/health/live")

    def ready(self) -> bool:
        return self._answers("/v2/health/ready")

    def metadata(self) -> dict[str, Any]:
        """Model metadata (inputs, outputs, shapes, variables, version)."""
        name = quote(self.model, safe="")
        tail = f"/versions/{int(self.version)}" if self.version is not None else ""
        return self._get_json(f"/v2/models/{name}{tail}")

    def repository_index(self) -> list[dict[str, str]]:
        return self._get_json("/v2/repository/index")

    def load_model(self, name: str | None = None, version: int | None = None) -> dict[str, Any]:
        """Admin: (re)load a model, optionally pinning ``version`` as its default."""
        body = json.dumps({"parameters": {"version": str(version)}} if version else {}).encode()
        path = f"/v2/repository/models/{quote(name or self.model, safe='')}/load"
        _, _, data = self._send(
            "POST", path, body, {"Content-Type": "application/json"}, idempotent=False
        )
        return json.loads(data)

    def unload_model(self, name: str | None = None) -> dict[str, Any]:
        path = f"/v2/repository/models/{quote(name or self.model, safe='')}/unload"
        _, _, data = self._send("POST", path, b"", idempotent=False)
        return json.loads(data)

    def metrics_text(self) -> str:
        _, _, data = self._send("GET", "/metrics")
        return data.decode()

    def infer(
        self,
        state: np.ndarray,
        dt: float | None = None,
        request_id: str | None = None,
        forcings: np.ndarray | None = None,
        binary: bool | None = None,
        dt_unit: str | None = None,
        valid_time: float | str | None = None,
    ) -> InferResult:
        """One infer call (raises :class:`ServiceError` on failure, after retries).

        ``dt`` in ``dt_unit`` (default: the client's ``dt_unit``): the correction comes
        back per that unit, converted by the server, which refuses a ``dt`` whose unit
        is missing or does not convert to the model's. ``valid_time`` (the states'
        time: a number or an ISO 8601 string) lets a recording service's samples be
        matched with the analyses that arrive later (``mecs monitor``).
        """
        arr = np.asarray(state)
        single = arr.ndim == 1
        batch = arr[None] if single else arr
        params: dict[str, Any] = {}
        if dt is not None:
            params["dt"] = float(dt)
        unit = dt_unit or self.dt_unit
        if unit is not None:
            params["dt_unit"] = unit
        reported = min(self._unreported, MAX_DEGRADED_STEPS_PER_CALL)
        if reported:
            params["degraded_steps"] = reported
        if self.group is not None:
            params["group"], params["group_size"] = self.group, self.group_size
        if valid_time is not None:
            params["valid_time"] = valid_time
        inputs = {"state": batch}
        if forcings is not None:
            inputs["forcings"] = np.asarray(forcings, dtype=batch.dtype).reshape(len(batch), -1)
        binary = self.binary if binary is None else binary
        body, headers = self._encode(inputs, binary, request_id, params)
        self.calls += 1
        _, h, data = self._send("POST", self._infer_path, body, headers)
        try:
            result = self._result(data, h, batch, single)
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
            # a 200 that is not the protocol: whatever sent it, this connection is suspect
            self._conn.close()
            what = h.get("content-type", "no content type")
            raise NotTheProtocol(
                f"POST {self._infer_path}: a 200 answer that is not an infer response "
                f"({what}; {type(err).__name__}: {err}); is a proxy answering for the service?"
            ) from None
        self._unreported -= reported
        self.last_result = result
        return result

    def _encode(
        self, inputs: dict[str, np.ndarray], binary: bool, request_id, params: dict
    ) -> tuple[list, dict[str, str]]:
        """The request's parts; the JSON header reused while shapes and parameters stay."""
        if not binary or request_id is not None:
            return encode_infer_request_parts(
                inputs, binary, request_id=request_id, parameters=params
            )
        key = (
            tuple((k, v.shape, v.dtype.str) for k, v in inputs.items()),
            tuple(params.items()),
        )
        cached = self._encoded
        if cached is not None and cached[0] == key:
            blobs = [memoryview(np.ascontiguousarray(v)).cast("B") for v in inputs.values()]
            return [cached[1], *blobs], cached[2]
        parts, headers = encode_infer_request_parts(inputs, True, parameters=params)
        if np.little_endian and all(v.dtype.byteorder in "=<|" for v in inputs.values()):
            self._encoded = (key, parts[0], headers)
        return parts, headers

    def _result(
        self, data: bytearray, h: dict[str, str], batch: np.ndarray, single: bool
    ) -> InferResult:
        header, arrays = decode_infer_response(data, h.get(HEADER_LENGTH.lower()))
        if not isinstance(header, dict):
            raise ValueError("the JSON answer is not an object")
        p = header.get("parameters") or {}
        corr = arrays["correction"]
        if corr.shape != batch.shape:
            raise ValueError(
                f"correction of shape {list(corr.shape)} for a state {list(batch.shape)}"
            )
        flags = [False] * len(batch)
        for i in filter(None, str(p.get("out_of_distribution_samples", "")).split(",")):
            flags[int(i)] = True
        return InferResult(
            correction=corr[0] if single else corr,
            model_name=str(header["model_name"]),
            model_version=int(header["model_version"]),
            out_of_distribution=flags,
            capped_values=int(p.get("capped_values", 0)),
            batch_size=int(p.get("batch_size", len(batch))),
            parameters=p,
            id=header.get("id"),
            server_timing=h.get("server-timing", ""),
        )

    def close(self) -> None:
        for service in self._services:
            service.conn.close()

    def __enter__(self) -> CorrectionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def timestep_group(group: str | None, size: int | None) -> tuple[str | None, int | None]:
    """The client's timestep group: the arguments, else ``MECS_GROUP``/``MECS_GROUP_SIZE``.

    A group without a size takes the MPI job's size where the launcher states it
    (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``SLURM_NTASKS``).
    """
    group = group if group is not None else os.environ.get("MECS_GROUP") or None
    if group is None:
        if size is not None:
            raise ValueError("group_size needs a group (the run's name)")
        return None, None
    if size is None:
        raw = os.environ.get("MECS_GROUP_SIZE")
        for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
            raw = raw or os.environ.get(var)
        if raw is None:
            raise ValueError(f"group {group!r} has no size: pass group_size or set MECS_GROUP_SIZE")
        try:
            size = int(raw)
        except ValueError:
            raise ValueError(f"group size {raw!r} is not an integer") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"group_size must be a positive integer, got {size!r}")
    return str(group), size
