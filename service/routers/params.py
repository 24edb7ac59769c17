"""Path and body parameters shared by the routers."""

from __future__ import annotations

from ..errors import ServiceError


def parse_version(version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit() or len(version) > 9 or int(version) < 1:
        raise ServiceError(400, f"model version {version!r} is not a positive integer")
    return int(version)
