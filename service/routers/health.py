"""Server metadata and health (open: probes and load balancers carry no keys)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from correction.version import __version__

from ..schemas import ServerMetadata

router = APIRouter(tags=["server"])

EXTENSIONS = ["binary_tensor_data", "model_repository", "mecs_guardrails"]


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict:
    """Server name, version and protocol extensions."""
    extensions = list(EXTENSIONS)
    if request.app.state.mecs.settings.shared_memory:
        extensions.append("system_shared_memory")
    return {"name": "mecs", "version": __version__, "extensions": extensions}


@router.get("/v2/health/live")
async def live() -> dict:
    """200 while the process answers."""
    return {"live": True}


@router.get("/v2/health/ready", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    """200 once start-up finished and at least one model is loaded, 503 otherwise."""
    repo = request.app.state.mecs.repository
    ok = repo is not None and repo.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)
