"""The host-model contract shared by every stage.

A host model is the physics model being corrected. Later stages (fine-tuning,
coupled forecasts, the service's clients) only ever call ``step``; whether they may
differentiate through it is a property of the host, not of the caller. Real host
models are Fortran or C black boxes, so :class:`BlackBoxHost` makes that situation
explicit and testable: it steps numpy arrays and tensors alike but refuses to take
part in autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class HostGradientError(RuntimeError):
    """Raised when a caller asks a black-box host for gradients."""


@runtime_checkable
class HostModel(Protocol):
    """What every host model offers.

    ``step`` maps a batch of states ``[..., *state_shape]`` to the states one
    ``dt`` later. Leading dimensions are batch dimensions (ensemble members,
    initial times), so a whole ensemble advances in one call.
    """

    name: str
    state_shape: tuple[int, ...]
    dt: float
    differentiable: bool

    def step(self, x: torch.Tensor) -> torch.Tensor: ...


def rk4_step(
    tendency: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float
) -> torch.Tensor:
    """One classical fourth-order Runge-Kutta step of ``dx/dt = tendency(x)``."""
    k1 = tendency(x)
    k2 = tendency(x + 0.5 * dt * k1)
    k3 = tendency(x + 0.5 * dt * k2)
    k4 = tendency(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)


def to_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Accept numpy arrays or tensors; numpy callers get float64 by default."""
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64)


def check_state(host: HostModel, x: torch.Tensor) -> None:
    """Reject states whose trailing shape differs from the host's state shape."""
    n = len(host.state_shape)
    if tuple(x.shape[x.ndim - n :]) != tuple(host.state_shape) or x.ndim < n:
        raise ValueError(
            f"host '{host.name}': state has shape {tuple(x.shape)}, expected trailing "
            f"dimensions {tuple(host.state_shape)}"
        )


def integrate(host: HostModel, x0: ArrayLike, n_steps: int) -> ArrayLike:
    """Advance ``x0`` by ``n_steps`` host steps; numpy in, numpy out."""
    is_numpy = not isinstance(x0, torch.Tensor)
    x = to_tensor(x0)
    for _ in range(n_steps):
        x = host.step(x)
    return x.detach().cpu().numpy() if is_numpy else x


class BlackBoxHost:
    """Wrap any Python callable ``fn(state: np.ndarray) -> np.ndarray`` as a host.

    The callable sees plain numpy arrays (as a Fortran model behind f2py or a
    subprocess would) and is never differentiated. Stepping a tensor that needs
    gradients while autograd is recording raises :class:`HostGradientError`, so a
    training mode that silently relied on host gradients fails loudly instead of
    training on zeros. Under ``torch.no_grad()`` (or with detached inputs) it steps
    normally and returns a tensor on the caller's device and dtype.
    """

    differentiable = False

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        state_shape: tuple[int, ...],
        dt: float,
        name: str = "black-box",
    ) -> None:
        self.fn = fn
        self.state_shape = tuple(state_shape)
        self.dt = float(dt)
        self.name = name
        self.calls = 0

    @classmethod
    def wrap(cls, host: HostModel) -> BlackBoxHost:
        """Hide a torch host behind the black-box interface (forward only)."""

        def fn(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return host.step(torch.from_numpy(x)).numpy()

        return cls(fn, host.state_shape, host.dt, name=f"{host.name}[black-box]")

    def step(self, x: ArrayLike) -> ArrayLike:
        if isinstance(x, torch.Tensor):
            if x.requires_grad and torch.is_grad_enabled():
                raise HostGradientError(
                    f"host '{self.name}' is a black box and cannot provide gradients; "
                    "call it under torch.no_grad() or detach the state, or use a "
                    "training mode that takes gradients from an emulator"
                )
            check_state(self, x)
            out = np.asarray(self.fn(x.detach().cpu().numpy().astype(np.float64)))
            self.calls += 1
            return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
        arr = np.asarray(x, dtype=np.float64)
        self.calls += 1
        return np.asarray(self.fn(arr))
