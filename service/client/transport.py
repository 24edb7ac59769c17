"""HTTP/1.1 transports for the client: one keep-alive connection each.

Two implementations behind one ``request`` call, chosen per client
(``CorrectionClient(transport=...)``):

- ``"http.client"``: the standard library's ``http.client.HTTPConnection`` (or
  ``HTTPSConnection`` with the caller's SSL context);
- ``"socket"`` (the default): a plain socket with ``TCP_NODELAY`` whose response is
  parsed by hand (status line, ``Content-Length`` or chunked body). It is kept
  because ``bench/service.py`` measures it faster per call than ``http.client``,
  which parses every response's headers with the ``email`` package; the figures
  are in ``docs/service.md``.

Both send a large body from the caller's own memory (no join into one copy) and
raise ``OSError`` subclasses for every transport failure, which the client turns
into :class:`ServiceUnavailable`.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Sequence
from typing import Literal, Protocol

Body = bytes | bytearray | memoryview
Response = tuple[int, dict[str, str], bytearray]
TransportName = Literal["socket", "http.client"]
TRANSPORTS = ("socket", "http.client")
_SMALL = 65536


class ServiceError(RuntimeError):
    """The service answered an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ServiceError):
    """Connection refused or reset, timeout, 5xx, or the breaker is open: degradable."""


class RequestRejected(ServiceError):
    """A 4xx answer: the request itself is wrong; never retried, never degraded."""


class NotTheProtocol(ServiceUnavailable):
    """A 2xx answer that is not an Open Inference Protocol answer (a proxy's HTML page,
    JSON without ``model_name``, tensors that do not add up): degradable, and counted
    by the circuit breaker like any other outage."""


class TLSFailure(ServiceError):
    """The TLS handshake failed (untrusted or mismatched certificate, https to a plain
    HTTP server): a configuration fault that waiting will not fix, so it is raised
    under every degradation policy instead of degrading quietly forever."""


def is_tls_failure(err: BaseException) -> bool:
    """An ``ssl`` error other than a connection cut short (those are outages)."""
    return isinstance(err, ssl.SSLError) and not isinstance(
        err, ssl.SSLEOFError | ssl.SSLZeroReturnError
    )


class Transport(Protocol):
    """One keep-alive connection: ``request`` sends and returns (status, headers, body).

    ``headers`` are ``"Name: value\\r\\n"`` lines, formatted once by the client (the
    per-call cost of building them is part of every timestep's budget).
    """

    reused: bool

    def request(
        self, method: str, path: str, headers: str, body: Sequence[Body], timeout: float
    ) -> Response: ...

    def close(self) -> None: ...


class _Endpoint:
    """Where a transport connects, and with which TLS context (``None``: the system's)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: bool,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.reused = False
        self._setup()

    def _setup(self) -> None:
        """Per-transport state (no connection is opened before the first request)."""

    def _context(self) -> ssl.SSLContext:
        if self.ssl_context is None:  # built once: the system's trust store is read once
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context


class SocketTransport(_Endpoint):
    """A keep-alive HTTP/1.1 connection over a plain socket (http or https)."""

    def _setup(self) -> None:
        self.sock: socket.socket | None = None
        self.reader = None
        self._host_line = f"Host: {self.host}:{self.port}\r\n"

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = self._context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=_SMALL)
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
        self, method: str, path: str, headers: str, body: Sequence[Body], timeout: float
    ) -> Response:
        size = sum(len(p) for p in body)
        head = (
            f"{method} {path} HTTP/1.1\r\n{self._host_line}{headers}Content-Length: {size}\r\n\r\n"
        )
        return self.send_raw(head.encode("latin-1"), body, timeout)

    def send_raw(self, head: bytes, body: Sequence[Body], timeout: float) -> Response:
        """Send a pre-built request head and body parts; read the response."""
        if self.sock is None:
            self.open()
        else:
            self.reused = True
        self.sock.settimeout(timeout)
        parts = list(body) or [b""]
        if sum(len(p) for p in parts) <= _SMALL:  # one write for a small request
            self.sock.sendall(b"".join([head, *parts]))
        else:  # large parts go out from their own memory, not joined into a copy
            if len(parts[0]) > _SMALL:
                self.sock.sendall(head)
                self.sock.sendall(parts[0])
            else:
                self.sock.sendall(head + parts[0])
            for part in parts[1:]:
                self.sock.sendall(part)
        return self._read_response()

    def _read_response(self) -> Response:
        r = self.reader
        line = r.readline(_SMALL + 1)
        if not line:
            raise ConnectionResetError("server closed the connection")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ConnectionError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            h = r.readline(_SMALL + 1)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(r.readline(_SMALL + 1).split(b";")[0], 16)
                if size == 0:
                    while r.readline(_SMALL + 1) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += r.read(size)
                r.readline(_SMALL + 1)
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


class HttpClientTransport(_Endpoint):
    """The same connection on the standard library's ``http.client``."""

    def _setup(self) -> None:
        self.conn: http.client.HTTPConnection | None = None

    def _open(self) -> http.client.HTTPConnection:
        if self.tls:
            conn = http.client.HTTPSConnection(
                self.host,
                self.port,
                timeout=self.connect_timeout,
                context=self._context(),
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reused = False
        return conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def request(
        self, method: str, path: str, headers: str, body: Sequence[Body], timeout: float
    ) -> Response:
        if self.conn is None:
            self.conn = self._open()
        else:
            self.reused = True
        conn = self.conn
        conn.sock.settimeout(timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for line in headers.split("\r\n"):
                if line:
                    name, _, value = line.partition(": ")
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(sum(len(p) for p in body)))
            conn.endheaders()
            for part in body:
                if len(part):
                    conn.send(part)
            resp = conn.getresponse()
            data = bytearray(resp.read())
        except (http.client.HTTPException, ValueError) as err:
            self.close()
            raise ConnectionError(f"bad HTTP response: {err}") from None
        except OSError:
            self.close()
            raise
        out = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self.close()
        return resp.status, out, data


def make_transport(
    name: str,
    host: str,
    port: int,
    tls: bool,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Transport:
    """The transport called ``name`` (one of :data:`TRANSPORTS`)."""
    if name == "socket":
        return SocketTransport(host, port, tls, connect_timeout, ssl_context)
    if name == "http.client":
        return HttpClientTransport(host, port, tls, connect_timeout, ssl_context)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")


def error_message(data: bytes) -> str:
    """The ``error`` text of a JSON error body, else the body's first bytes."""
    try:
        return str(json.loads(data).get("error", "")) or data[:200].decode("latin-1")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return bytes(data[:200]).decode("latin-1", "replace")
