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

import ctypes
import gc
import inspect
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from correction.version import __version__

from .auth import KeyStore
from .cpulatency import CpuLatencyRequest
from .errors import ServiceError
from .metrics import ServiceMetrics
from .middleware import ServiceMiddleware, _client_gone, _error
from .recorder import Recorder
from .repository import ModelRepository
from .settings import ServiceSettings, SettingsError, load_settings
from .shadow import Shadow
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
    cpu_latency: CpuLatencyRequest | None = None
    shared_memory: SharedMemoryRegistry | None = None
    shadow: Shadow | None = None  # shadow mode (settings.shadow)
    recorder: Recorder | None = None  # samples for mecs monitor (settings.record_dir)
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
        if settings.shadow:
            state.shadow = Shadow(state.metrics, settings.shadow_max_in_flight)
        if settings.record_dir:
            state.recorder = Recorder(
                settings.record_dir,
                settings.record_fraction,
                settings.record_file_samples,
                settings.record_max_files,
                state.metrics,
            )
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
        if settings.cpu_latency_qos_us is not None:
            state.cpu_latency = CpuLatencyRequest(settings.cpu_latency_qos_us)
            state.cpu_latency.open()
        try:
            yield
        finally:
            if state.cpu_latency is not None:
                state.cpu_latency.close()
            if state.shadow is not None:
                await state.shadow.drain()
            if state.recorder is not None:
                await state.recorder.close()
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
