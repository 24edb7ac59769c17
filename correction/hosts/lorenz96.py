"""Lorenz-96 host models in torch: the one-scale host and the two-scale truth.

Written once in torch so that the same code is the (differentiable) oracle for
fine-tuning and the forward model of the benchmark generator. States are batched
over any leading dimensions; numpy callers go through :func:`integrate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ArrayLike, check_state, rk4_step, to_tensor


def l96_tendency(x: torch.Tensor, forcing: float) -> torch.Tensor:
    """dX_k/dt = -X_{k-1}(X_{k-2} - X_{k+1}) - X_k + F on a periodic ring."""
    xm1 = torch.roll(x, 1, -1)
    return xm1 * (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) - x + forcing


@dataclass
class Lorenz96:
    """One-scale Lorenz-96: the imperfect host model of the l96 benchmarks."""

    K: int = 36
    F: float = 10.0
    dt: float = 0.01
    name: str = "l96"
    differentiable: bool = True

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.K,)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return l96_tendency(x, self.F)

    def step(self, x: ArrayLike) -> torch.Tensor:
        x = to_tensor(x)
        check_state(self, x)
        return rk4_step(self.tendency, x, self.dt)


@dataclass
class Lorenz96TwoScale:
    """Two-scale Lorenz-96 (Lorenz 1996), the truth of the l96-2s benchmarks.

    The state is flat, ``[..., K + K*J]``: the K slow variables X followed by the
    fast variables Y stored as one periodic ring of length K*J, where
    ``Y[k*J + j]`` is Y_{j,k}. Neighbours of the last Y of sector k are the first
    Ys of sector k+1 (the usual convention), so the fast ring couples sectors.
    """

    K: int = 36
    J: int = 10
    F: float = 10.0
    h: float = 1.0
    b: float = 10.0
    c: float = 10.0
    dt: float = 0.005
    name: str = "l96-2s"
    differentiable: bool = True

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.K * (self.J + 1),)

    def split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat state -> (X ``[..., K]``, Y ``[..., K, J]``)."""
        x = state[..., : self.K]
        y = state[..., self.K :].reshape(*state.shape[:-1], self.K, self.J)
        return x, y

    def join(self, x: ArrayLike, y: ArrayLike) -> torch.Tensor:
        """(X ``[..., K]``, Y ``[..., K, J]``) -> flat state."""
        x, y = to_tensor(x), to_tensor(y)
        return torch.cat([x, y.reshape(*y.shape[:-2], self.K * self.J)], dim=-1)

    def coupling(self, y: torch.Tensor) -> torch.Tensor:
        """The term the one-scale host lacks: -(h c / b) sum_j Y_{j,k}, ``[..., K]``."""
        return -(self.h * self.c / self.b) * y.sum(-1)

    def tendency(self, state: torch.Tensor) -> torch.Tensor:
        x = state[..., : self.K]
        yr = state[..., self.K :]
        ysum = yr.reshape(*yr.shape[:-1], self.K, self.J).sum(-1)
        hcb = self.h * self.c / self.b
        dx = l96_tendency(x, self.F) - hcb * ysum
        # fast ring: -c b Y_{j+1}(Y_{j+2} - Y_{j-1}) - c Y_j + (h c / b) X_k
        yp1 = torch.roll(yr, -1, -1)
        dy = (
            -self.c * self.b * yp1 * (torch.roll(yr, -2, -1) - torch.roll(yr, 1, -1))
            - self.c * yr
            + hcb * torch.repeat_interleave(x, self.J, dim=-1)
        )
        return torch.cat([dx, dy], dim=-1)

    def step(self, state: ArrayLike) -> torch.Tensor:
        state = to_tensor(state)
        check_state(self, state)
        return rk4_step(self.tendency, state, self.dt)
