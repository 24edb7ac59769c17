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
  wait a timeout per step while the service is away.

Only numpy and the standard library are imported.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from ..protocol import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request_parts,
)
from .degradation import Degradation, Policy
from .transport import (
    RequestRejected,
    ServiceError,
    ServiceUnavailable,
    TransportName,
    error_message,
    make_transport,
)


@dataclass
class InferResult:
    """One infer answer: the correction and what the server said about it."""

    correction: np.ndarray
    model_name: str
    model_version: int
    out_of_distribution: list[bool]
    capped_values: int
    batch_size: int
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    server_timing_ms: dict[str, float] = field(default_factory=dict)


class CorrectionClient(Degradation):
    """Client for one model of a correction service.

    ``correct(state)`` returns the correction (tendency, state units per unit
    time) for ``state`` (``[*state_shape]`` or ``[batch, *state_shape]``, float32
    or float64; the answer has the same shape and dtype) and applies the
    degradation policy; ``infer`` returns the full :class:`InferResult` and always
    raises on failure. One client holds one connection: use one per thread.
    """

    def __init__(
        self,
        url: str,
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
    ) -> None:
        self._init_degradation(degrade, failure_threshold, cooldown_s)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"service URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.model, self.version = model, version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.binary = binary
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        self._conn = make_transport(
            transport, parts.hostname, port, tls, connect_timeout, ssl_context
        )
        self._prefix = parts.path.rstrip("/")
        self._base_headers = "User-Agent: mecs-client\r\n"
        if api_key:
            self._base_headers += f"Authorization: Bearer {api_key}\r\n"
        name = quote(model, safe="")
        tail = f"/versions/{int(version)}" if version is not None else ""
        self._infer_path = f"{self._prefix}/v2/models/{name}{tail}/infer"
        self.calls = 0
        self.last_result: InferResult | None = None

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
        parts = [body] if isinstance(body, bytes | bytearray | memoryview) else body
        head = self._base_headers
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        attempts = 1 + (self.retries if idempotent else 0)
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(delay)
                delay *= 2
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
        raise last  # type: ignore[misc]

    def _get_json(self, path: str) -> Any:
        _, _, data = self._send("GET", path)
        return json.loads(data)

    # -- protocol calls --------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return self._get_json(f"{self._prefix}/v2")

    def _answers(self, path: str) -> bool:
        try:
            self._send("GET", f"{self._prefix}{path}")
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
        return self._get_json(f"{self._prefix}/v2/models/{name}{tail}")

    def repository_index(self) -> list[dict[str, str]]:
        return self._get_json(f"{self._prefix}/v2/repository/index")

    def load_model(self, name: str | None = None, version: int | None = None) -> dict[str, Any]:
        """Admin: (re)load a model, optionally pinning ``version`` as its default."""
        body = json.dumps({"parameters": {"version": str(version)}} if version else {}).encode()
        path = f"{self._prefix}/v2/repository/models/{quote(name or self.model, safe='')}/load"
        _, _, data = self._send(
            "POST", path, body, {"Content-Type": "application/json"}, idempotent=False
        )
        return json.loads(data)

    def unload_model(self, name: str | None = None) -> dict[str, Any]:
        path = f"{self._prefix}/v2/repository/models/{quote(name or self.model, safe='')}/unload"
        _, _, data = self._send("POST", path, b"", idempotent=False)
        return json.loads(data)

    def metrics_text(self) -> str:
        _, _, data = self._send("GET", f"{self._prefix}/metrics")
        return data.decode()

    def infer(
        self,
        state: np.ndarray,
        dt: float | None = None,
        request_id: str | None = None,
        forcings: np.ndarray | None = None,
        binary: bool | None = None,
    ) -> InferResult:
        """One infer call (raises :class:`ServiceError` on failure, after retries)."""
        arr = np.asarray(state)
        single = arr.ndim == 1
        batch = arr[None] if single else arr
        params: dict[str, Any] = {}
        if dt is not None:
            params["dt"] = float(dt)
        if self._unreported:
            params["degraded_steps"] = self._unreported
        inputs = {"state": batch}
        if forcings is not None:
            inputs["forcings"] = np.asarray(forcings, dtype=batch.dtype).reshape(len(batch), -1)
        body, headers = encode_infer_request_parts(
            inputs,
            binary=self.binary if binary is None else binary,
            request_id=request_id,
            parameters=params,
        )
        self.calls += 1
        _, h, data = self._send("POST", self._infer_path, body, headers)
        header, arrays = decode_infer_response(data, h.get(HEADER_LENGTH.lower()))
        self._unreported = 0
        p = header.get("parameters", {})
        corr = arrays["correction"]
        flags = [False] * len(batch)
        for i in filter(None, str(p.get("out_of_distribution_samples", "")).split(",")):
            flags[int(i)] = True
        result = InferResult(
            correction=corr[0] if single else corr,
            model_name=header["model_name"],
            model_version=int(header["model_version"]),
            out_of_distribution=flags,
            capped_values=int(p.get("capped_values", 0)),
            batch_size=int(p.get("batch_size", len(batch))),
            parameters=p,
            id=header.get("id"),
            server_timing_ms=_server_timing(h.get("server-timing", "")),
        )
        self.last_result = result
        return result

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CorrectionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_timing(value: str) -> dict[str, float]:
    """``forward;dur=1.2, total;dur=1.5`` -> ``{"forward": 1.2, "total": 1.5}``."""
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            with contextlib.suppress(ValueError):
                out[name] = float(rest[4:])
    return out
