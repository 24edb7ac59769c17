"""Bearer API keys with two scopes: ``inference`` and ``admin`` (admin implies inference).

Keys come from the settings (environment or a secrets file), never from code. Only
their sha256 digests are kept in memory, and a presented key is compared against
every stored digest with :func:`hmac.compare_digest`, so neither the keys nor the
timing of a comparison leak which prefix matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .errors import ServiceError

log = logging.getLogger("mecs.service")

SCOPES = ("inference", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the scope of the key (``anonymous`` when auth is off).

    ``key_id`` tells keys apart without holding them (the first bytes of the key's
    digest, hex): what a caller registers, such as a shared-memory region, is its
    own and no other key's.
    """

    scope: str
    key_id: str = "anonymous"


def _digest(key: str) -> bytes:
    if key.startswith("sha256:"):
        try:
            raw = bytes.fromhex(key[7:])
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError("a 'sha256:' key must be followed by 64 hex digits")
        return raw
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """Digests of the configured keys by scope; empty means authentication is off."""

    def __init__(self, keys_by_scope: dict[str, list[str]]) -> None:
        self.entries: list[tuple[bytes, str]] = []
        for scope in SCOPES:
            for key in keys_by_scope.get(scope, []):
                self.entries.append((_digest(key), scope))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def scope_of(self, token: str) -> str | None:
        """The highest scope the token grants, or None; always checks every entry."""
        return self.lookup(token)[0]

    def lookup(self, token: str) -> tuple[str | None, str]:
        """``(highest scope or None, key id)``; always checks every entry."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, scope in self.entries:
            if hmac.compare_digest(stored, digest) and found != "admin":
                found = scope
        return found, digest[:8].hex()


def authenticate(request: Request, need: str) -> Principal:
    """The caller's principal if its key grants ``need``; 401/403 otherwise."""
    return check_key(request.app.state.mecs, request.headers.get("authorization", ""), need)


def check_key(state, header: str, need: str) -> Principal:
    """:func:`authenticate` on the raw ``Authorization`` header (the ASGI hot path)."""
    keys: KeyStore = state.keys
    if not keys.enabled:
        return ANONYMOUS
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        state.metrics.auth_failures.labels("missing").inc()
        raise ServiceError(
            401,
            "missing bearer API key (send 'Authorization: Bearer <key>')",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scope, key_id = keys.lookup(token.strip())
    if scope is None:
        state.metrics.auth_failures.labels("invalid").inc()
        raise ServiceError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    if need == "admin" and scope != "admin":
        state.metrics.auth_failures.labels("scope").inc()
        raise ServiceError(403, "this API key has the inference scope; this endpoint needs admin")
    return Principal(scope, key_id)


ANONYMOUS = Principal("anonymous")


async def require_inference(request: Request) -> Principal:
    """Dependency: any valid key (async, so FastAPI does not hop to a thread pool)."""
    return authenticate(request, "inference")


async def require_admin(request: Request) -> Principal:
    """Dependency: an admin key."""
    return authenticate(request, "admin")


async def require_metrics(request: Request) -> Principal:
    """Dependency: open unless ``metrics_require_auth`` is set, then admin."""
    if not request.app.state.mecs.settings.metrics_require_auth:
        return Principal("anonymous")
    return authenticate(request, "admin")


InferenceScope = Annotated[Principal, Depends(require_inference)]
AdminScope = Annotated[Principal, Depends(require_admin)]
MetricsScope = Annotated[Principal, Depends(require_metrics)]
