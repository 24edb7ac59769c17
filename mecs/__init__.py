"""mecs: model-error correction for weather and climate models."""

__version__ = "0.1.0"
