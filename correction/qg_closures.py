"""Physical subgrid closures of the two-layer QG host, as corrections.

The baseline a learned correction of the QG benchmarks is compared with, as in Ross
et al. (2023): Smagorinsky (1963) eddy viscosity on the resolved velocities,
``nu = (C dx)^2 |S|`` with ``|S| = sqrt(2 S_ij S_ij)``, the momentum forcing
``F = div(2 nu S)`` and its curl as the PV tendency. The constant is pyqg's
default ``C = 0.1``. It is a :class:`~correction.corrections.Correction` in the
host's time unit (per hour), so it composes with learned corrections (``+``).
"""

from __future__ import annotations

import torch

from .corrections import Correction
from .hosts.qg import TwoLayerQG


class Smagorinsky(Correction):
    """Smagorinsky eddy viscosity for :class:`TwoLayerQG` states ``[B, 2, n, n]``."""

    def __init__(self, host: TwoLayerQG, constant: float = 0.1) -> None:
        self.host, self.constant = host, constant
        self.name = f"smagorinsky (C={constant:g})"

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        q = x.to(torch.float64)
        host = self.host
        ops = host.ops(q.device)
        s = q.shape[-2:]
        ph = host.invert(torch.fft.rfft2(q), ops)
        ikx, iky = ops["ikx"], ops["iky"]

        def real(fh: torch.Tensor) -> torch.Tensor:
            return torch.fft.irfft2(fh, s=s)

        uh, vh = -iky * ph, ikx * ph
        s11, s22 = real(ikx * uh), real(iky * vh)
        s12 = 0.5 * real(iky * uh + ikx * vh)
        dx = host.L / host.nx
        nu = (self.constant * dx) ** 2 * torch.sqrt(2 * (s11**2 + s22**2 + 2 * s12**2))
        t11, t12, t22 = [torch.fft.rfft2(2 * nu * t) for t in (s11, s12, s22)]
        fu = ikx * t11 + iky * t12  # div(2 nu S): the viscous force on u and v
        fv = ikx * t12 + iky * t22
        dq = real(ikx * fv - iky * fu)  # its curl: the PV tendency (1/s per second)
        return (dq * 3600.0).to(x.dtype)  # per hour, the host's time unit


__all__ = ["Smagorinsky"]
