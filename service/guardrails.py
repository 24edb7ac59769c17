"""Guardrails on what a correction may do: magnitude cap and out-of-distribution flag.

A learned correction is only trustworthy near its training data. Two checks run on
every batch, in the server and in the in-process forecast alike (so both paths give
the same numbers):

- the *cap* clips each value to ``mean +/- k * std`` of the training targets of its
  channel (``k = correction_cap_std``), so one wild output cannot blow up a forecast;
- the *out-of-distribution flag* marks a sample whose input lies more than
  ``ood_threshold_std`` training stds from the training mean in some channel
  (:meth:`correction.inference.Corrector.out_of_distribution`).
"""

from __future__ import annotations

import numpy as np

from correction.inference import Corrector


class Guardrails:
    """Per-channel cap bounds and the OOD threshold of one model version."""

    def __init__(
        self, corrector: Corrector, cap_std: float | None, ood_threshold_std: float | None
    ) -> None:
        self.corrector = corrector
        self.channels = corrector.layout.channels
        self.cap_std = cap_std or None
        self.ood_threshold_std = ood_threshold_std
        norm = corrector.config.get("normalisation", {})
        mean = np.asarray(norm.get("out_mean", np.zeros(self.channels)), dtype=np.float64)
        std = np.asarray(corrector.out_std, dtype=np.float64)
        if self.cap_std is not None:
            self.lo = (mean - self.cap_std * std)[None, :, None]
            self.hi = (mean + self.cap_std * std)[None, :, None]
            # fast path: a batch inside the tightest bounds of all channels needs no clip
            margin = 1e-6 * std.min()
            self.lo_fast, self.hi_fast = self.lo.max() + margin, self.hi.min() - margin
        if self.ood_threshold_std:
            in_mean, in_std = corrector.in_mean, corrector.in_std
            margin = 1e-6 * in_std.min()
            self.in_lo_fast = (in_mean - self.ood_threshold_std * in_std).max() + margin
            self.in_hi_fast = (in_mean + self.ood_threshold_std * in_std).min() - margin

    def apply(
        self, state: np.ndarray, corr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(capped correction, OOD flag per sample, number of capped values per sample)``."""
        n = state.shape[0]
        ood = np.zeros(n, dtype=bool)
        if self.ood_threshold_std and not (
            state.min() >= self.in_lo_fast and state.max() <= self.in_hi_fast
        ):
            ood = self.corrector.out_of_distribution(state, self.ood_threshold_std)
        capped = np.zeros(n, dtype=np.int64)
        if self.cap_std is not None and not (
            corr.min() >= self.lo_fast and corr.max() <= self.hi_fast
        ):
            packed = corr.reshape(n, self.channels, -1)
            out = (packed < self.lo) | (packed > self.hi)
            if out.any():
                capped = out.reshape(n, -1).sum(axis=1)
                packed = np.clip(packed, self.lo, self.hi).astype(corr.dtype)
                corr = packed.reshape(corr.shape)
        return corr, ood, capped
