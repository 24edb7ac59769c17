"""The served model repository: ``loaded`` holds one version in memory, ``registry``
finds, loads, swaps and resolves versions. Rendering them in the protocol is the
routers' job (:mod:`service.routers`).
"""

from __future__ import annotations

from .loaded import LoadedModel
from .registry import ModelRepository, ModelSlot, VersionStatus

__all__ = ["LoadedModel", "ModelRepository", "ModelSlot", "VersionStatus"]
