"""The training stages' settings: one dataclass per stage, its defaults the only ones.

``mecs pretrain``, ``mecs emulator`` and ``mecs finetune`` build these from a
``--config`` file plus flags; the deployment's settings (:mod:`mecs.settings`) take
their job defaults from here. Torch-free, so reading settings stays cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_dict(cls: type[T], values: dict[str, Any], stage: str) -> T:
    """``cls(**values)``, refusing unknown names with a message that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {stage} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


#: the fine-tuning modes; each is a strategy registered under this name
#: (:mod:`correction.training.finetune.strategies`), and registering another name fails
MODES = ("one-step", "unrolled", "emulator", "hybrid", "differentiable", "sip")


@dataclass
class PretrainConfig:
    """Settings of ``mecs pretrain`` (a JSON/TOML ``--config`` file overrides them)."""

    # Column-wise by default: with noisy analyses a horizontal stencil learns to
    # "denoise" the initial state from its neighbours (the increment's noise is
    # correlated with the input's), which scores a priori but hurts forecasts.
    network: str = "column-mlp"
    params: dict[str, Any] = field(default_factory=lambda: {"hidden": 64, "depth": 3})
    fields: list[str] | None = None
    batch_size: int = 256
    max_epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 2
    early_stopping: int = 6
    min_delta: float = 1e-4
    buffer_chunks: int = 4
    seed: int = 0
    threads: int | None = None
    # cpu, cuda or auto (a GPU when one is visible); under torchrun, each rank's GPU.
    # CPU unless asked: a GPU changes the numbers a seed gives
    device: str = "cpu"
    # uniform, or sift: backpropagate on the highest early-exit losses of a pool of
    # sift_pool batches, sift_floor of each batch drawn uniformly (training/sampling.py);
    # uniform by default: docs/pretrain.md (loss-prioritised sampling) has the measurement
    sampling: str = "uniform"
    sift_pool: int = 4
    sift_floor: float = 0.25

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "sift"):
            raise ValueError(f"sampling must be 'uniform' or 'sift', got {self.sampling!r}")
        if isinstance(self.sift_pool, bool) or not isinstance(self.sift_pool, int):
            raise ValueError(f"sift_pool must be an integer >= 1, got {self.sift_pool!r}")
        if self.sift_pool < 1:
            raise ValueError(f"sift_pool must be an integer >= 1, got {self.sift_pool!r}")
        if not isinstance(self.sift_floor, int | float) or not 0 <= self.sift_floor <= 1:
            raise ValueError(f"sift_floor must lie in [0, 1], got {self.sift_floor!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        return settings_from_dict(cls, d, "pretrain")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EmulatorConfig:
    network: str = "bilinear-cnn"
    params: dict[str, Any] = field(default_factory=lambda: {"hidden": 24, "kernel": 5})
    n_states: int = 20000
    perturbations: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0)
    rollout_steps: int = 20
    batch_size: int = 256
    epochs: int = 20
    lr: float = 2e-3
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmulatorConfig:
        d = dict(d)
        if "perturbations" in d:
            d["perturbations"] = tuple(d["perturbations"])
        return settings_from_dict(cls, d, "emulator")


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
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {list(MODES)}")
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
