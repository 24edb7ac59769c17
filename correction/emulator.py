"""A neural emulator of the host model's step, for gradients the host cannot give.

``Emulator.step(x) = x + dt * net(x)``: the network learns the host's one-step
increment per unit time. It is saved like a correction model (same artifact
format, ``kind: emulator``) and is differentiable, so fine-tuning can take the
Jacobian of a black-box host from it (Frezat et al. 2023). This module is the
inference side; training lives in :mod:`correction.training.emulator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import artifacts
from .layout import ModelLayout
from .networks import CorrectionModel


class Emulator:
    """A trained emulator: a differentiable stand-in for ``host.step``."""

    differentiable = True

    def __init__(self, model: CorrectionModel, config: dict[str, Any]) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = config
        self.layout = ModelLayout.from_dict(config["layout"])
        self.dt = float(config["emulator"]["dt"])
        self.name = f"emulator[{config['emulator']['host']}]"
        self.state_shape = self.layout.state_shape

    @classmethod
    def load(cls, path: str | Path) -> Emulator:
        model, config = artifacts.load(path)
        if config.get("kind") != "emulator":
            raise artifacts.ArtifactError(
                f"{path} is a {config.get('kind')!r} artifact, not an emulator"
            )
        return cls(model, config)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One emulated host step; gradients flow to ``x`` (weights stay frozen)."""
        packed = self.layout.pack(x.reshape(-1, *self.state_shape).to(self.model.in_mean.dtype))
        delta = self.layout.unpack(self.model(packed)).reshape(x.shape).to(x.dtype)
        return x + self.dt * delta
