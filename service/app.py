"""The FastAPI application: lifespan, middleware, error answers, routers, OpenAPI.

``create_app(settings)`` builds the app; the repository is loaded in the
lifespan (so a TestClient or uvicorn start-up loads it and shutdown drains it).
After start-up the service calls ``gc.freeze()``: with tens of requests in flight
the cyclic collector otherwise walks every long-lived object (torch modules,
FastAPI routes) and pauses the server for ~100 ms every few hundred ms; frozen,
those objects are skipped and tail latency drops by an order of magnitude.
``torch.set_num_threads(settings.torch_threads)`` (1 by default) keeps a small
forward from fighting the event loop for the machine's cores.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import inspect
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from correction.version import __version__

from .auth import KeyStore, check_key
from .errors import ServiceError
from .metrics import ServiceMetrics
from .repository import ModelRepository
from .routers.models import handle_infer
from .settings import ServiceSettings, SettingsError, load_settings
from .shm import SharedMemoryRegistry

log = logging.getLogger("mecs.service")

DESCRIPTION = """Per-timestep tendency corrections over the Open Inference Protocol (KServe v2)
with the binary tensor extension, micro-batching, a hot-reloading model repository,
bearer API keys and Prometheus metrics."""


def tune_malloc(threshold: int) -> bool:
    """Have glibc serve allocations below ``threshold`` bytes from the heap; True if it took.

    By default glibc maps every allocation above 128 KB afresh with ``mmap`` and
    unmaps it on free, so each chunk of a large request body (uvicorn copies them
    in ~256 KB pieces) and each large array costs page faults on first touch. For
    a 4 MB state that was most of the body's read time (5-9 ms against 2.2-2.4 ms
    with the heap, ``bench/service.py``). The trim threshold is raised with it
    so freed memory is kept for the next request: the process keeps up to
    ``4 * threshold`` bytes of freed heap instead of returning it to the system.
    A no-op (False) where the C library has no ``mallopt`` (musl, macOS).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    threshold = min(int(threshold), 32 << 20)  # glibc's ceiling on 64-bit
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(
        mallopt(m_trim_threshold, 4 * threshold)
    )


class MecsApp(FastAPI):
    """The FastAPI app with :class:`ServiceMiddleware` in front of all of it.

    Installed with ``add_middleware`` the middleware would sit inside FastAPI's own
    layers (its error, telemetry and body-limit wrappers, ~30 us per request on a
    2-core machine); in front, an infer call goes from uvicorn to its handler
    through one layer, and every other request still passes all of FastAPI.
    """

    front: Any = None

    async def __call__(self, scope, receive, send) -> None:
        front = self.front
        if front is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
        else:
            await front(scope, receive, send)

    async def inner(self, scope, receive, send) -> None:
        """FastAPI as it would be without the front layer."""
        await super().__call__(scope, receive, send)


@dataclass
class ServiceState:
    """What the routers reach through ``request.app.state.mecs``."""

    settings: ServiceSettings
    keys: KeyStore
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    repository: ModelRepository | None = None
    executor: ThreadPoolExecutor | None = None
    shared_memory: SharedMemoryRegistry | None = None
    started_at: float = field(default_factory=time.time)


def _check_auth_config(settings: ServiceSettings, keys: KeyStore) -> None:
    """No keys: allowed on loopback (with a warning) or with ``allow_anonymous``."""
    if keys.enabled:
        return
    if not settings.is_loopback and not settings.allow_anonymous:
        raise SettingsError(
            f"no API keys configured and host {settings.host} is not loopback: set "
            "MECS_INFERENCE_KEYS / MECS_ADMIN_KEYS or MECS_API_KEYS_FILE, or "
            "MECS_ALLOW_ANONYMOUS=true to serve without authentication"
        )
    log.warning(
        "AUTHENTICATION DISABLED: no API keys configured; every endpoint, including "
        "load/unload, is open to anyone who can reach %s",
        settings.host,
    )


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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg')}")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc: ClientDisconnect):
        return _client_gone(request)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # never leak a traceback to callers
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def _install_openapi(app: FastAPI) -> None:
    from .schemas import InferRequestDoc

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {})
        req = InferRequestDoc.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.setdefault("schemas", {}).update(req.pop("$defs", {}))
        comps["schemas"]["InferRequest"] = req
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        body = {
            "required": True,
            "description": "JSON, or the binary tensor extension: a JSON header of "
            "Inference-Header-Content-Length bytes followed by raw little-endian tensors.",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
        for path, item in schema.get("paths", {}).items():
            if path.endswith("/infer") and "post" in item:
                item["post"]["requestBody"] = body
        app.openapi_schema = schema
        return schema

    app.openapi = build


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the service for ``settings`` (default: from the environment).

    Raises :class:`~service.settings.SettingsError` for settings that must not
    start a server (no repository; no keys on a non-loopback host).
    """
    from .routers import health, metrics, models, repository, shm

    settings = settings or load_settings()
    if settings.repository is None:
        raise SettingsError("no model repository: pass --repository DIR or set MECS_REPOSITORY")
    try:
        keys = KeyStore(settings.keys_by_scope())
    except ValueError as err:
        raise SettingsError(str(err)) from None
    _check_auth_config(settings, keys)
    if "MECS_TORCHSCRIPT" in os.environ:  # replaced by MECS_RUNTIME; say so, do not ignore quietly
        log.warning(
            "MECS_TORCHSCRIPT is no longer read: choose the runtime with MECS_RUNTIME "
            "(onnxruntime, torchscript or eager; now %s)",
            settings.runtime,
        )
    state = ServiceState(settings=settings, keys=keys)
    state.shared_memory = SharedMemoryRegistry(
        settings.shared_memory,
        settings.shared_memory_root,
        settings.max_shared_memory_regions,
        settings.max_shared_memory_bytes,
        settings.shared_memory_idle_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        state.executor = ThreadPoolExecutor(1, thread_name_prefix="mecs-forward")
        repo = ModelRepository(settings.repository, settings, state.metrics, state.executor)
        await repo.start()
        state.repository = repo
        n = sum(s.default is not None for s in repo.slots.values())
        log.info("serving %d model(s) from %s", n, settings.repository)
        if settings.malloc_mmap_threshold_mb:
            tune_malloc(settings.malloc_mmap_threshold_mb << 20)
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await repo.stop()
            state.executor.shutdown(wait=True)
            state.shared_memory.close()

    docs = settings.docs_enabled
    # FastAPI asks OpenTelemetry for its providers on every request unless told not
    # to (~10 us, 2-5 % of an infer call); the service exports Prometheus metrics.
    # (older FastAPI releases have no native telemetry and no such argument)
    otel = settings.opentelemetry
    extra: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        extra["telemetry"] = {"tracing": otel, "metrics": otel, "logs": otel}
    app = MecsApp(
        **extra,
        title="mecs correction service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.mecs = state
    app.front = ServiceMiddleware(app.inner, state)
    _install_error_handlers(app)
    for module in (models, health, repository, shm, metrics):  # infer first: fewest matches
        app.include_router(module.router)
    _install_openapi(app)
    return app
