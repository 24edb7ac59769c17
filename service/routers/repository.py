"""The model repository extension (admin scope): index, load, unload.

Load takes no path, config or file from the client: it only (re)reads the
server's own repository. The one accepted parameter, ``version``, pins the
model's default version (a rollback); a load without it follows the newest.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from correction.artifacts import ArtifactError, check_name

from ..auth import AdminScope
from ..errors import ServiceError
from ..protocol import ProtocolError, loads_json
from ..repository import VersionStatus
from ..schemas import ERRORS, RepositoryEntry
from .params import parse_version

router = APIRouter(prefix="/v2/repository", tags=["repository"], responses=ERRORS)


def _name(name: str) -> str:
    try:
        return check_name(name)
    except ArtifactError as err:
        raise ServiceError(400, str(err)) from None


def _json(body: bytes):
    try:
        return loads_json(body, "request body")
    except ProtocolError as err:
        raise ServiceError(400, err.message) from None


async def _parameters(request: Request) -> dict:
    body = await request.body()
    if not body.strip():
        return {}
    data = _json(body)
    if not isinstance(data, dict):
        raise ServiceError(400, "request body must be a JSON object")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServiceError(400, "'parameters' must be a JSON object")
    unknown = sorted(set(params) - {"version"})
    if unknown:
        raise ServiceError(
            400,
            f"parameter '{unknown[0]}' is not accepted: this server loads models only from "
            "its own repository (no configs, files or paths from requests)",
        )
    return params


def _render(statuses: list[VersionStatus]) -> list[dict[str, str]]:
    """The repository index in the protocol's words: READY or UNAVAILABLE, and why."""
    return [
        {
            "name": s.name,
            "version": str(s.version),
            "state": "READY" if s.ready else "UNAVAILABLE",
            "reason": s.reason,
            "stage": s.stage,
        }
        for s in statuses
    ]


@router.get("/index", response_model=list[RepositoryEntry])
async def index_get(request: Request, _: AdminScope) -> list[dict]:
    """Every version on disk with its state (READY when loaded)."""
    return _render(await request.app.state.mecs.repository.statuses())


@router.post("/index", response_model=list[RepositoryEntry])
async def index_post(request: Request, _: AdminScope) -> list[dict]:
    """Same as GET (Triton's clients POST here)."""
    body = await request.body()
    entries = _render(await request.app.state.mecs.repository.statuses())
    data = _json(body) if body.strip() else {}
    if not isinstance(data, dict):
        raise ServiceError(400, 'request body must be a JSON object like {"ready": true}')
    ready_only = bool(data.get("ready"))
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


@router.post("/models/{name}/load")
async def load(request: Request, name: str, _: AdminScope) -> dict:
    """(Re)load ``name`` from the repository and swap it in atomically."""
    params = await _parameters(request)
    raw = params.get("version")
    version = parse_version(str(raw)) if raw is not None else None
    model = await request.app.state.mecs.repository.load(_name(name), version)
    return {"name": model.name, "version": model.version_str, "pinned": version is not None}


@router.post("/models/{name}/unload")
async def unload(request: Request, name: str, _: AdminScope) -> dict:
    """Stop serving ``name``; requests already running finish on their version."""
    await _parameters(request)
    await request.app.state.mecs.repository.unload(_name(name))
    return {"name": name, "unloaded": True}
