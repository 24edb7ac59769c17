"""The one rollout: a host model stepped with a correction, under a gradient policy.

    x_{n+1} = host.step(x_n) + dt * c(x_n)

Evaluation, coupled forecasts, the in-process corrected host and every fine-tuning
mode run this loop; they differ only in the correction, in what they do between
steps (``on_step``) and in where gradients flow (:class:`Gradient`), after List et
al. (2024) and Frezat et al. (2023):

=================  ===============================  ===============================
policy             forward values                   gradients
=================  ===============================  ===============================
none               host + correction                none (inference, validation)
truncated          host + correction                correction only, cut at each
                                                    step's input (``unrolled``)
surrogate          surrogate + correction           through the surrogate
                                                    (``emulator``)
straight-through   host + correction                the surrogate's Jacobian,
                                                    host values (``hybrid``)
full               host + correction                through the host itself
                                                    (``differentiable``, torch hosts)
=================  ===============================  ===============================

Under ``truncated`` and ``straight-through`` the host is called without autograd, so
a black-box host (:class:`~correction.hosts.BlackBoxHost`) never sees a gradient
request; under ``full`` a black box raises :class:`~correction.hosts.HostGradientError`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable

import torch

from .corrections import Correction
from .hosts import HostModel


class Gradient(enum.Enum):
    """Where gradients flow through a rollout (see the module's table)."""

    NONE = "none"
    TRUNCATED = "truncated"
    SURROGATE = "surrogate"
    STRAIGHT_THROUGH = "straight-through"
    FULL = "full"


def _host_values(host: HostModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return host.step(x.detach())


def step(
    host: HostModel,
    correction: Correction | None,
    x: torch.Tensor,
    gradient: Gradient = Gradient.NONE,
    surrogate: HostModel | None = None,
) -> torch.Tensor:
    """One corrected step of ``x`` ``[B, *state_shape]`` under ``gradient``."""
    dt = host.dt
    if gradient is Gradient.NONE or gradient is Gradient.FULL:
        nxt = host.step(x)
        base = x
    elif gradient is Gradient.TRUNCATED:
        base = x.detach()
        nxt = _host_values(host, base)
    elif gradient is Gradient.SURROGATE:
        nxt, base = surrogate.step(x), x
    elif gradient is Gradient.STRAIGHT_THROUGH:
        e = surrogate.step(x)
        nxt, base = e + (_host_values(host, x) - e).detach(), x
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"unknown gradient policy {gradient!r}")
    if correction is None:
        return nxt
    return nxt + dt * correction.tendency(base)


def rollout(
    host: HostModel,
    correction: Correction | None,
    x0: torch.Tensor,
    steps: int,
    gradient: Gradient | str = Gradient.NONE,
    *,
    surrogate: HostModel | None = None,
    on_step: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Step ``x0`` ``steps`` times; returns the final state.

    ``on_step(n, x)`` runs after step ``n`` (1-based) and may return a replacement
    state (evaluation resets members that blew up; forecasts keep outputs and check
    finiteness). ``surrogate`` (an emulator) is needed by ``surrogate`` and
    ``straight-through``.
    """
    gradient = Gradient(gradient)
    if gradient in (Gradient.SURROGATE, Gradient.STRAIGHT_THROUGH) and surrogate is None:
        raise ValueError(f"gradient policy '{gradient.value}' needs a surrogate (an emulator)")
    grad = contextlib.nullcontext() if gradient is not Gradient.NONE else torch.no_grad()
    x = x0
    with grad:
        for n in range(1, steps + 1):
            x = step(host, correction, x, gradient, surrogate)
            if on_step is not None:
                replaced = on_step(n, x)
                if replaced is not None:
                    x = replaced
    return x


__all__ = ["Gradient", "rollout", "step"]
