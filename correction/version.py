"""The installed distribution's version, read once from its metadata.

Every layer reports the same string (artifacts record it, the service answers it, the
CLI prints it), so it lives in the lowest layer and comes from the installed
distribution rather than a constant restated per package.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("mecs")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
