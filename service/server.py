"""Running the app on uvicorn: in the foreground (``mecs serve``) or in a thread.

The listening socket is bound here rather than by uvicorn, so ``port=0`` works
(the OS picks a free port) and the real address is known before the first
request. uvicorn picks ``uvloop`` and ``httptools`` when installed (they are
dependencies): on a 2-core machine they take ~100 us off every round trip.

uvicorn writes a response's status line and headers, then its body, as two
writes: two ``send`` system calls and two segments the caller wakes up for. On
loopback a send also runs the receiver's side of TCP, so each costs tens of
microseconds; :class:`CoalescingTransport` holds a small write until the next one
of the same event-loop step (the body follows the headers at once) and sends both
with one ``writev``. docs/service.md has the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn

from .app import create_app
from .settings import ServiceSettings


class CoalescingTransport:
    """A transport whose small writes wait for the next write of the same loop step.

    A held write goes out with the next one (one ``writelines``, so one ``writev``)
    or, if none comes, at the end of the loop step. Writes of 64 KiB and more are
    never held. Everything else is the wrapped transport's.
    """

    __slots__ = ("_transport", "_loop", "_held")

    HOLD_BELOW = 64 * 1024

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))
        elif len(data) < self.HOLD_BELOW:
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def _http_protocol():
    """uvicorn's httptools protocol on a :class:`CoalescingTransport` ("auto" without it)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's own choice
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))

    return CoalescingHttpToolsProtocol


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_server(settings: ServiceSettings, app=None) -> uvicorn.Server:
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        loop="auto",
        http=_http_protocol(),
        lifespan="on",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        limit_concurrency=settings.max_connections,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    return uvicorn.Server(config)


def url_of(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}"


def serve(
    settings: ServiceSettings, on_ready: Callable[[str], None] | None = None, app=None
) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish before exit."""
    server = build_server(settings, app)
    sock = bind_socket(settings.host, settings.port)
    if on_ready is not None:
        url = url_of(sock, settings.ssl_certfile is not None)
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready(url)

        server.startup = startup
    server.run(sockets=[sock])


class ServerThread:
    """A real uvicorn server on a background thread (tests, notebooks, benchmarks)."""

    def __init__(self, settings: ServiceSettings, app=None) -> None:
        self.settings = settings
        self.server = build_server(settings, app)
        self.sock = bind_socket(settings.host, settings.port)
        self.url = url_of(self.sock, settings.ssl_certfile is not None)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def app(self):
        return self.server.config.app

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running(settings: ServiceSettings) -> Iterator[ServerThread]:
    with ServerThread(settings) as server:
        yield server
