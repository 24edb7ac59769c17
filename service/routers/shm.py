"""The system shared-memory extension (inference scope): register, status, unregister.

Paths and bodies as Triton's ``/v2/systemsharedmemory`` extension; the regions a
key registers are that key's alone (:mod:`service.shm`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..auth import Principal, require_inference
from ..errors import ServiceError
from ..protocol import ProtocolError, loads_json
from ..schemas import ERRORS

router = APIRouter(prefix="/v2/systemsharedmemory", tags=["shared memory"], responses=ERRORS)

Caller = Annotated[Principal, Depends(require_inference)]


def _registry(request: Request):
    return request.app.state.mecs.shared_memory


@router.get("/status")
async def status_all(request: Request, caller: Caller) -> list[dict]:
    """The regions this key has registered."""
    return _registry(request).status(caller.key_id)


@router.get("/region/{name}/status")
async def status_one(request: Request, name: str, caller: Caller) -> list[dict]:
    """One region of this key (404 when this key has none of that name)."""
    return _registry(request).status(caller.key_id, name)


@router.post("/region/{name}/register")
async def register(request: Request, name: str, caller: Caller) -> dict:
    """Map ``byte_size`` bytes at ``offset`` of the shared-memory object ``key``."""
    registry = _registry(request)
    registry.require_enabled()
    body = await request.body()
    try:
        data = loads_json(body, "request body")
    except ProtocolError as err:
        raise ServiceError(400, err.message) from None
    if not isinstance(data, dict):
        raise ServiceError(400, "request body must be a JSON object with 'key' and 'byte_size'")
    unknown = sorted(set(data) - {"key", "offset", "byte_size"})
    if unknown:
        raise ServiceError(400, f"unknown field '{unknown[0]}' (have key, offset, byte_size)")
    if "key" not in data or "byte_size" not in data:
        raise ServiceError(400, "'key' and 'byte_size' are required")
    region = registry.register(
        caller.key_id, name, data["key"], data.get("offset", 0), data["byte_size"]
    )
    return region.status()


@router.post("/region/{name}/unregister")
async def unregister(request: Request, name: str, caller: Caller) -> dict:
    """Drop one region of this key."""
    return {"unregistered": _registry(request).unregister(caller.key_id, name)}


@router.post("/unregister")
async def unregister_all(request: Request, caller: Caller) -> dict:
    """Drop every region of this key."""
    return {"unregistered": _registry(request).unregister(caller.key_id)}
