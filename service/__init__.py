"""The correction service: FastAPI app, protocol, batching, repository, client, forecast.

Importing :mod:`service` is cheap: the server side (FastAPI, torch) loads only when
``create_app``/``serve`` are used, so a host model's process can use
:class:`service.client.CorrectionClient` with numpy and the standard library alone.
Only the inference side of :mod:`correction` is imported, never training code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CorrectionClient", "ServiceSettings", "create_app", "load_settings"]

_LAZY = {
    "CorrectionClient": "service.client",
    "ServiceSettings": "service.settings",
    "load_settings": "service.settings",
    "create_app": "service.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
