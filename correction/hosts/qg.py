"""Two-layer quasi-geostrophic turbulence on a doubly periodic beta-plane, in torch.

The model of pyqg's ``QGModel`` (the two-layer model of the pyqg documentation and
of Ross et al. 2023, "Benchmarking of machine learning ocean subgrid
parameterizations in an idealized model"), written here in torch so that it is a
differentiable, batched host like ``l96``:

    q_1 = lap(psi_1) + F_1 (psi_2 - psi_1),   q_2 = lap(psi_2) + F_2 (psi_1 - psi_2),
    F_1 = 1 / (rd^2 (1 + delta)),  F_2 = delta F_1,  delta = H_1 / H_2,

    dq_i/dt + J(psi_i, q_i) + U_i dq_i/dx + Qy_i dpsi_i/dx = -delta_{i2} rek lap(psi_2),
    Qy_1 = beta + F_1 (U_1 - U_2),   Qy_2 = beta - F_2 (U_1 - U_2),

with ``q`` the eddy potential vorticity (1/s) of each layer, ``psi`` the eddy
streamfunction, a background zonal flow ``U_i`` per layer and linear bottom drag
``rek`` on the lower layer. It is pseudo-spectral (derivatives and the PV
inversion in Fourier space, products on the grid), stepped with classical RK4,
and, as in pyqg, the small scales are removed by an exponential filter applied to
the PV once per step: ``exp(-filterfac (|k| dx - cphi)^4)`` above ``cphi = 0.65 pi``
(``filterfac = 0`` turns it off). pyqg steps with third-order Adams-Bashforth;
RK4 keeps each step a function of the state alone, which a host needs (a step
takes a state to the next, nothing else carried).

The state is ``[..., 2, ny, nx]`` (layer, y, x), float64 inside whatever comes in;
any leading dimensions are members. Lengths are metres and the physics runs in
seconds; the host's step ``dt`` (and so a correction's "per unit time") is in
hours, the unit of the benchmark's time axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import ArrayLike, check_state, to_tensor


@dataclass
class TwoLayerQG:
    """pyqg's two-layer model; the defaults are pyqg's (its ``eddy`` configuration)."""

    nx: int = 64
    L: float = 1.0e6  # domain side (m)
    beta: float = 1.5e-11  # 1/(m s)
    rd: float = 15000.0  # deformation radius (m)
    delta: float = 0.25  # H1 / H2
    H1: float = 500.0  # upper layer thickness (m)
    U1: float = 0.025  # upper layer background flow (m/s)
    U2: float = 0.0
    rek: float = 5.787e-7  # bottom drag (1/s), about 1/(20 days)
    dt: float = 1.0  # hours (pyqg's dt = 3600 s): the host step in its time unit
    filterfac: float = 23.6
    cphi: float = 0.65 * math.pi
    name: str = "qg"
    differentiable: bool = True
    time_unit: str = "hour"  # the unit of dt and of per-unit-time corrections
    _ops: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (2, self.nx, self.nx)

    @property
    def dt_seconds(self) -> float:
        return self.dt * 3600.0

    @property
    def F1(self) -> float:
        return 1.0 / (self.rd**2 * (1.0 + self.delta))

    @property
    def F2(self) -> float:
        return self.delta * self.F1

    @property
    def Qy(self) -> tuple[float, float]:
        shear = self.U1 - self.U2
        return self.beta + self.F1 * shear, self.beta - self.F2 * shear

    @property
    def layer_weights(self) -> tuple[float, float]:
        """``H_i / H``: the layers' shares of the depth (energy is depth-weighted)."""
        h2 = self.H1 / self.delta
        return self.H1 / (self.H1 + h2), h2 / (self.H1 + h2)

    # -- spectral operators -------------------------------------------------------------
    def ops(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Wavenumbers, the PV inversion, the filter (built once per device)."""
        key = str(device)
        if key not in self._ops:
            n, dk = self.nx, 2 * math.pi / self.L
            f64 = {"dtype": torch.float64, "device": device}
            ky = torch.fft.fftfreq(n, d=1.0 / n, **f64)[:, None] * dk
            kx = torch.fft.rfftfreq(n, d=1.0 / n, **f64)[None, :] * dk
            k2 = kx**2 + ky**2
            f1, f2 = self.F1, self.F2
            det = k2 * (k2 + f1 + f2)
            inv_det = torch.where(det > 0, 1.0 / torch.where(det > 0, det, 1.0), 0.0)
            # psi_hat = M^-1 q_hat, M = [[-k2 - F1, F1], [F2, -k2 - F2]]
            inv = torch.stack(
                [
                    torch.stack([(-k2 - f2) * inv_det, -f1 * inv_det]),
                    torch.stack([-f2 * inv_det, (-k2 - f1) * inv_det]),
                ]
            )
            dx = self.L / n
            wvx = torch.sqrt((kx * dx) ** 2 + (ky * dx) ** 2)
            filtr = torch.exp(-self.filterfac * (wvx - self.cphi).clamp(min=0) ** 4)
            self._ops[key] = {
                "ikx": 1j * kx,
                "iky": 1j * ky,
                "k2": k2,
                "inv": inv,
                "filter": filtr,
                "drag": torch.stack([torch.zeros_like(k2), self.rek * k2]),  # +rek k^2 psi_2
                "U": torch.tensor([self.U1, self.U2], **f64).view(2, 1, 1),
                "Qy": torch.tensor(self.Qy, **f64).view(2, 1, 1),
            }
        return self._ops[key]

    def invert(self, qh: torch.Tensor, ops: dict[str, torch.Tensor]) -> torch.Tensor:
        """Streamfunction from PV, both spectral ``[..., 2, ny, nx//2+1]``."""
        inv = ops["inv"]
        q1, q2 = qh[..., 0, :, :], qh[..., 1, :, :]
        return torch.stack([inv[0, 0] * q1 + inv[0, 1] * q2, inv[1, 0] * q1 + inv[1, 1] * q2], -3)

    def streamfunction(self, q: ArrayLike) -> torch.Tensor:
        q = to_tensor(q, torch.float64)
        ops = self.ops(q.device)
        return torch.fft.irfft2(self.invert(torch.fft.rfft2(q), ops), s=q.shape[-2:])

    def velocities(self, q: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Eddy velocities ``(u, v) = (-dpsi/dy, dpsi/dx)``, ``[..., 2, ny, nx]`` each."""
        q = to_tensor(q, torch.float64)
        ops = self.ops(q.device)
        ph = self.invert(torch.fft.rfft2(q), ops)
        s = q.shape[-2:]
        return torch.fft.irfft2(-ops["iky"] * ph, s=s), torch.fft.irfft2(ops["ikx"] * ph, s=s)

    # -- tendencies ---------------------------------------------------------------------
    def jacobian_tendency(self, q: torch.Tensor) -> torch.Tensor:
        """``-J(psi, q)`` alone, in flux form (the part that conserves energy and enstrophy)."""
        return self._tendency(q, advection_only=True)

    def tendency(self, q: torch.Tensor) -> torch.Tensor:
        """``dq/dt`` (1/s per second) of the full model (the filter acts per step, not here)."""
        return self._tendency(q, advection_only=False)

    def _tendency(self, q: torch.Tensor, advection_only: bool) -> torch.Tensor:
        ops = self.ops(q.device)
        s = q.shape[-2:]
        qh = torch.fft.rfft2(q)
        ph = self.invert(qh, ops)
        vh = ops["ikx"] * ph
        u = torch.fft.irfft2(-ops["iky"] * ph, s=s)
        v = torch.fft.irfft2(vh, s=s)
        if not advection_only:
            u = u + ops["U"]  # the background flow advects the eddy PV too
        flux = ops["ikx"] * torch.fft.rfft2(u * q) + ops["iky"] * torch.fft.rfft2(v * q)
        dqh = -flux
        if not advection_only:
            dqh = dqh - ops["Qy"] * vh + ops["drag"] * ph
        return torch.fft.irfft2(dqh, s=s)

    def step(self, x: ArrayLike) -> torch.Tensor:
        x = to_tensor(x)
        check_state(self, x)
        q = x.to(torch.float64)
        dt = self.dt_seconds
        k1 = self.tendency(q)
        k2 = self.tendency(q + 0.5 * dt * k1)
        k3 = self.tendency(q + 0.5 * dt * k2)
        k4 = self.tendency(q + dt * k3)
        q = q + (dt / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)
        if self.filterfac:
            q = torch.fft.irfft2(torch.fft.rfft2(q) * self.ops(q.device)["filter"], s=q.shape[-2:])
        return q.to(x.dtype)

    # -- diagnostics --------------------------------------------------------------------
    def energy(self, q: ArrayLike) -> torch.Tensor:
        """Total (kinetic + available potential) energy per unit mass, m^2/s^2, per member:
        ``-1/2 sum_i (H_i/H) <psi_i q_i>``."""
        q = to_tensor(q, torch.float64)
        psi = self.streamfunction(q)
        w1, w2 = self.layer_weights
        prod = (psi * q).mean(dim=(-2, -1))
        return -0.5 * (w1 * prod[..., 0] + w2 * prod[..., 1])

    def kinetic_energy(self, q: ArrayLike) -> torch.Tensor:
        """``1/2 <u^2 + v^2>`` per layer, ``[..., 2]`` (m^2/s^2)."""
        u, v = self.velocities(q)
        return 0.5 * (u**2 + v**2).mean(dim=(-2, -1))

    def enstrophy(self, q: ArrayLike) -> torch.Tensor:
        """``1/2 <q^2>`` per layer, ``[..., 2]`` (1/s^2)."""
        q = to_tensor(q, torch.float64)
        return 0.5 * (q**2).mean(dim=(-2, -1))

    def linear_operator(self, k_index: int, l_index: int = 0) -> torch.Tensor:
        """The linearised model at wavenumber ``(k, l)`` (indices of ``2 pi / L``): the 2x2
        matrix ``B`` of ``d psi_hat/dt = B psi_hat``, from ``M dpsi/dt = A psi`` with
        ``M`` the PV inversion's inverse and ``A = -ik U M - ik Qy + drag``. Its
        eigenvalues are the analytic dispersion relation (growth rate: real part)."""
        dk = 2 * math.pi / self.L
        k, l_ = k_index * dk, l_index * dk
        k2 = k * k + l_ * l_
        f1, f2 = self.F1, self.F2
        c128 = torch.complex128
        m = torch.tensor([[-k2 - f1, f1], [f2, -k2 - f2]], dtype=c128)
        u = torch.diag(torch.tensor([self.U1, self.U2], dtype=c128))
        qy = torch.diag(torch.tensor(self.Qy, dtype=c128))
        drag = torch.diag(torch.tensor([0.0, self.rek * k2], dtype=c128))
        return torch.linalg.solve(m, -1j * k * (u @ m) - 1j * k * qy + drag)

    def linear_growth_rate(self, k_index: int, l_index: int = 0) -> float:
        """The analytic growth rate (1/s) of mode ``(k, l)``: the eigenvalues' largest real part."""
        return float(torch.linalg.eigvals(self.linear_operator(k_index, l_index)).real.max())

    def normal_mode(self, k_index: int, l_index: int = 0, amplitude: float = 1e-10) -> torch.Tensor:
        """The fastest-growing normal mode of ``(k, l)`` as a PV field ``[2, ny, nx]``."""
        vals, vecs = torch.linalg.eig(self.linear_operator(k_index, l_index))
        psi = vecs[:, int(vals.real.argmax())]
        dk = 2 * math.pi / self.L
        k, l_ = k_index * dk, l_index * dk
        m = torch.tensor(
            [[-(k * k + l_ * l_) - self.F1, self.F1], [self.F2, -(k * k + l_ * l_) - self.F2]],
            dtype=torch.complex128,
        )
        qhat = m @ psi
        xs = torch.arange(self.nx, dtype=torch.float64) * (self.L / self.nx)
        phase = torch.exp(1j * (k * xs[None, :] + l_ * xs[:, None]))
        q = (qhat[:, None, None] * phase[None]).real
        return amplitude * q / q.abs().max()


__all__ = ["TwoLayerQG"]
