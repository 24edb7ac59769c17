"""One interface for everything that maps a batch of states to a tendency correction.

A :class:`Correction` answers ``c(x)`` for states ``[batch, *state_shape]`` in the
state's units per unit time. The learned network (:class:`NetworkCorrection` and
:class:`~correction.inference.Corrector`), the baselines (:class:`ZeroCorrection`,
the cubic :class:`PolynomialCorrection`), the guarded in-process corrector
(:class:`~correction.guardrails.GuardedCorrection`) and the service
(:class:`~service.remote.RemoteCorrection`) all implement it, so one rollout
(:mod:`correction.rollout`) drives evaluation, coupled forecasts and fine-tuning.

Implementations override :meth:`Correction.tendency` (torch in, torch out) or
:meth:`Correction.numpy` (numpy in, numpy out), whichever is their native side;
calling the object accepts either kind and answers the same kind. Corrections
compose as pyqg's parameterizations do: ``a + b`` adds tendencies and ``0.5 * a``
scales one, so a physical baseline plus a learned residual is one correction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class Correction:
    """A tendency correction: ``[batch, *state_shape]`` -> same shape, per unit time."""

    name: str = "correction"
    #: the model version that produced the last answer (``None``: not versioned)
    version: int | None = None
    #: steps answered without a fresh correction (a service's degradation policy)
    degraded_steps: int = 0
    #: samples flagged out of distribution and values capped by guardrails
    ood_sample_steps: int = 0
    capped_values: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        native = {"tendency", "numpy"} & {
            n for klass in cls.__mro__[:-1] if klass is not Correction for n in vars(klass)
        }
        if not native:
            raise TypeError(f"{cls.__name__} must implement tendency() or numpy()")

    @property
    def description(self) -> str:
        return self.name

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """Torch side: ``x`` ``[B, *shape]`` -> correction in ``x``'s dtype."""
        y = self.numpy(x.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(y)).to(device=x.device, dtype=x.dtype)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """Numpy side: ``x`` ``[B, *shape]`` -> correction in ``x``'s dtype."""
        with torch.no_grad():
            y = self.tendency(torch.from_numpy(np.asarray(x)))
        return y.detach().cpu().numpy()

    def __call__(self, x):
        """The correction for a tensor or a numpy array, returned as the same kind."""
        if isinstance(x, torch.Tensor):
            return self.tendency(x)
        return self.numpy(np.asarray(x))

    def __add__(self, other: Correction) -> Correction:
        if not isinstance(other, Correction):
            return NotImplemented
        return SumCorrection([self, other])

    def __radd__(self, other: Any) -> Correction:
        if isinstance(other, int | float) and other == 0:  # sum([a, b]) starts from 0
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Correction:
        if not isinstance(factor, int | float):
            return NotImplemented
        return ScaledCorrection(self, float(factor))

    __rmul__ = __mul__


class ZeroCorrection(Correction):
    """No correction: the uncorrected host (the ``none`` baseline)."""

    name = "none"

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class FunctionCorrection(Correction):
    """Any callable ``Tensor -> Tensor`` as a correction."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "function"):
        self.fn, self.name = fn, name

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).to(x.dtype)


class PolynomialCorrection(Correction):
    """A polynomial of the local state value, fitted by least squares (``poly3``).

    The classic deterministic parameterization of Lorenz-96 (Wilks 2005, Arnold et
    al. 2013): a learned correction must beat it.
    """

    name = "poly3"

    def __init__(self, coefficients: Sequence[float] | np.ndarray) -> None:
        self.coefficients = np.asarray(coefficients, dtype=np.float64)

    @classmethod
    def fit(cls, state: np.ndarray, target: np.ndarray, degree: int = 3) -> PolynomialCorrection:
        x, y = state.ravel().astype(np.float64), target.ravel().astype(np.float64)
        design = np.vander(x, degree + 1, increasing=True)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        return cls(coef)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for p, a in enumerate(self.coefficients):
            out = out + float(a) * x**p
        return out


class NetworkCorrection(Correction):
    """A correction network with its state layout: pack, run, unpack.

    ``trainable=False`` runs without autograd (inference); ``trainable=True`` keeps
    the graph, which is how fine-tuning differentiates the correction.
    """

    def __init__(self, model: torch.nn.Module, layout: Any, trainable: bool = False) -> None:
        self.model, self.layout, self.trainable = model, layout, trainable
        self.name = "network"

    @property
    def dtype(self) -> torch.dtype:
        """The network's own floating dtype (states are cast to it and back)."""
        return self.model.in_mean.dtype

    def tendency(self, x: torch.Tensor, forcings: torch.Tensor | None = None) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            y = self.model(self.layout.pack(x.to(self.dtype)), forcings)
        return self.layout.unpack(y).to(x.dtype)


class SumCorrection(Correction):
    """The sum of several corrections' tendencies."""

    def __init__(self, parts: Sequence[Correction]) -> None:
        flat: list[Correction] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, SumCorrection) else [p])
        self.parts = flat
        self.name = " + ".join(p.name for p in flat)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parts[0].tendency(x)
        for p in self.parts[1:]:
            out = out + p.tendency(x)
        return out


class ScaledCorrection(Correction):
    """A correction's tendency times a constant factor."""

    def __init__(self, inner: Correction, factor: float) -> None:
        self.inner, self.factor = inner, factor
        self.name = f"{factor:g} * {inner.name}"

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.inner.tendency(x)


def as_correction(obj: Any, name: str | None = None) -> Correction | None:
    """A :class:`Correction` for ``obj``: itself, a callable wrapped, ``None`` kept."""
    if obj is None or isinstance(obj, Correction):
        return obj
    if callable(obj):
        return FunctionCorrection(obj, name or getattr(obj, "__name__", "function"))
    raise TypeError(f"cannot use {type(obj).__name__} as a correction")


__all__ = [
    "Correction",
    "FunctionCorrection",
    "NetworkCorrection",
    "PolynomialCorrection",
    "ScaledCorrection",
    "SumCorrection",
    "ZeroCorrection",
    "as_correction",
]
