"""Online fine-tuning: the corrected model unrolled in time against later analyses.

``strategies`` holds the modes (registered by name), ``sip`` the scale-invariant
physics update, ``config`` the settings and ``loop`` the training loop that
publishes a new version. The modes are described in :mod:`.strategies`.
"""

from __future__ import annotations

from .config import FinetuneConfig
from .loop import FinetuneResult, finetune, split_windows
from .sip import sip_loss
from .strategies import MODES, NEEDS_EMULATOR, STRATEGIES, Strategy, make_strategy, register

__all__ = [
    "MODES",
    "NEEDS_EMULATOR",
    "STRATEGIES",
    "FinetuneConfig",
    "FinetuneResult",
    "Strategy",
    "finetune",
    "make_strategy",
    "register",
    "sip_loss",
    "split_windows",
]
