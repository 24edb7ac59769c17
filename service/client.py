"""``CorrectionClient``: what a forecast model calls at every timestep.

Design points, each for the per-step budget of a forecast:

- one keep-alive HTTP/1.1 connection over a plain socket with ``TCP_NODELAY``; the
  response is parsed by hand (status line, ``Content-Length`` or chunked body).
  ``http.client`` parses headers with the ``email`` package and ``httpx`` adds
  its own layers: each costs 100-500 us per call, more than the server's work;
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
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import numpy as np

from .protocol import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request_parts,
)

Policy = Literal["raise", "zero", "last"]
POLICIES = ("raise", "zero", "last")


class ServiceError(RuntimeError):
    """The service answered an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ServiceError):
    """Connection refused or reset, timeout, 5xx, or the breaker is open: degradable."""


class RequestRejected(ServiceError):
    """A 4xx answer: the request itself is wrong; never retried, never degraded."""


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


class _Connection:
    """One keep-alive HTTP/1.1 connection (http or https)."""

    def __init__(self, host: str, port: int, tls: bool, connect_timeout: float) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self.reader = None
        self.reused = False

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=65536)
        self.reused = False

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.reader.close()
                self.sock.close()
            except OSError:
                pass
        self.sock = self.reader = None

    def request(
        self, head: bytes, body: bytes | list[bytes | memoryview], timeout: float
    ) -> tuple[int, dict[str, str], bytearray]:
        if self.sock is None:
            self.open()
        else:
            self.reused = True
        self.sock.settimeout(timeout)
        parts = [body] if isinstance(body, bytes | bytearray | memoryview) else body
        if sum(len(p) for p in parts) <= 65536:  # one write for a small request
            self.sock.sendall(b"".join([head, *parts]))
        else:  # large parts go out from their own memory, not joined into a copy
            if len(parts[0]) > 65536:
                self.sock.sendall(head)
                self.sock.sendall(parts[0])
            else:
                self.sock.sendall(head + parts[0])
            for part in parts[1:]:
                self.sock.sendall(part)
        return self._read_response()

    def _read_response(self) -> tuple[int, dict[str, str], bytearray]:
        r = self.reader
        line = r.readline(65537)
        if not line:
            raise ConnectionResetError("server closed the connection")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ConnectionError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            h = r.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(r.readline(65537).split(b";")[0], 16)
                if size == 0:
                    while r.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += r.read(size)
                r.readline(65537)
        else:
            n = int(headers.get("content-length", "0"))
            body = bytearray(n)
            view, got = memoryview(body), 0
            while got < n:
                k = r.readinto(view[got:])
                if not k:
                    raise ConnectionResetError("connection closed in the middle of a response")
                got += k
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


class CorrectionClient:
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
    ) -> None:
        if degrade not in POLICIES:
            raise ValueError(f"degrade must be one of {POLICIES}, got {degrade!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"service URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.model, self.version = model, version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.degrade, self.binary = degrade, binary
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        self._conn = _Connection(parts.hostname, port, tls, connect_timeout)
        self._prefix = parts.path.rstrip("/")
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
        self._base_headers = f"Host: {host_header}\r\nUser-Agent: mecs-client\r\n"
        if api_key:
            self._base_headers += f"Authorization: Bearer {api_key}\r\n"
        name = quote(model, safe="")
        tail = f"/versions/{int(version)}" if version is not None else ""
        self._infer_path = f"{self._prefix}/v2/models/{name}{tail}/infer"
        self.degraded_steps = 0
        self._unreported = 0
        self.calls = 0
        self.failures = 0
        self.consecutive_failures = 0
        self._open_until = 0.0
        self.last_error: Exception | None = None
        self.last_result: InferResult | None = None

    # -- plumbing --------------------------------------------------------------------
    def _head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {path} HTTP/1.1\r\n", self._base_headers]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append(f"Content-Length: {length}\r\n\r\n")
        return "".join(lines).encode("latin-1")

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | list[bytes | memoryview] = b"",
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        size = len(body) if isinstance(body, bytes) else sum(len(p) for p in body)
        head = self._head(method, path, headers or {}, size)
        attempts = 1 + (self.retries if idempotent else 0)
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                try:
                    status, h, data = self._conn.request(head, body, timeout or self.timeout)
                except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                    if not self._conn.reused:
                        raise
                    # the server closed an idle keep-alive connection: reopen once, free
                    self._conn.close()
                    status, h, data = self._conn.request(head, body, timeout or self.timeout)
            except (OSError, ValueError) as err:  # refused, reset, timeout, garbage
                self._conn.close()
                kind = "timed out" if isinstance(err, TimeoutError) else "unreachable"
                last = ServiceUnavailable(f"{method} {self.url}{path}: service {kind}: {err}")
                continue
            if status in (502, 503, 504):
                last = ServiceUnavailable(f"{method} {path}: {status} {_message(data)}", status)
                continue
            if status >= 500:
                raise ServiceUnavailable(f"{method} {path}: {status} {_message(data)}", status)
            if status >= 400:
                raise RequestRejected(f"{method} {path}: {status} {_message(data)}", status)
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

    def correct(self, state: np.ndarray, dt: float | None = None) -> np.ndarray:
        """The correction for ``state``, or the degradation policy's answer on failure."""
        now = time.monotonic()
        if now < self._open_until:
            return self._degraded(
                state, ServiceUnavailable("circuit open after repeated failures; not calling")
            )
        try:
            result = self.infer(state, dt=dt)
        except (ServiceUnavailable, RequestRejected) as err:
            # a 4xx is the caller's bug and raises, except a 404 for a model that
            # answered before: it was unloaded, an outage like any other
            if isinstance(err, RequestRejected) and not (
                err.status == 404 and self.last_result is not None
            ):
                raise
            self.failures += 1
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold:
                self._open_until = time.monotonic() + self.cooldown_s
            return self._degraded(state, err)
        self.consecutive_failures = 0
        return result.correction

    def _degraded(self, state: np.ndarray, err: ServiceError) -> np.ndarray:
        self.last_error = err
        if self.degrade == "raise":
            raise err
        self.degraded_steps += 1
        self._unreported += 1
        arr = np.asarray(state)
        last = self.last_result
        if self.degrade == "last" and last is not None and last.correction.shape == arr.shape:
            return last.correction.astype(arr.dtype, copy=True)
        return np.zeros_like(arr)

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


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", "")) or data[:200].decode("latin-1")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return bytes(data[:200]).decode("latin-1", "replace")
