"""The service's pure-ASGI front: admission, body limits and timeout, metrics, infer fast path.

Kept apart from :mod:`service.app` (which assembles the FastAPI application) because
this is the code every request runs before and after its handler, and the part whose
cost is measured per call (``bench/profile_calls.py``, docs/service.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .auth import check_key
from .busypoll import BusyPoll
from .errors import ServiceError
from .routers.models import handle_infer

if TYPE_CHECKING:
    from .app import ServiceState

log = logging.getLogger("mecs.service")


_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
INFER_ROUTE = "/v2/models/{name}/infer"
INFER_VERSION_ROUTE = "/v2/models/{name}/versions/{version}/infer"


async def _fast_infer(state, scope, receive, name: str, version: str | None, auth: str):
    try:
        scope["mecs.principal"] = check_key(state, auth, "inference").key_id
        return await handle_infer(state, scope, receive, name, version)
    except ServiceError as exc:
        return _error(exc.status, exc.message, exc.headers)
    except ClientDisconnect:
        return _client_gone(Request(scope))
    except Exception as exc:  # as the app's handler: logged, never a traceback to callers
        log.exception("internal error on infer for model %r", name)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


class BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s``."""


class ServiceMiddleware:
    """Pure ASGI middleware: admission, body limits and timeout, metrics, infer fast path.

    Pure ASGI (not ``BaseHTTPMiddleware``) because it sits on every request of a
    service whose whole budget is a few hundred microseconds. For the same reason
    ``POST .../infer`` goes from here straight to its handler: FastAPI's routing,
    dependency solving and exception layers cost ~100 us per call on a 2-core
    machine, a quarter of the round trip. The routes in :mod:`service.routers.models`
    document the endpoint (OpenAPI) and run the same handler when the app is used
    without this middleware.

    Admission, before a byte of the body is read: a body over ``max_body_bytes``
    (or a JSON body over ``max_json_body_bytes``: JSON is decoded on the event loop,
    where a large one would stall every other connection) is a 413; a body that
    would take the bytes admitted over all connections past
    ``max_inflight_body_bytes`` is a 503 with ``Retry-After``, so memory is bounded
    by what is admitted, not by how many clients send at once. Chunked bodies are
    counted as they arrive. A body that has not arrived within ``body_timeout_s``
    is answered 408 and its connection closed: a stalled sender holds no
    connection forever. Deadlines sit in a dict that one sweeper task checks a few
    times per timeout (a request pays a dict insert and delete, not a timer).
    """

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.inflight_bytes = 0
        settings = state.settings
        self.body_limit = settings.max_body_bytes
        self.json_limit = min(settings.max_json_body_bytes, settings.max_body_bytes)
        # request tasks whose body is still arriving, with their deadlines
        # (perf_counter): one sweeper task checks them, instead of a timer per request
        self._waiting: dict[asyncio.Task, float] = {}
        self._timed_out: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        # settings.busy_poll_us: the loop polls without sleeping after each request
        self.busy_poll = BusyPoll(settings.busy_poll_us * 1e-6)

    async def _sweep(self) -> None:
        """Cancel requests whose body is late; they answer 408 (see ``__call__``)."""
        period = min(1.0, self.state.settings.body_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.perf_counter()
            for task, deadline in list(self._waiting.items()):
                if now > deadline:
                    del self._waiting[task]
                    self._timed_out.add(task)
                    task.cancel()

    async def _refuse(self, scope, receive, send, status, message, headers=None) -> None:
        state = self.state
        await _error(status, message, headers)(scope, receive, send)
        state.metrics.http_requests.labels("other", scope["method"], str(status)).inc()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        settings = state.settings
        t0 = time.perf_counter()
        declared: int | None = None
        chunked = is_json = True  # chunked: no length declared, the body may still come
        header_length = None
        auth = ""
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit():
                    await self._refuse(scope, receive, send, 400, "Content-Length is not a number")
                    return
                declared = int(value)
            elif key == b"inference-header-content-length":
                is_json = False
                header_length = value.decode("latin-1")
            elif key == b"authorization":
                auth = value.decode("latin-1")
            elif key == b"transfer-encoding":
                chunked = True
        if declared is not None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            chunked = False
        limit = self.json_limit if is_json else self.body_limit
        if declared is not None and declared > limit:
            what = (
                "JSON request body"
                if is_json and limit < settings.max_body_bytes
                else "request body"
            )
            hint = "; send large states with the binary tensor extension" if is_json else ""
            await self._refuse(
                scope,
                receive,
                send,
                413,
                f"{what} of {declared} bytes exceeds the limit of {limit} bytes{hint}",
            )
            return
        reserved = declared or 0
        if reserved and self.inflight_bytes + reserved > settings.max_inflight_body_bytes:
            state.metrics.cached(state.metrics.admission_refused, "bytes").inc()
            await self._refuse(
                scope,
                receive,
                send,
                503,
                f"server busy: {self.inflight_bytes} request bytes already admitted (limit "
                f"{settings.max_inflight_body_bytes}); retry shortly",
                {"Retry-After": "1"},
            )
            return
        self.inflight_bytes += reserved
        scope["mecs.content_length"] = declared
        scope["mecs.header_length"] = header_length
        ticket = None
        repo = state.repository
        path = scope["path"]
        if repo is not None and path.startswith("/v2/models/") and path.endswith("/infer"):
            name = path[11:].split("/", 1)[0]
            if name in repo.slots:  # known names only: no unbounded state from bad paths
                ticket = repo.traffic_for(name).enter()
                scope["mecs.ticket"] = ticket
        status = [500]
        received = 0
        task = asyncio.current_task()
        waiting = self._waiting
        if declared or chunked:  # its body has a deadline, watched by the sweeper
            waiting[task] = t0 + settings.body_timeout_s
            sweeper = self._sweeper
            if sweeper is None or sweeper.done() or sweeper.get_loop() is not task.get_loop():
                self._sweeper = task.get_loop().create_task(self._sweep())

        async def limited_receive():
            nonlocal received, reserved
            message = await receive()
            body = message.get("body")
            if body:
                received += len(body)
                if received > limit:
                    raise ServiceError(413, f"request body exceeds the limit of {limit} bytes")
                if chunked:  # no length declared: admitted as it arrives
                    self.inflight_bytes += len(body)
                    reserved += len(body)
                    if self.inflight_bytes > settings.max_inflight_body_bytes:
                        state.metrics.cached(state.metrics.admission_refused, "bytes").inc()
                        raise ServiceError(
                            503,
                            "server busy: too many request bytes admitted; retry shortly",
                            {"Retry-After": "1"},
                        )
            if not message.get("more_body", False):
                waiting.pop(task, None)
            return message

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        endpoint = None
        try:
            match = _INFER_PATH.match(path) if scope["method"] == "POST" else None
            if match is None:
                await self.app(scope, limited_receive, send_status)
            else:  # the hot path: straight to the handler, same answers as the route
                name, version = match.groups()
                endpoint = INFER_VERSION_ROUTE if version is not None else INFER_ROUTE
                response = await _fast_infer(state, scope, limited_receive, name, version, auth)
                await response(scope, receive, send_status)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            task.uncancel()
            log.info(
                "request body from %s not complete after %.0f s (%d bytes); answered 408",
                _peer_of(scope),
                settings.body_timeout_s,
                received,
            )
            msg = f"request body not received within {settings.body_timeout_s:g} s"
            await _error(408, msg, {"Connection": "close"})(scope, receive, send_status)
        finally:
            waiting.pop(task, None)
            self.inflight_bytes -= reserved
            if ticket is not None:
                ticket.close()
            self.busy_poll.touch()
            if endpoint is None:
                endpoint = getattr(scope.get("route"), "path", "other")
            m = state.metrics
            key = (endpoint, scope["method"], str(status[0]))
            counts, latencies = m.http_requests.children, m.http_latency.children
            (counts.get(key) or m.http_requests.labels(*key)).inc()
            (latencies.get(key[:1]) or m.http_latency.labels(endpoint)).observe(
                time.perf_counter() - t0
            )


#: the status recorded for a request whose client went away before it was read (nginx's
#: convention; nothing is sent, the connection is gone)
CLIENT_CLOSED = 499


def _client_gone(request: Request) -> Response:
    log.info(
        "client %s closed the connection during %s %s",
        _peer(request),
        request.method,
        request.url.path,
    )
    return Response(status_code=CLIENT_CLOSED)


def _peer(request: Request) -> str:
    return _peer_of(request.scope)


def _peer_of(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
