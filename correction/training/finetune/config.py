"""Settings of ``mecs finetune`` (defined with the other stages' in ``..settings``)."""

from __future__ import annotations

from ..settings import MODES, FinetuneConfig

__all__ = ["MODES", "FinetuneConfig"]
