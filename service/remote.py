"""The service as a :class:`~correction.corrections.Correction`: one request per step.

What a Python host model (or ``mecs forecast --service``) steps with: the whole
ensemble goes in one batched infer request, the client's degradation policy and
circuit breaker apply, and the version that answered is tracked step by step.
Lives beside the client, not in it, because the client imports no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from correction.corrections import Correction

from .client import CorrectionClient


class RemoteCorrection(Correction):
    """Corrections from the service: one request per step for all members."""

    def __init__(self, client: CorrectionClient, dt: float | None = None) -> None:
        self.client = client
        self.dt = dt
        self.name = client.model
        self.version: int | None = None
        self.ood_sample_steps = 0
        self.capped_values = 0
        self._seen: object = None

    @property
    def description(self) -> str:
        return f"service {self.client.url} model {self.client.model}"

    @property
    def degraded_steps(self) -> int:
        return self.client.degraded_steps

    def numpy(self, state: np.ndarray) -> np.ndarray:
        corr = self.client.correct(state, dt=self.dt)
        last = self.client.last_result
        if last is not None and last is not self._seen:  # a fresh answer, not a degraded one
            self._seen = last
            self.version = last.model_version
            self.ood_sample_steps += sum(last.out_of_distribution)
            self.capped_values += last.capped_values
        return corr

    def variables(self) -> list[dict[str, Any]]:
        return self.client.metadata()["parameters"]["variables"]


__all__ = ["RemoteCorrection"]
