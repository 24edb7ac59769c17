"""Settings of ``mecs finetune``: one dataclass, its defaults the only ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import settings_from_dict
from .strategies import STRATEGIES


@dataclass
class FinetuneConfig:
    """Settings of ``mecs finetune`` (a JSON/TOML ``--config`` file overrides them)."""

    mode: str = "hybrid"
    # 10 analysis intervals (0.5 MTU) with lr 1e-3 gained more valid time on l96-2s
    # than 4 intervals with 3e-4 (bench/online.py, both settings in docs/results.md).
    unroll: int = 10
    curriculum: list[int] | None = None  # e.g. [1, 4, 10]: equal shares of iterations
    iterations: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    val_every: int = 50
    val_windows: int = 256
    val_fraction: float = 0.1
    sip_damping: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in STRATEGIES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {list(STRATEGIES)}")
        if self.unroll < 1:
            raise ValueError(f"unroll must be at least 1, got {self.unroll}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        return settings_from_dict(cls, d, "finetune")

    def unroll_at(self, iteration: int) -> int:
        if not self.curriculum:
            return self.unroll
        share = self.iterations / len(self.curriculum)
        return int(self.curriculum[min(int(iteration / share), len(self.curriculum) - 1)])

    @property
    def max_unroll(self) -> int:
        return max(self.curriculum) if self.curriculum else self.unroll
