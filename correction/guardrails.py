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

import math
from typing import Any, NamedTuple

import numpy as np

from .corrections import Correction
from .inference import Corrector
from .runtime import build_runtime, model_dtype


class Guarded(NamedTuple):
    """One guarded forward: what :meth:`GuardedCorrector.run` returns.

    ``finite`` is True when the cap's min/max pass already showed every value of the
    correction finite (a NaN makes ``min`` NaN), so the service need not check again;
    None when nothing was learned (no cap). ``into`` is True when the correction is
    the ``out`` array the caller passed.
    """

    correction: np.ndarray
    out_of_distribution: np.ndarray
    capped: np.ndarray
    finite: bool | None = None
    into: bool = False


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
        self,
        state: np.ndarray,
        corr: np.ndarray,
        state_bounds: tuple[float, float] | None = None,
    ) -> Guarded:
        """The capped correction, OOD flag and capped values per sample, and whether
        the cap's pass showed the correction finite. ``state_bounds``: the state's
        min and max when the caller has them (the service's input check computes
        them), so the OOD fast path does not pass over the state again. The cap
        clips ``corr`` in place."""
        n = state.shape[0]
        ood = np.zeros(n, dtype=bool)
        if self.ood_threshold_std:
            lo, hi = state_bounds if state_bounds is not None else (state.min(), state.max())
            if not (lo >= self.in_lo_fast and hi <= self.in_hi_fast):
                ood = self.corrector.out_of_distribution(state, self.ood_threshold_std)
        capped = np.zeros(n, dtype=np.int64)
        finite = None
        if self.cap_std is not None:
            cmin, cmax = corr.min(), corr.max()
            finite = math.isfinite(cmin) and math.isfinite(cmax)
            if not (cmin >= self.lo_fast and cmax <= self.hi_fast):
                packed = corr.reshape(n, self.channels, -1)
                out = (packed < self.lo) | (packed > self.hi)
                if out.any():
                    capped = out.reshape(n, -1).sum(axis=1)
                    np.clip(packed, self.lo, self.hi, out=packed)  # NaN stays NaN
        return Guarded(corr, ood, capped, finite)


class GuardedCorrector:
    """A corrector's network in an inference runtime, then the guardrails.

    The one forward path of the service (per model version) and of in-process
    forecasts, so both give the same numbers. ``runtime``, ``threads`` and
    ``arena`` are :func:`correction.runtime.build_runtime`'s.
    """

    def __init__(
        self,
        corrector: Corrector,
        cap_std: float | None,
        ood_threshold_std: float | None,
        runtime: str = "onnxruntime",
        threads: int = 1,
        arena: bool = False,
        label: str | None = None,
        max_values: int | None = None,
    ) -> None:
        self.guard = Guardrails(corrector, cap_std, ood_threshold_std)
        self.max_values = max_values
        self.dtype = model_dtype(corrector.model)
        # the network takes [B, C, *H]: a state [B, *state_shape] is that layout
        # already (several fields) or a reshape of it (one field)
        layout = corrector.layout
        self.packed = (layout.channels, *layout.horizontal_shape)
        self.runtime = build_runtime(
            corrector.model,
            self.packed,
            runtime,
            threads,
            label=label or f"model '{corrector.name}'",
            arena=arena,
        )

    def __call__(
        self, state: np.ndarray, forcings: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(capped correction, OOD flag per sample, capped values per sample)``.

        ``state`` is ``[B, *state_shape]``, contiguous, in :attr:`dtype`.
        """
        return self.run(state, forcings)[:3]

    def run(
        self,
        state: np.ndarray,
        forcings: np.ndarray | None = None,
        out: np.ndarray | None = None,
        state_bounds: tuple[float, float] | None = None,
    ) -> Guarded:
        """The guarded forward with what the guardrails learned (:class:`Guarded`).

        ``out`` (``state``'s shape and dtype, contiguous; a caller's shared-memory
        region) receives the correction: the runtime writes into it where it can
        (ONNX Runtime's I/O binding) and the cap clips it in place, so a large
        answer is never copied. ``state_bounds``: see :meth:`Guardrails.apply`.
        """
        n = state.shape[0]
        packed = state.reshape(n, *self.packed)
        if out is not None and (
            out.shape != state.shape or out.dtype != self.dtype or not out.flags.c_contiguous
        ):
            out = None  # not a buffer this forward can fill: an array of its own
        y = None if out is None else out.reshape(packed.shape)
        into = getattr(self.runtime, "run_into", None)
        if self.max_values is None or state.size <= self.max_values:
            if y is not None and into is not None:
                into(packed, forcings, y)
            elif y is not None:
                y[...] = self.runtime(packed, forcings)
            else:
                y = self.runtime(packed, forcings)
        else:  # in pieces: the network's working memory is that of one piece
            per = max(1, self.max_values // max(1, packed[0].size))
            if y is None:
                y = np.empty(packed.shape, dtype=self.dtype)
            for i in range(0, n, per):
                f = None if forcings is None else forcings[i : i + per]
                if into is not None:
                    into(packed[i : i + per], f, y[i : i + per])
                else:
                    y[i : i + per] = self.runtime(packed[i : i + per], f)
        res = self.guard.apply(state, y.reshape(state.shape), state_bounds)
        return res if out is None else res._replace(correction=out, into=True)


class GuardedCorrection(Correction):
    """A corrector in this process, with the service's runtime and guardrails.

    The in-process side of a coupled forecast: the same forward path as the
    service (:class:`GuardedCorrector`), so a run over HTTP equals a run in process.
    Counts the samples flagged out of distribution and the values capped.
    """

    def __init__(
        self,
        corrector: Corrector,
        cap_std: float | None = 10.0,
        ood_threshold_std: float = 6.0,
        runtime: str = "onnxruntime",
    ) -> None:
        self.corrector = corrector
        # one model, one steady state size: ONNX Runtime's memory arena pays here
        self.forward = GuardedCorrector(corrector, cap_std, ood_threshold_std, runtime, arena=True)
        self.dtype = self.forward.dtype
        self.version = int(corrector.version) if corrector.version is not None else None
        self.name = corrector.name
        self.ood_sample_steps = 0
        self.capped_values = 0
        # the model's correction unit to the host's (1: the same unit)
        self.time_scale = 1.0

    @property
    def description(self) -> str:
        return f"in-process {self.corrector.name} v{self.version}"

    def numpy(self, state: np.ndarray) -> np.ndarray:
        self.corrector.layout.check_state(state)
        corr, ood, capped = self.forward(np.ascontiguousarray(state, dtype=self.dtype))
        self.ood_sample_steps += int(ood.sum())
        self.capped_values += int(capped.sum())
        if self.time_scale != 1.0:
            corr = corr * self.time_scale
        return corr.astype(state.dtype)

    def variables(self) -> list[dict[str, Any]]:
        layout = self.corrector.layout
        return [
            {"name": f, "dims": list(layout.field_dims[f]), "units": layout.units.get(f, "1")}
            for f in layout.fields
        ]
