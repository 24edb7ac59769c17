"""mecs: model-error correction for weather and climate models."""

from correction.version import __version__

__all__ = ["__version__"]
